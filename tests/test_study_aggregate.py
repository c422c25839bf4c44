"""uipe.study.aggregate: t intervals, the paired per-seed comparison of UIPE with its baselines, the Markdown
report and the plots, on three hand-made seed records whose numbers are worked by hand in the comments."""

from __future__ import annotations

import math

import pytest

from uipe.errors import UipeError
from uipe.study.aggregate import aggregate, floor_key, log10_fq, markdown, plot_differences, plot_fronts, t_interval

FLOORS = [0.9, 0.8]
T_975_2 = 4.302653  # t_{0.975, 2}
T_975_1 = 12.706205  # t_{0.975, 1}


def pt(report: float, select: float | None = None, alpha: float = 0.5, epoch: int = 3) -> dict:
    """A chosen point; the combined forget quality equals the report fold's unless a test says otherwise."""
    return {"alpha": alpha, "epoch": epoch, "model_utility": 0.75, "utility_ratio": 0.96, "forget_quality": report,
            "forget_quality_select": report if select is None else select, "forget_quality_report": report,
            "forget_prob": 0.4}


def record(seed: int, arms: dict, hv: dict, matched: dict, signals: dict | None = None) -> dict:
    rec = {"theta_ini": {"model_utility": 0.78, "forget_quality": 1e-5}, "epochs": 6, "longer_epochs": 12,
           "arms": arms, "matched_utility": matched, "hypervolume": hv,
           "fronts": {"uipe": [[1.0, 1e-5], [0.95, 1e-3], [0.85, 1e-1], [0.7, 0.0]],
                      "base": [[1.0, 1e-5], [0.9, 1e-4], [0.8, 1e-3]],
                      "more": [[1.0, 1e-5], [0.9, 1e-3], [0.75, 1e-2]]}}
    if signals is not None:
        rec["signals"] = signals
    return {"seed": seed, "methods": {"ga": rec}}


def seeds() -> list[dict]:
    same = pt(1e-3, alpha=0.0)  # seed 1: UIPE's search picked alpha 0, the very point the base arm chose
    return [
        record(0, {"base": {"0.9": pt(1e-4), "0.8": pt(1e-3)},
                   "more": {"0.9": pt(1e-3), "0.8": pt(1e-3)},
                   "uipe": {"0.9": pt(1e-2, select=1e-1), "0.8": pt(1e-2)}},
               hv={"base": 0.5, "more": 0.6, "uipe": 0.6}, matched={"0.9": 0.02, "0.8": None},
               signals={"holdout_ks": {"spearman": 0.8, "regret": 0.1}}),
        record(1, {"base": {"0.9": same, "0.8": pt(1e-2)},
                   "more": {"0.9": pt(1e-2), "0.8": pt(1e-2)},
                   "uipe": {"0.9": dict(same), "0.8": pt(1e-1)}},
               hv={"base": 0.6, "more": 0.6, "uipe": 0.6}, matched={"0.9": None, "0.8": None},
               signals={"holdout_ks": {"spearman": 0.6, "regret": None}}),
        record(2, {"base": {"0.9": None, "0.8": pt(1e-3)},  # base never reached 0.9 x utility on seed 2
                   "more": {"0.9": pt(1e-3), "0.8": pt(1e-2)},
                   "uipe": {"0.9": pt(1e-1, select=1.0), "0.8": pt(1e-1)}},
               hv={"base": 0.7, "more": 0.6, "uipe": 0.9}, matched={"0.9": -0.01, "0.8": None}),
    ]


# ---------------------------------------------------------------- helpers

def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3); half width 4.302653 / sqrt(3) = 2.484138
    t = t_interval([1, 2, 3])
    assert t["n"] == 3 and t["mean"] == pytest.approx(2.0)
    assert t["low"] == pytest.approx(2 - 2.484138, abs=1e-5) and t["high"] == pytest.approx(2 + 2.484138, abs=1e-5)
    assert t_interval([5]) == {"mean": 5.0, "low": None, "high": None, "n": 1}
    assert t_interval([]) == {"mean": None, "low": None, "high": None, "n": 0}
    # None and NaN are dropped first: [1, 3] -> mean 2, sd sqrt(2), se 1, half width 12.706205
    t = t_interval([1, None, math.nan, 3])
    assert t["n"] == 2 and t["high"] == pytest.approx(2 + T_975_1, abs=1e-5)
    with pytest.raises(UipeError):
        t_interval([1, 2], level=95)


def test_floor_key_and_log10_fq():
    assert [floor_key(f) for f in (0.95, 0.9, 0.85, 0.8, 1)] == ["0.95", "0.9", "0.85", "0.8", "1.0"]
    assert log10_fq(1e-3) == pytest.approx(-3.0)
    assert log10_fq(0.0) == -300.0  # an underflowed KS p-value
    assert log10_fq(None) is None


# ---------------------------------------------------------------- aggregate

def test_aggregate_paired_differences_by_hand():
    agg = aggregate(seeds(), FLOORS)
    assert agg["seeds"] == [0, 1, 2] and agg["floors"] == [0.9, 0.8]
    ga = agg["methods"]["ga"]
    assert ga["seeds"] == [0, 1, 2]

    # UIPE - base at 0.9, log10 report fold: seed 0: -2 - (-4) = +2; seed 1: same point, 0 (a tie);
    # seed 2: base infeasible, left out. [2, 0]: mean 1, sd sqrt(2), se 1, half width t_{0.975,1} = 12.706205
    d = ga["paired"]["uipe-base"]["0.9"]["log10_fq_report"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(1.0)
    assert d["low"] == pytest.approx(1 - T_975_1, abs=1e-5) and d["high"] == pytest.approx(1 + T_975_1, abs=1e-5)
    assert (d["wins"], d["ties"]) == (1, 1)
    assert ga["paired"]["uipe-base"]["0.9"]["log10_fq"]["mean"] == pytest.approx(1.0)

    # UIPE - more at 0.9: seed 0: -2 - (-3) = +1; seed 1: -3 - (-2) = -1; seed 2: -1 - (-3) = +2.
    # mean 2/3; deviations 1/3, -5/3, 4/3 -> sd^2 = (1 + 25 + 16) / 9 / 2 = 7/3; se = sqrt(7/9) = 0.881917;
    # half width 4.302653 * 0.881917 = 3.794583
    d = ga["paired"]["uipe-more"]["0.9"]["log10_fq_report"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(2 / 3)
    assert d["low"] == pytest.approx(2 / 3 - 3.794583, abs=1e-5)
    assert d["high"] == pytest.approx(2 / 3 + 3.794583, abs=1e-5)
    assert (d["wins"], d["ties"]) == (2, 0)

    # UIPE - base at 0.8: -2 - (-3) = 1, -1 - (-2) = 1, -1 - (-3) = 2: all three seeds, three wins
    d = ga["paired"]["uipe-base"]["0.8"]["log10_fq_report"]
    assert (d["n"], d["wins"], d["ties"]) == (3, 3, 0) and d["mean"] == pytest.approx(4 / 3)

    # feasible seeds: base missed 0.9 on seed 2
    assert ga["arms"]["base"]["0.9"]["feasible_seeds"] == 2 and ga["arms"]["base"]["0.8"]["feasible_seeds"] == 3
    assert ga["arms"]["uipe"]["0.9"]["feasible_seeds"] == 3
    # base at 0.9 over seeds 0, 1: log10 report -4, -3 -> mean -3.5
    assert ga["arms"]["base"]["0.9"]["log10_fq_report"]["mean"] == pytest.approx(-3.5)
    assert ga["arms"]["base"]["0.9"]["log10_fq_report"]["n"] == 2
    # UIPE at 0.9: log10 report -2, -3, -1 -> mean -2, half width 2.484138
    u = ga["arms"]["uipe"]["0.9"]["log10_fq_report"]
    assert u["mean"] == pytest.approx(-2.0) and u["high"] == pytest.approx(-2 + 2.484138, abs=1e-5)
    assert ga["arms"]["uipe"]["0.9"]["model_utility"]["mean"] == pytest.approx(0.75)

    # winner's curse at 0.9 (UIPE, log10 select - log10 report): -1 - (-2) = 1, 0, 0 - (-1) = 1 -> mean 2/3
    w = ga["winners_curse"]["0.9"]
    assert w["n"] == 3 and w["mean"] == pytest.approx(2 / 3)
    assert ga["winners_curse"]["0.8"]["mean"] == pytest.approx(0.0)

    # hypervolume UIPE - base: 0.1, 0, 0.2 -> mean 0.1, sd 0.1, half width 4.302653 * 0.1 / sqrt(3) = 0.248414
    h = ga["hypervolume_paired"]["uipe-base"]
    assert h["mean"] == pytest.approx(0.1) and h["high"] == pytest.approx(0.1 + 0.248414, abs=1e-5)
    assert (h["n"], h["wins"], h["ties"]) == (3, 2, 1)
    assert (ga["hypervolume_paired"]["uipe-more"]["wins"], ga["hypervolume_paired"]["uipe-more"]["ties"]) == (1, 2)
    assert ga["hypervolume"]["base"]["mean"] == pytest.approx(0.6)

    # matched utility at 0.9: 0.02, (out of range), -0.01 -> n 2, mean 0.005, one win; at 0.8 nothing
    m = ga["matched_utility"]["0.9"]
    assert (m["n"], m["wins"]) == (2, 1) and m["mean"] == pytest.approx(0.005)
    assert ga["matched_utility"]["0.8"]["n"] == 0

    # signals: seed 2 has none; seed 1's regret is missing -> spearman over 2 seeds, regret over 1
    s = ga["signals"]["holdout_ks"]
    assert s["spearman"]["n"] == 2 and s["spearman"]["mean"] == pytest.approx(0.7)
    assert s["regret"] == {"mean": 0.1, "low": None, "high": None, "n": 1}


def test_aggregate_method_missing_on_some_seeds():
    rs = seeds()
    rs[0]["methods"]["npo"] = rs[0]["methods"]["ga"]
    agg = aggregate(rs, FLOORS)
    assert list(agg["methods"]) == ["ga", "npo"]
    assert agg["methods"]["npo"]["seeds"] == [0]
    assert agg["methods"]["npo"]["arms"]["base"]["0.9"]["feasible_seeds"] == 1


def test_aggregate_rejects_malformed_input():
    with pytest.raises(UipeError, match="floor 0.95"):
        aggregate(seeds(), [0.95])
    with pytest.raises(UipeError, match="appears twice"):
        aggregate(seeds() + seeds()[:1], FLOORS)
    rs = seeds()
    del rs[0]["methods"]["ga"]["arms"]["uipe"]["0.9"]["forget_quality_report"]
    with pytest.raises(UipeError, match="forget_quality_report"):
        aggregate(rs, FLOORS)
    rs = seeds()
    del rs[1]["methods"]["ga"]["arms"]["more"]
    with pytest.raises(UipeError, match="more"):
        aggregate(rs, FLOORS)
    with pytest.raises(UipeError):
        aggregate([{"seed": 0}], FLOORS)


# ---------------------------------------------------------------- report and plots

def test_markdown():
    text = markdown(aggregate(seeds(), FLOORS), "uipe study --seeds 3")
    assert "```\nuipe study --seeds 3\n```" in text
    # UIPE at 0.9: geometric mean 10**-2; interval 10**(-2 -+ 2.484138) = 3.28e-05, 3.05
    assert "1.0e-02 [3.3e-05, 3.0e+00]" in text
    assert "(2/3)" in text  # base at 0.9
    assert "+1.00 [-11.71, +13.71] log10, wins 1/2, ties 1" in text  # UIPE - base at 0.9
    assert "+0.67 [-3.13, +4.46] log10, wins 2/3" in text  # UIPE - more at 0.9
    assert "holdout_ks" in text


def _is_png(path, min_bytes: int = 5000) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG") and len(data) > min_bytes


def test_plots(tmp_path):
    rs = seeds()
    p = plot_fronts(rs, tmp_path / "fronts.png")
    assert p == tmp_path / "fronts.png" and _is_png(p)
    q = plot_differences(aggregate(rs, FLOORS), tmp_path / "sub" / "differences.png")
    assert q == tmp_path / "sub" / "differences.png" and _is_png(q)
    assert sorted(x.name for x in tmp_path.rglob("*") if x.is_file()) == ["differences.png", "fronts.png"]
