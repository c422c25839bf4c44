"""Per-seed study records (uipe/study/records.py) aggregated over seeds: t intervals, paired UIPE-minus-baseline
differences, the Markdown report and two PNGs.

Forget quality is a KS p-value spanning many decades, so it is averaged as log10 (a geometric mean) and UIPE is
compared to a baseline by the per-seed difference of log10 forget quality, only over seeds where both arms have a
feasible point at that utility floor. Pure functions over typed seed results (or their JSON, read with from_json).

The aggregate itself is a JSON-shaped dict, written as is to study.json: a table of t intervals keyed by method,
arm, floor and statistic, read only by the Markdown, the plots and the sweep's table, which are tables keyed the
same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from uipe.decisions import floor_key
from uipe.errors import UipeError
from uipe.study.records import (ARMS, BASE, FORM_ARMS, MORE, UIPE, UTILITY, ArmPoint, MethodRecord, SeedResult,
                                seed_results)
from uipe.study.render import ci, diff, finish_figure, geo, label, md_table

UIPE_BASE, UIPE_MORE = f"{UIPE}-{BASE}", f"{UIPE}-{MORE}"
PAIRS = {UIPE_BASE: (UIPE, BASE), UIPE_MORE: (UIPE, MORE)}


def arms_of(recs: Sequence[tuple[int, MethodRecord]]) -> list[str]:
    """The study's arms, then each form's arm some seed ran (study.forms)."""
    return [*ARMS, *(f for f in FORM_ARMS if any(f in rec.arms for _, rec in recs))]


def pairs_of(arms: Sequence[str]) -> dict[str, tuple[str, str]]:
    """UIPE against base and more; each form against more (the question of issue 26) and against UIPE."""
    forms = [a for a in arms if a in FORM_ARMS]
    return PAIRS | {f"{f}-{b}": (f, b) for f in forms for b in (MORE, UIPE)}
FQ_FLOOR = 1e-300  # a KS p-value can underflow to 0
# log10 forget quality at a chosen point, as the aggregate names it: on the fold the search did not choose on (what
# the study reports), on the whole forget split, and on the fold it chose on
REPORTED, COMBINED, SELECTED = "log10_fq_report", "log10_fq", "log10_fq_select"
CROSSFITTED = "log10_fq_crossfit"  # choose on each fold, read the other, average (records.ArmPoint)


def _log10(x: float) -> float | None:
    """log10 forget quality; None for a metric that was not measured (NaN)."""
    return log10_fq(_num_or_none(x))


# the aggregate's statistic -> its value at a chosen point; forget qualities are averaged on log10
POINT_METRICS: dict[str, Callable[[ArmPoint], float | None]] = {
    REPORTED: lambda p: _log10(p.forget_quality_report), COMBINED: lambda p: _log10(p.forget_quality),
    SELECTED: lambda p: _log10(p.forget_quality_select), UTILITY: lambda p: _num_or_none(p.utility),
    CROSSFITTED: lambda p: _log10(p.forget_quality_crossfit)}
PAIRED_METRICS = (REPORTED, COMBINED, CROSSFITTED)


def _clean(values: Sequence[float | None]) -> list[float]:
    """The values as floats, None and NaN dropped."""
    try:
        xs = [float(v) for v in values if v is not None]
    except (TypeError, ValueError) as e:
        raise UipeError(f"expected numbers (or None), got {list(values)!r}") from e
    return [x for x in xs if not math.isnan(x)]


def t_interval(values: Sequence[float | None], level: float = 0.95) -> dict:
    """mean +- t_{(1+level)/2, n-1} * sd(ddof=1) / sqrt(n) over the values that are not None/NaN.

    n == 1: low = high = None (no spread to estimate); n == 0: mean, low, high all None.
    """
    if not 0.0 < level < 1.0:
        raise UipeError(f"t_interval: level must lie in (0, 1), got {level}")
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(np.mean(xs))
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf((1.0 + level) / 2.0, n - 1) * np.std(xs, ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def log10_fq(x: float | None) -> float | None:
    """log10(max(x, 1e-300)); None stays None (a metric that was not measured)."""
    return None if x is None else math.log10(max(float(x), FQ_FLOOR))


def _num_or_none(v: Any) -> float | None:
    xs = _clean([v])
    return xs[0] if xs else None


def _paired(diffs: Sequence[float]) -> dict:
    """t interval of per-seed differences, plus wins (> 0) and ties (== 0 exactly: often the same point)."""
    return {**t_interval(diffs), "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}


def _points(rec: MethodRecord, arm: str, floor: float, where: str) -> ArmPoint | None:
    if arm not in rec.arms and arm in FORM_ARMS:  # a form this seed did not run
        return None
    by_floor = rec.arms[arm]
    if floor not in by_floor:
        recorded = ", ".join(floor_key(f) for f in by_floor) or "none"
        raise UipeError(f"{where}, arm {arm}: no floor {floor_key(floor)} (recorded: {recorded})")
    return by_floor[floor]


def _by_method(seeds: Sequence[SeedResult]) -> dict[str, list[tuple[int, MethodRecord]]]:
    """method -> [(seed, record)], in the order methods first appear; a seed may lack a method."""
    out: dict[str, list[tuple[int, MethodRecord]]] = {}
    seen = set()
    for res in seeds:
        if res.seed in seen:
            raise UipeError(f"seed {res.seed} appears twice in the seed results")
        seen.add(res.seed)
        for method, rec in res.methods.items():
            out.setdefault(method, []).append((res.seed, rec))
    return out


def _columns(method: str, recs: list[tuple[int, MethodRecord]], floors: Sequence[float],
             arms: Sequence[str] = ARMS) -> tuple[dict, dict]:
    """values[arm][floor key][statistic] = one value per seed (None: no feasible point, or not measured), and
    feasible[arm][floor key] = the number of seeds with a point."""
    values: dict = {arm: {} for arm in arms}
    feasible: dict = {arm: {} for arm in arms}
    for arm in arms:
        for floor in floors:
            pts = [_points(rec, arm, floor, f"seed {seed}, method {method}") for seed, rec in recs]
            fk = floor_key(floor)
            feasible[arm][fk] = sum(p is not None for p in pts)
            values[arm][fk] = {m: [None if p is None else value(p) for p in pts] for m, value in POINT_METRICS.items()}
    return values, feasible


def _differences(xs: Sequence[float | None], ys: Sequence[float | None]) -> list[float]:
    """Per-seed x - y over the seeds where both are present (pairing by seed)."""
    return [x - y for x, y in zip(xs, ys) if x is not None and y is not None]


def _signals(recs: list[tuple[int, MethodRecord]]) -> dict:
    """signal -> {"spearman", "regret"} t intervals over the seeds that report them (the block may be missing)."""
    names = list(dict.fromkeys(s for _, rec in recs for s in rec.signals))
    out = {}
    for s in names:
        checks = [rec.signals.get(s) for _, rec in recs]
        out[s] = {"spearman": t_interval([c.spearman for c in checks if c]),
                  "regret": t_interval([c.regret for c in checks if c])}
    return out


def _aggregate_method(method: str, recs: list[tuple[int, MethodRecord]], floors: Sequence[float]) -> dict:
    fks = [floor_key(f) for f in floors]
    arms = arms_of(recs)
    pairs = pairs_of(arms)
    values, feasible = _columns(method, recs, floors, arms)
    hv = {arm: [_num_or_none(rec.hypervolume.get(arm)) for _, rec in recs] for arm in arms}
    matched = {floor_key(f): _clean([rec.matched_utility.get(f) for _, rec in recs]) for f in floors}
    forms = {a: {floor_key(f): _clean([rec.matched_forms.get(a, {}).get(f) for _, rec in recs]) for f in floors}
             for a in arms if a in FORM_ARMS}
    uipe = values[UIPE]
    out = {
        "seeds": [s for s, _ in recs],
        "arms": {arm: {fk: {**{m: t_interval(col[m]) for m in POINT_METRICS}, "feasible_seeds": feasible[arm][fk]}
                       for fk, col in values[arm].items()} for arm in arms},
        "paired": {pair: {fk: {m: _paired(_differences(values[a][fk][m], values[b][fk][m])) for m in PAIRED_METRICS}
                          for fk in fks} for pair, (a, b) in pairs.items()},
        # how far the chosen UIPE point's forget quality falls from the selection fold to the report fold
        "winners_curse": {fk: t_interval(_differences(uipe[fk][SELECTED], uipe[fk][REPORTED]))
                          for fk in fks},
        "hypervolume": {arm: t_interval(hv[arm]) for arm in arms},
        "hypervolume_paired": {pair: _paired(_differences(hv[a], hv[b])) for pair, (a, b) in pairs.items()},
        "matched_utility": {fk: _wins(mu) for fk, mu in matched.items()},
        "signals": _signals(recs),
    }
    if forms:  # only when a form ran: a study without forms keeps its study.json layout
        out["matched_forms"] = {a: {fk: _wins(mu) for fk, mu in by.items()} for a, by in forms.items()}
    return out


def _wins(values: list[float]) -> dict:
    """t interval of per-seed values, and the seeds above 0."""
    return {**t_interval(values), "wins": sum(v > 0 for v in values)}


def aggregate(seeds: Sequence[SeedResult | Mapping[str, Any]], floors: Sequence[float]) -> dict:
    """Per method (each over the seeds that ran it): per arm and floor the t intervals of log10 forget quality
    (report, combined, selection folds) and utility; paired UIPE-minus-baseline log10 differences with wins/ties;
    the winner's curse (log10 select - log10 report, UIPE); hypervolume; matched utility; reference-free signals.
    `seeds`: typed seed results, or their JSON as study.json holds it."""
    results = seed_results(seeds)
    floors = list(dict.fromkeys(float(f) for f in floors))  # a floor given twice is one floor
    return {"seeds": [r.seed for r in results], "floors": floors,
            "methods": {m: _aggregate_method(m, recs, floors) for m, recs in _by_method(results).items()}}


# ---------------------------------------------------------------- Markdown

def markdown(agg: dict, command: str) -> str:
    """The study as Markdown: per method, forget quality per floor and arm (report fold), paired differences,
    hypervolume, matched utility, the winner's curse and the reference-free signals."""
    lines = ["# UIPE study", "", "```", command, "```", "",
             f"Seeds: {', '.join(str(s) for s in agg['seeds'])}.",
             "Forget quality (report fold): geometric mean [95% t interval over seeds]; (k/n): k of n seeds",
             "reached the floor. Differences: per-seed log10 forget quality, over the seeds where both arms reached",
             "the floor; wins: seeds where UIPE is higher, ties: the same forget quality (often the same point).", ""]
    if not agg["methods"]:
        lines.append("No methods were recorded.")
    for method, m in agg["methods"].items():
        n = len(m["seeds"])
        lines += [f"## {method} ({n} seed{'s' * (n != 1)})", ""]
        # an arm no seed ran (study.more_baseline: false) gets no column
        arms_run = [a for a in m["arms"] if a != MORE or m["hypervolume"][MORE]["n"]]
        pairs = pairs_of(list(m["arms"]))
        pairs_run = [p for p in m["paired"] if pairs[p][1] in arms_run]
        rows = []
        for fk in (floor_key(f) for f in agg["floors"]):
            arms = [geo(m["arms"][a][fk][REPORTED], m["arms"][a][fk]["feasible_seeds"], n) for a in arms_run]
            rows.append([fk, *arms, *(diff(m["paired"][p][fk][REPORTED]) for p in pairs_run)])
        lines += md_table(["floor", *(label(a) for a in arms_run), *(label(p) for p in pairs_run)], rows) + [""]
        if any(m["arms"][UIPE][floor_key(f)][CROSSFITTED]["n"] for f in agg["floors"]):
            rows = []
            for fk in (floor_key(f) for f in agg["floors"]):
                arms = [geo(m["arms"][a][fk][CROSSFITTED], m["arms"][a][fk]["feasible_seeds"], n) for a in arms_run]
                rows.append([fk, *arms, *(diff(m["paired"][p][fk][CROSSFITTED]) for p in pairs_run)])
            lines += ["Cross-fitted (chosen on each fold, read on the other, geometric mean of the two reads):", ""]
            lines += md_table(["floor", *(label(a) for a in arms_run), *(label(p) for p in pairs_run)], rows) + [""]
        hv = [[label(a), ci(m["hypervolume"][a], ".3f")] for a in arms_run]
        hv += [[label(p), diff(m["hypervolume_paired"][p], "", "+.3f")] for p in pairs_run]
        lines += md_table(["hypervolume", "mean [95% interval]"], hv) + [""]
        forms = m.get("matched_forms", {})
        rows = [[fk, diff(m["matched_utility"][fk] | {"ties": 0}, "", "+.3f"),
                 *(diff(forms[a][fk] | {"ties": 0}, "", "+.3f") for a in forms),
                 ci(m["winners_curse"][fk], "+.2f") + " log10" * (m["winners_curse"][fk]["mean"] is not None)]
                for fk in (floor_key(f) for f in agg["floors"])]
        lines += md_table(["floor", "matched utility (UIPE - longer base run at equal forget prob.)",
                           *(f"matched utility ({a})" for a in forms),
                           "winner's curse (UIPE, log10 select - report)"], rows) + [""]
        if m["signals"]:
            rows = [[s, ci(v["spearman"], "+.2f"), ci(v["regret"])] for s, v in m["signals"].items()]
            lines += md_table(["signal", "Spearman", "regret"], rows) + [""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots

def _front(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(x, y) sorted by x, y clipped at 1e-300 for the log scale."""
    pts = sorted((x, max(y, FQ_FLOOR)) for x, y in points)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_fronts(seeds: Sequence[SeedResult | Mapping[str, Any]], out: Path,
                floors: Sequence[float] | None = None) -> Path:
    """One subplot per method: each seed's fronts, forget quality (log) against utility / theta_ini's utility;
    UIPE solid with dots, `more` dashed, base markers only, one colour per seed; dotted lines at the floors
    (by default the floors recorded in the arms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = seed_results(seeds)
    by_method = _by_method(results)
    if floors is None:
        floors = sorted({f for recs in by_method.values() for _, rec in recs for f in rec.floors()}, reverse=True)
    colours = {r.seed: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(results)}
    fig, axes = plt.subplots(1, max(1, len(by_method)), figsize=(5.5 * max(1, len(by_method)), 4.5), squeeze=False)
    for ax, (method, recs) in zip(axes[0], by_method.items()):
        for seed, rec in recs:
            c = colours[seed]
            # `more` gets small markers too, so a one-point front still shows
            styles = ((UIPE, "o-"), (MORE, "^--"), (BASE, "s"), ("groups", "d:"), ("weighted", "v-."),
                      ("anchor", "x:"))
            for arm, style in styles:
                xs, ys = _front(rec.fronts.get(arm, ()))
                ax.plot(xs, ys, style, color=c, ms=3 if arm == MORE else 4,
                        mfc="none" if arm == BASE else c, label=f"seed {seed}" if arm == UIPE else None)
        for f in floors:
            ax.axvline(f, color="grey", ls=":", lw=1)
        ax.set(yscale="log", xlabel="utility / theta_ini utility", ylabel="forget quality", title=method)
    # the key once for the figure: in each panel's title it ran into the next panel's once forms were added
    arms = {arm for recs in by_method.values() for _, rec in recs for arm in rec.arms}
    key = ["UIPE (solid)", "more (dashed)", "base (squares)"] + [
        text for arm, text in (("groups", "groups (diamonds)"), ("weighted", "weighted (triangles)"),
                               ("anchor", "anchor (x)")) if arm in arms]
    fig.suptitle(", ".join(key) + "; one colour per seed", fontsize=9)
    return finish_figure(fig, axes[0], out)


def plot_differences(agg: dict, out: Path) -> Path:
    """One subplot per method: per floor, the paired UIPE - base and UIPE - more log10 forget quality (report
    fold) with 95% interval error bars; a line at 0 (no difference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = agg["methods"]
    fks = [floor_key(f) for f in agg["floors"]]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(5 * max(1, len(methods)), 4), squeeze=False)
    for ax, (method, m) in zip(axes[0], methods.items()):
        shown = list(m["paired"])
        for j, (pair, marker) in enumerate(zip(shown, ("o", "s", "d", "D", "v", "^", "x", "+"))):
            name = label(pair)
            for i, fk in enumerate(fks):
                t = m["paired"][pair][fk][REPORTED]
                if t["mean"] is None:
                    continue
                err = None if t["low"] is None else [[t["mean"] - t["low"]], [t["high"] - t["mean"]]]
                # the pairs side by side at each floor, so their error bars do not overlap
                ax.errorbar([i + (j - (len(shown) - 1) / 2) * 0.6 / len(shown)], [t["mean"]], yerr=err, fmt=marker,
                            color=f"C{j}", capsize=4, label=name)
                name = None
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(range(len(fks)), fks)
        ax.set(xlabel="utility floor (x theta_ini utility)", ylabel="delta log10 forget quality (report)",
               title=f"{method}: paired differences over seeds")
    return finish_figure(fig, axes[0], out)


