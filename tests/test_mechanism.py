"""The mechanism experiments' parts without Ray: the reconstruction arms' data and configurations differ only in the
named facts, the arms' comparison worked by hand, and the sweep's settings and table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from uipe.config import load_config
from uipe.data import load_split
from uipe.data.synth import write_benchmark
from uipe.errors import UipeError
from uipe.study.aggregate import aggregate, markdown as study_markdown
from uipe.study.mechanism_report import compare, markdown, plot
from uipe.study.reconstruction import arm_configs, derive_data, prepare_workers
from uipe.study.records import BASE, MORE, UIPE, ArmPoint, MethodRecord, SeedResult
from uipe.study.sweep import gains, markdown as sweep_markdown, parse_vary, plot as sweep_plot, setting_configs

T_975_1 = 12.706205  # t_{0.975, 1}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "uipe_meta.json"}


def test_derived_worlds_differ_from_the_target_world_only_in_the_forget_authors_related_facts(tmp_path: Path) -> None:
    world = write_benchmark(tmp_path / "with", authors=40, seed=3)
    authors = {r.author for r in load_split(world, "forget05")}
    related = load_split(world, "related")
    mine = [r for r in related if r.author in authors]
    assert len(authors) == 2 and len(mine) == 10  # 5 tied facts per forget05 author

    without = derive_data(world, tmp_path / "without", "forget05", "without")
    changed = {k for k, v in _files(without).items() if _files(world)[k] != v}
    assert changed == {"related.json"} and set(_files(without)) == set(_files(world))
    assert load_split(without, "related") == [r for r in related if r.author not in authors]
    # evaluated on the same related items: the perturbed file is untouched
    assert load_split(without, "related_perturbed") == load_split(world, "related_perturbed")

    both = derive_data(world, tmp_path / "related", "forget05", "related")
    assert {k for k, v in _files(both).items() if _files(world)[k] != v} == {"forget05.json"}
    assert load_split(both, "forget05") == load_split(world, "forget05") + mine
    assert load_split(both, "forget05_perturbed") == load_split(world, "forget05_perturbed")
    # forget10's authors hold every related fact: `without` then has no related training file at all
    emptied = derive_data(world, tmp_path / "without10", "forget10", "without")
    assert not (emptied / "related.json").exists() and (emptied / "related_perturbed.json").is_file()
    # built once: a second call reuses the folder (same bytes, same record)
    stamp = (without / "related.json").stat().st_mtime_ns
    derive_data(world, tmp_path / "without", "forget05", "without")
    assert (without / "related.json").stat().st_mtime_ns == stamp


def test_a_world_without_related_facts_cannot_run_the_experiment(tmp_path: Path) -> None:
    world = write_benchmark(tmp_path / "w", authors=40, seed=3, tied=0)
    assert not list(world.glob("related*"))  # no tied facts: no related split at all, not an empty one
    with pytest.raises(UipeError, match="no related.json; the reconstruction experiment needs"):
        derive_data(world, tmp_path / "out", "forget05", "without")
    assert not (tmp_path / "out").exists()


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_the_arms_configurations_differ_only_in_data_start_and_reference(tmp_path: Path) -> None:
    cfgs = arm_configs(load_config(), tmp_path, 4)
    leaves = {arm: _leaves(c.model_dump(mode="json")) for arm, c in cfgs.items()}
    assert leaves["with"]["data.synth.seed"] == leaves["with"]["train.seed"] == 4
    for arm, named in (("without", {"data.source", "eval.retain_reference", "model.base", "prepare.retain"}),
                       ("related", {"data.source", "eval.retain_reference", "model.target"})):
        diff = {k for k in leaves["with"] if leaves[arm][k] != leaves["with"][k]}
        assert diff == named | {"name"}, arm
        assert leaves[arm]["eval.retain_reference"] == str(tmp_path / "with" / "retain_reference.json")
        assert leaves[arm]["data.source"] == str(tmp_path / arm / "data")
    assert cfgs["without"].model.base == str(tmp_path / "with" / "models" / "base")
    assert cfgs["related"].model.target == str(tmp_path / "with" / "models" / "target")
    # the tiny preset trains target and retain side by side on one worker each: `without`'s target gets one too
    assert prepare_workers(cfgs["with"]) == 1


def _traj(start: tuple[float, float, float], end: tuple[float, float, float]) -> list[dict]:
    rows = []
    for epoch, (prob, fq, related) in ((0, start), (1, end)):
        rows.append({"epoch": epoch, "forget_prob": prob, "forget_rougeL": prob, "forget_quality": fq,
                     "related_prob": related, "related_rougeL": related, "model_utility": 0.8})
    return rows


SEEDS = [
    {"seed": 0, "methods": {"ga": {"with": _traj((0.9, 1e-5, 0.8), (0.5, 1e-3, 0.7)),
                                   "without": _traj((0.9, 1e-5, 0.2), (0.3, 1e-2, 0.1)),
                                   "related": _traj((0.9, 1e-5, 0.8), (0.4, 1e-2, 0.3))}}},
    {"seed": 1, "methods": {"ga": {"with": _traj((0.8, 1e-4, 0.7), (0.6, 1e-2, 0.6)),
                                   "without": _traj((0.8, 1e-4, 0.3), (0.5, 1e-2, 0.2)),
                                   "related": _traj((0.8, 1e-4, 0.7), (0.7, 1e-2, 0.2))}}},
]


def test_arms_are_compared_at_the_last_epoch_by_paired_differences() -> None:
    c = compare(SEEDS)["ga"]
    # without - with, forget prob: -0.2, -0.1 -> mean -0.15, sd 0.0707107, half 12.706205 * 0.0707107 / sqrt 2
    t = c["paired"]["without"]["forget_prob"]
    assert t["mean"] == pytest.approx(-0.15) and t["forgot_more"] == 2
    assert t["high"] - t["mean"] == pytest.approx(T_975_1 * math.sqrt(0.005) / math.sqrt(2))
    # related - with, log10 FQ: -2 -> -2 is +1, -2 -> -2 is 0: mean +0.5, forgot more on one seed (a tie is not more)
    t = c["paired"]["related"]["log10_forget_quality"]
    assert t["mean"] == pytest.approx(0.5) and t["forgot_more"] == 1
    # related - with, forget prob: -0.1 and +0.1 -> mean 0, one seed each way
    assert c["paired"]["related"]["forget_prob"]["mean"] == pytest.approx(0.0)
    assert c["paired"]["related"]["forget_prob"]["forgot_more"] == 1
    assert c["paired"]["without"]["model_utility"]["forgot_more"] is None  # utility has no "forgot" direction
    # the start: `without` never learned the related facts (0.2, 0.3 -> mean 0.25)
    assert c["arms"]["without"]["start"]["related_prob"]["mean"] == pytest.approx(0.25)
    assert c["arms"]["with"]["end"]["log10_forget_quality"]["mean"] == pytest.approx(-2.5)


def test_the_reconstruction_report_and_plot(tmp_path: Path) -> None:
    text = markdown({"command": "uipe experiment reconstruction --seeds 2", "comparison": compare(SEEDS)})
    assert "## ga (seeds 0, 1)" in text and "-0.150 [" in text and "forgot more 2/2" in text
    png = plot(SEEDS, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(UipeError, match="seed 0: no trajectory for method ga, arm without"):
        compare([{"seed": 0, "methods": {"ga": {"with": SEEDS[0]["methods"]["ga"]["with"]}}}])


def test_vary_is_parsed_and_each_value_is_one_validated_configuration() -> None:
    assert parse_vary("data.synth.tied=0, 1,3") == ("data.synth.tied", ["0", "1", "3"])
    for bad in ("data.synth.tied=3", "data.synth.tied=1,1", "=1,2", "data.synth.tied"):
        with pytest.raises(UipeError, match="--vary"):
            parse_vary(bad)
    cfgs = setting_configs(load_config(), "data.synth.ties", ["logical", "arbitrary"])
    assert {k: c.data.synth.ties for k, c in cfgs.items()} == {"ties-logical": "logical", "ties-arbitrary": "arbitrary"}
    with pytest.raises(UipeError, match="--vary data.forget_split=forget50: data.forget_split"):
        setting_configs(load_config(), "data.forget_split", ["forget05", "forget50"])


def _pt(fq: float) -> ArmPoint:
    return ArmPoint(alpha=0.5, epoch=3, utility=0.75, utility_ratio=0.96, forget_quality=fq, forget_quality_select=fq,
                    forget_quality_report=fq, forget_prob=0.4)


def _seed(seed: int, base: float, uipe: float) -> SeedResult:
    arms = {BASE: {0.9: _pt(base)}, MORE: {0.9: None}, UIPE: {0.9: _pt(uipe)}}
    return SeedResult(seed, {"ga": MethodRecord(arms, hypervolume={BASE: 0.1, MORE: None, UIPE: 0.3})})


def test_the_sweep_tabulates_uipe_minus_base_per_setting(tmp_path: Path) -> None:
    studies = {"tied-0": aggregate([_seed(0, 1e-3, 1e-3), _seed(1, 1e-3, 1e-3)], [0.9]),
               "tied-5": aggregate([_seed(0, 1e-4, 1e-2), _seed(1, 1e-3, 1e-2)], [0.9])}
    g = gains(studies)["ga"]
    assert g["tied-0"]["floors"]["0.9"]["mean"] == 0.0 and g["tied-0"]["floors"]["0.9"]["ties"] == 2
    assert g["tied-5"]["floors"]["0.9"]["mean"] == pytest.approx(1.5) and g["tied-5"]["floors"]["0.9"]["wins"] == 2
    assert g["tied-5"]["hypervolume"]["mean"] == pytest.approx(0.2)
    result = {"command": "c", "key": "data.synth.tied", "gains": {"ga": g}}
    text = sweep_markdown(result)
    assert "| tied-5 | +1.50 [" in text and "wins 2/2" in text
    assert sweep_plot(result, tmp_path / "s.png").stat().st_size > 5000
    assert json.loads(json.dumps(g)) == g  # JSON-shaped, as sweep.json stores it
    # each setting's study.md leaves out the arm it did not run (study.more_baseline: false)
    study_md = study_markdown(studies["tied-5"], "uipe study")
    assert "| floor | base | UIPE | UIPE - base |" in study_md and "more" not in study_md
