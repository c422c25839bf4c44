"""uipe study's parts without Ray: author folds, each arm's choice at a floor, matched utility, hypervolume, signal
checks (numbers worked by hand); then the command's refusals of bad input, which write nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from uipe.data.records import TofuRecord, author_folds
from uipe.errors import UipeError
from uipe.decisions import best_at_floors
from uipe.report import from_csv, to_csv
from uipe.results import TrialResult
from uipe.study.arms import at_floors, hypervolume, matched_utility, method_record, signal_checks
from uipe.study.aggregate import aggregate
from uipe.study.records import ArmPoint, SeedResult, SignalCheck, read_seeds


def _rec(author: str | None, i: int) -> TofuRecord:
    return TofuRecord(f"q{i}", f"a{i}", None, ("x",), author)


def test_author_folds_alternate_whole_authors_in_order_of_appearance() -> None:
    recs = [_rec(a, i) for i, a in enumerate("AABBCCA")]
    # A (1st) and C (3rd) select, B (2nd) reports; A's late item stays with A
    assert author_folds(recs) == ([0, 1, 4, 5, 6], [2, 3])
    # TOFU's files name no author: blocks of 20 questions
    select, report = author_folds([_rec(None, i) for i in range(50)])
    assert select == list(range(20)) + list(range(40, 50)) and report == list(range(20, 40))
    with pytest.raises(UipeError, match="1 author"):
        author_folds([_rec("A", i) for i in range(4)])


def _t(alpha: float, epoch: int, fq: float, mu: float, prob: float = 0.5, sel: float | None = None,
       ks: float = math.nan, auc: float = math.nan) -> TrialResult:
    sel = fq if sel is None else sel
    return TrialResult(f"{alpha}-{epoch}", "ok", alpha, epoch, objective=sel, utility=mu, metrics={
        "forget_quality": fq, "forget_quality_select": sel, "forget_quality_report": fq / 2, "model_utility": mu,
        "forget_prob": prob, "holdout_ks": ks, "mia_loss_auc": auc})


SEARCH = [_t(0.0, 1, 0.01, 0.78, 0.8), _t(0.0, 2, 0.02, 0.74, 0.6), _t(1.0, 1, 0.05, 0.765, 0.5),
          _t(2.0, 2, 0.40, 0.66, 0.2), TrialResult.failed("f", 3.0, 2, "boom")]


def test_each_arm_chooses_its_best_point_above_each_floor() -> None:
    # theta_ini's utility 0.8: floors 0.95 -> 0.76, 0.9 -> 0.72, 0.8 -> 0.64 (utilities kept off the edges)
    base = at_floors([r for r in SEARCH if r.alpha == 0], 0.8, [0.95, 0.9, 0.8])
    assert base[0.95].epoch == 1 and base[0.9].epoch == 2 and base[0.8].forget_quality == 0.02
    uipe = at_floors(SEARCH, 0.8, [0.95, 0.9, 0.8])
    assert (uipe[0.95].alpha, uipe[0.9].alpha, uipe[0.8].alpha) == (1.0, 1.0, 2.0)
    assert uipe[0.8].utility_ratio == pytest.approx(0.66 / 0.8)
    assert at_floors(SEARCH, 0.8, [1.0])[1.0] is None  # nothing reaches theta_ini's own utility
    # the run's own table: the same rule, base and UIPE side by side
    floors = best_at_floors(SEARCH, 0.8, (0.95, 0.8))
    assert floors["0.95"]["base"]["epoch"] == 1 and floors["0.8"]["uipe"]["alpha"] == 2.0


def _point(forget_prob: float, utility: float) -> ArmPoint:
    return ArmPoint(1.0, 2, utility, utility / 0.8, 0.1, 0.1, 0.1, forget_prob)


def test_matched_utility_interpolates_the_base_trajectory_in_forget_probability() -> None:
    trajectory = [(0.9, 0.80), (0.5, 0.70), (0.1, 0.50)]
    # at forget prob 0.3: halfway between (0.1, 0.50) and (0.5, 0.70) -> 0.60; UIPE at 0.66 is 0.06 better
    assert matched_utility(_point(0.3, 0.66), trajectory) == pytest.approx(0.06)
    assert matched_utility(_point(0.05, 0.66), trajectory) is None  # beyond the base
    assert matched_utility(None, trajectory) is None


def test_hypervolume_by_hand() -> None:
    # (x = log10 FQ, y = utility ratio) with ref (0, 0.8): rectangles [0,2]x[0.8,0.9] (0.2) and [0,3]x[0.8,0.85]
    # (0.15) overlap in [0,2]x[0.8,0.85] (0.1): 0.25. A point below the reference adds nothing.
    assert hypervolume([(2.0, 0.9), (3.0, 0.85), (5.0, 0.7)], (0.0, 0.8)) == pytest.approx(0.25)
    assert hypervolume([(2.0, 0.9), (1.0, 0.85)], (0.0, 0.8)) == pytest.approx(0.2)  # dominated: no extra area
    assert hypervolume([], (0.0, 0.8)) == 0.0


def test_signal_checks_rank_correlation_and_regret() -> None:
    # holdout KS ranks the four trials as forget quality does (rho 1); the loss attack's closeness to 0.5 ranks them
    # backwards (AUC 0.5 on the worst forgetting). Above utility 0.7 forget quality picks FQ 0.05 (alpha 1); the
    # MIA signal picks FQ 0.01 (its closeness 1.0): regret log10(0.05 / 0.01) = 0.699.
    rows = [_t(0.0, 1, 0.01, 0.78, ks=0.1, auc=0.5), _t(0.0, 2, 0.02, 0.74, ks=0.2, auc=0.6),
            _t(1.0, 1, 0.05, 0.765, ks=0.3, auc=0.7), _t(2.0, 2, 0.40, 0.66, ks=0.9, auc=0.9)]
    out = signal_checks(rows, 0.7)
    assert out["holdout_ks"] == SignalCheck(spearman=pytest.approx(1.0), regret=pytest.approx(0.0))
    assert out["mia_loss_closeness"].spearman == pytest.approx(-1.0)
    assert out["mia_loss_closeness"].regret == pytest.approx(math.log10(5))


def test_method_record_keeps_every_arm_and_the_trajectory_from_theta_ini() -> None:
    longer = [_t(0.0, e, fq, mu, prob) for e, fq, mu, prob in [(1, 0.01, 0.78, 0.8), (2, 0.02, 0.74, 0.6),
                                                                (3, 0.08, 0.70, 0.4), (4, 0.3, 0.62, 0.1)]]
    start = {"model_utility": 0.8, "forget_quality": 1e-4, "forget_prob": 0.9}
    rec = method_record(SEARCH, longer, start, 0.76, [0.95, 0.8], 2, 4).to_json()  # as study.json keeps it
    assert rec["arms"]["more"]["0.8"]["epoch"] == 3 and rec["arms"]["base"]["0.8"]["epoch"] == 2
    # UIPE at 0.8: alpha 2, forget prob 0.2, utility 0.66; the longer run passes 0.2 between epoch 3 (0.4, 0.70)
    # and epoch 4 (0.1, 0.62): 0.62 + (0.2 - 0.1) / 0.3 * 0.08 = 0.64667 -> +0.01333
    assert rec["matched_utility"]["0.8"] == pytest.approx(0.66 - (0.62 + 0.08 / 3))
    # reference: theta_ini's log10 FQ (-4) and the lowest floor; base (x, y): (2, 0.975), (2.301, 0.925)
    assert rec["hypervolume"]["base"] == pytest.approx(2 * (0.975 - 0.925) + math.log10(0.02 / 1e-4) * 0.125)
    assert rec["longer_epochs"] == 4 and len(rec["fronts"]["more"]) == 4


def test_method_record_without_the_more_baseline_leaves_it_empty_not_zero() -> None:
    # study.more_baseline: false passes no longer run: the arm has no point at any floor and no hypervolume (None,
    # so the aggregate drops it), while base and UIPE are as with it
    start = {"model_utility": 0.8, "forget_quality": 1e-4, "forget_prob": 0.9}
    rec = method_record(SEARCH, [], start, 0.76, [0.95, 0.8], 2, 4).to_json()  # as study.json keeps it
    assert rec["arms"]["more"] == {"0.95": None, "0.8": None} and rec["hypervolume"]["more"] is None
    assert rec["arms"]["base"]["0.8"]["epoch"] == 2 and rec["hypervolume"]["base"] > 0
    assert rec["matched_utility"] == {"0.95": None, "0.8": None}


def _seed_result(seed: int) -> SeedResult:
    longer = [_t(0.0, e, fq, mu, prob) for e, fq, mu, prob in [(1, 0.01, 0.78, 0.8), (2, 0.02, 0.74, 0.6),
                                                                (3, 0.08, 0.70, 0.4), (4, 0.3, 0.62, 0.1)]]
    start = {"model_utility": 0.8, "forget_quality": 1e-4, "forget_prob": 0.9, "related_prob": None}
    return SeedResult(seed, {"ga": method_record(SEARCH, longer, start, 0.76, [0.95, 0.8], 2, 4),
                             "npo": method_record(SEARCH, [], start, 0.76, [0.95, 0.8], 2, 4)}, f"st/seed-{seed}")


def test_a_seed_result_round_trips_through_its_json_unchanged(tmp_path: Path) -> None:
    res = _seed_result(3)
    text = json.dumps(res.to_json(), indent=2, sort_keys=True)  # as study.json is written (uipe.io)
    again = SeedResult.from_json(json.loads(text), "study.json: seeds #0")
    assert again == res and json.dumps(again.to_json(), indent=2, sort_keys=True) == text
    # study.json's layout: what a study folder made before the records were typed holds, and docs/RESULTS.md reads
    layout = res.to_json()["methods"]["ga"]
    assert sorted(layout) == ["arms", "epochs", "fronts", "hypervolume", "longer_epochs", "matched_utility",
                              "signals", "theta_ini"]
    assert sorted(layout["arms"]["uipe"]["0.8"]) == sorted(["alpha", "epoch", "model_utility", "utility_ratio",
                                                              "forget_quality", "forget_quality_select",
                                                              "forget_quality_report", "forget_prob",
                                                              "forget_quality_crossfit"])  # added by issue 26
    old = {k: v for k, v in layout["arms"]["uipe"]["0.8"].items() if k != "forget_quality_crossfit"}
    assert math.isnan(ArmPoint.from_json(old, "a point written before cross-fitting").forget_quality_crossfit)
    (tmp_path / "study.json").write_text(json.dumps({"seeds": [res.to_json(), _seed_result(4).to_json()]}))
    assert read_seeds(tmp_path / "study.json") == [res, _seed_result(4)]


@pytest.mark.parametrize("path, key, where", [
    (("methods", "ga", "arms", "uipe", "0.8", "forget_quality_report"), "forget_quality_report",
     "seeds #1 (seed 4), method ga, arm uipe, floor 0.8"),
    (("methods", "npo", "arms", "more"), "more", "seeds #1 (seed 4), method npo, arms"),
    (("methods", "ga", "signals", "holdout_ks", "regret"), "regret", "seeds #1 (seed 4), method ga, signal holdout_ks"),
    (("methods",), "methods", "seeds #1 (seed 4)"),
    (("seed",), "seed", "seeds #1"),
])
def test_a_seed_record_missing_a_required_key_fails_with_one_line_naming_it_and_where(
        tmp_path: Path, path: tuple[str, ...], key: str, where: str) -> None:
    bad = _seed_result(4).to_json()
    parent = bad
    for k in path[:-1]:
        parent = parent[k]
    del parent[path[-1]]
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"seeds": [_seed_result(3).to_json(), bad]}))
    with pytest.raises(UipeError) as e:
        read_seeds(study)
    assert str(e.value) == f"{study}: {where}: no '{key}'"
    with pytest.raises(UipeError, match=f"^seed result #0.*: no '{key}'$"):  # the aggregate reads the same way
        aggregate([bad], [0.95, 0.8])


def test_results_csv_reads_back_as_it_was_written() -> None:
    again = from_csv(to_csv(SEARCH))
    assert to_csv(again) == to_csv(SEARCH)
    assert [r.ok for r in again].count(False) == 1 and again[0].metric("forget_quality_report") == 0.005


def _study(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uipe.cli", "study", "--run-dir", str(tmp_path / "st"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0,1,1"], "seed 1 appears more than once"),
    (["--set", "study.floors=[0.9,1.5]"], "floor 1.5 is outside (0, 1]"),
    (["--seeds", "two"], "--seeds 'two'"),
    (["--set", "prepare.retain=false"], "needs a retain model"),
    (["--set", "data.benchmark=muse", "--set", "data.forget_split=raw/forget"], "on muse run scripts/muse_seeds.py"),
])
def test_bad_study_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, args: list[str], words: str) -> None:
    proc = _study(tmp_path, *args)
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "st").exists()


def test_a_study_folder_of_another_configuration_is_refused_untouched(tmp_path: Path) -> None:
    from uipe.config import load_config
    from uipe.study.driver import IDENTITY_FILE, _identity
    from uipe.io import atomic_write_json

    folder = tmp_path / "st"
    folder.mkdir()
    atomic_write_json(folder / IDENTITY_FILE, _identity(load_config(None, ["unlearn.lr=0.5"])))
    before = sorted(p.name for p in folder.iterdir())
    proc = _study(tmp_path, "--seeds", "3")
    assert proc.returncode == 2 and "another configuration (unlearn differs)" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


# ---- the command end to end: two seeds of a reduced world, killed once, resumed ---------------------------------
REDUCED = ["data.synth.authors=20", "data.synth.facts=4", "data.forget_split=forget10", "model.tiny.hidden_size=32",
           "model.tiny.num_hidden_layers=2", "prepare.epochs=20", "prepare.min_rouge=0", "prepare.max_utility_gap=null",
           "unlearn.methods=[ga]", "unlearn.epochs=2", "unlearn.lr=3e-3", "search.num_samples=3",
           "eval.max_new_tokens=16"]


def _kill_when(proc: subprocess.Popen, ready: Path, timeout: float = 600) -> None:
    """SIGKILL the study's process group once `ready` exists (as a lost node or an OOM kill would)."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the study ended before the point where the test interrupts it"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_study_of_two_seeds_resumes_after_a_kill_and_aggregates_per_seed_values(ray_session, tmp_path: Path) -> None:
    import json
    import os

    from mlflow import MlflowClient

    from conftest import run_uipe
    from uipe.data import load_split
    from uipe.study.aggregate import log10_fq, t_interval

    root = tmp_path / "st"
    args = ["study", "--run-dir", str(root), "--seeds", "2", *[x for s in REDUCED for x in ("--set", s)]]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with open(tmp_path / "first.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uipe.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        # interrupted in seed 1's more-iterations baseline (which trains in the unlearning fit after the method's
        # own run, before the searches) once its first epoch is written, seed 0 finished
        _kill_when(proc, root / "seed-1" / "longer" / "unlearn" / "ga" / "epoch_01")
    kept = {p: p.stat().st_mtime_ns for p in [root / "seed-0" / "search" / "ga" / "result.json",
                                              root / "seed-0" / "models" / "target" / "model.safetensors",
                                              root / "seed-1" / "models" / "target" / "model.safetensors",
                                              root / "seed-1" / "unlearn" / "ga" / "epoch_02" / "model.safetensors"]}
    assert not (root / "study.json").exists()
    assert run_uipe(args, ray_session, tmp_path / "second.txt") == 0, (tmp_path / "second.txt").read_text()[-3000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # resumed: what was done was reused

    study = json.loads((root / "study.json").read_text())
    seeds = {r["seed"]: r for r in study["seeds"]}
    assert sorted(seeds) == [0, 1] and all(sorted(r["methods"]) == ["ga"] for r in seeds.values())
    for seed, r in seeds.items():
        # fresh worlds: each seed its own synthetic data; folds disjoint by author
        forget = load_split(str(root / f"seed-{seed}" / "data"), "forget10_perturbed")
        select, report = author_folds(forget)
        assert not {forget[i].author for i in select} & {forget[i].author for i in report}
        for method, m in r["methods"].items():
            # the more-iterations baseline trained twice the epochs UIPE's search could use
            short = json.loads((root / f"seed-{seed}" / "unlearn" / method / "manifest.json").read_text())
            long = json.loads((root / f"seed-{seed}" / "longer" / "unlearn" / method / "manifest.json").read_text())
            assert (len(short["epochs"]), len(long["epochs"]), m["longer_epochs"]) == (2, 4, 4)
            assert {p["epoch"] for p in m["arms"]["uipe"].values() if p} <= {1, 2}
    assert (load_split(str(root / "seed-0" / "data"), "forget10")[0].question
            != load_split(str(root / "seed-1" / "data"), "forget10")[0].question)

    # the interval is the t interval of the per-seed values: recomputed here from study.json's seeds, at every floor
    # where both seeds had a point (at least one, or the reduced world is no longer a test of anything)
    agg, checked = study["aggregate"]["methods"]["ga"], 0
    for floor in study["aggregate"]["floors"]:
        fk = str(float(floor))
        arms = [seeds[s]["methods"]["ga"]["arms"] for s in (0, 1)]
        if not all(a["uipe"][fk] and a["base"][fk] for a in arms):
            continue
        values = [log10_fq(a["uipe"][fk]["forget_quality_report"]) for a in arms]
        assert agg["arms"]["uipe"][fk]["log10_fq_report"] == pytest.approx(t_interval(values))
        diffs = [log10_fq(a["uipe"][fk]["forget_quality_report"]) - log10_fq(a["base"][fk]["forget_quality_report"])
                 for a in arms]
        got = agg["paired"]["uipe-base"][fk]["log10_fq_report"]
        assert got["mean"] == pytest.approx(t_interval(diffs)["mean"]) and got["wins"] == sum(d > 0 for d in diffs)
        checked += 1
    assert checked >= 1
    assert all((root / f).stat().st_size > 5000 for f in ("fronts.png", "differences.png"))
    assert "uipe study --run-dir" in (root / "study.md").read_text()

    # MLflow: the study's run, a nested run per seed, and each seed's searches nested under it
    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("uipe-study-tiny")
    runs = c.search_runs([exp.experiment_id], max_results=500)
    study_run = next(r for r in runs if r.data.tags.get("uipe.kind") == "study")
    seed_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert sorted(r.info.run_name for r in seed_runs) == ["seed-0", "seed-1"]
    searches = [r for r in runs if r.data.tags.get("uipe.kind") == "search"]
    assert len(searches) == 2 and {r.data.tags["mlflow.parentRunId"] for r in searches} == {
        r.info.run_id for r in seed_runs}
    assert study_run.info.status == "FINISHED" and "study.json" in {a.path for a in c.list_artifacts(
        study_run.info.run_id)}


def test_a_form_arm_is_chosen_compared_and_round_trips_like_uipe() -> None:
    """study.forms: a groups arm (its own search's trials) gets floors, matched utility against the longer run's
    trajectory, a hypervolume, and pairs against `more` and UIPE in the aggregate; study.json reads it back."""
    longer = [_t(0.0, e, fq, mu, prob) for e, fq, mu, prob in [(1, 0.01, 0.78, 0.8), (2, 0.02, 0.74, 0.6),
                                                                (3, 0.08, 0.70, 0.4), (4, 0.3, 0.62, 0.1)]]
    start = {"model_utility": 0.8, "forget_quality": 1e-4, "forget_prob": 0.9}
    groups = [_t(0.0, 2, 0.02, 0.78, 0.6), _t(0.9, 2, 0.2, 0.68, 0.2)]  # a point UIPE's search did not reach
    rec = method_record(SEARCH, longer, start, 0.76, [0.95, 0.8], 2, 4, {"groups": groups})
    # at 0.8 (utility >= 0.64): groups' best is (0.2, 0.68); the trajectory at forget prob 0.2 is 0.64667
    assert rec.arms["groups"][0.8].forget_quality == 0.2
    assert rec.matched_forms["groups"][0.8] == pytest.approx(0.68 - (0.62 + 0.08 / 3))
    again = SeedResult.from_json(json.loads(json.dumps(SeedResult(1, {"ga": rec}).to_json())), "study.json")
    assert again.methods["ga"] == rec
    agg = aggregate([SeedResult(1, {"ga": rec}), SeedResult(2, {"ga": rec})], [0.95, 0.8])["methods"]["ga"]
    assert {"groups-more", "groups-uipe"} <= set(agg["paired"])
    uipe_fq = rec.arms["uipe"][0.8].forget_quality_report
    want = math.log10(0.2 / 2) - math.log10(uipe_fq)  # the report fold holds fq / 2 in _t
    assert agg["paired"]["groups-uipe"]["0.8"]["log10_fq_report"]["mean"] == pytest.approx(want)
    assert agg["matched_forms"]["groups"]["0.8"]["wins"] == 2


def test_cross_fitting_chooses_on_each_fold_and_reads_the_other() -> None:
    # A: selection fold 0.9, report fold 0.05; B: selection 0.3, report 0.2 (_t halves fq for the report fold).
    # Chosen on the selection fold: A, read on the report fold: 0.05. Chosen on the report fold: B, read on the
    # selection fold: 0.3. Cross-fitted: sqrt(0.05 * 0.3) = 0.12247.
    rows = [_t(1.0, 2, 0.1, 0.75, sel=0.9), _t(2.0, 2, 0.4, 0.70, sel=0.3)]
    p = at_floors(rows, 0.8, [0.8])[0.8]
    assert p.alpha == 1.0 and p.forget_quality_report == pytest.approx(0.05)
    assert p.forget_quality_crossfit == pytest.approx(math.sqrt(0.05 * 0.3))
    # above the 0.9 floor (utility >= 0.72) only A is left: both folds choose it, sqrt(0.05 * 0.9)
    assert at_floors(rows, 0.8, [0.9])[0.9].forget_quality_crossfit == pytest.approx(math.sqrt(0.05 * 0.9))
