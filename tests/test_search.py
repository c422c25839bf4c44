"""The alpha search on the trained tiny world: Ray Tune + Optuna, MLflow parent/child runs, the registry, resume.

The module's searches in this process share one pool of trial processes, as a `uipe run`'s searches do
(uipe.search.pool.shared_trial_pool): each would otherwise start its own (two processes importing torch and
transformers and loading the model, ~6 s on 2 cores). The pool holds the CPUs it was given, so a test that starts
work in another process (a CLI search, whose pool needs them) asks for `cpus_free` first."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import copy_run, mlflow_server, rest
from uipe.errors import UipeError
from uipe.search.driver import run_search
from uipe.model_registry import CHAMPION
from uipe.tracking import client, experiment_name, tracking_uri

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _children(cfg, paths, parent: str) -> list:
    c = client(tracking_uri(cfg, paths))
    exp = c.get_experiment_by_name(experiment_name(cfg))
    return c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


@pytest.fixture(scope="module", autouse=True)
def one_pool_for_the_modules_searches() -> Iterator[None]:
    from uipe.search.pool import shared_trial_pool

    with shared_trial_pool():
        yield


@pytest.fixture
def cpus_free() -> None:
    """The module's pool given back (the next search in this process starts another)."""
    from uipe.search.pool import release_shared

    release_shared()


@pytest.fixture(scope="module")
def ga_search(unlearned_run, tiny_cfg) -> dict:
    return run_search(tiny_cfg, unlearned_run, "ga")


def test_search_logs_a_parent_with_one_child_per_trial_and_picks_a_feasible_point(ga_search, unlearned_run,
                                                                                   tiny_cfg) -> None:
    s = ga_search
    assert s.trials == 8 and s.failed == 0
    children = _children(tiny_cfg, unlearned_run, s.parent_run_id)
    assert len(children) == 8 and len({r.data.tags["uipe.trial_id"] for r in children}) == 8
    for run in children:
        assert {"forget_quality", "model_utility", "trial_seconds"} <= set(run.data.metrics)
        assert {"alpha", "epoch"} <= set(run.data.params)
    # The base method (alpha 0) was evaluated at every epoch, first.
    base_epochs = sorted(int(r.data.params["epoch"]) for r in children if float(r.data.params["alpha"]) == 0.0)
    assert base_epochs == list(range(1, tiny_cfg.unlearn.epochs + 1))
    chosen = s.chosen
    assert s.feasible and chosen["model_utility"] >= s.utility_threshold
    feasible = [r for r in children if r.data.metrics["model_utility"] >= s.utility_threshold]
    assert chosen["forget_quality"] == max(r.data.metrics["forget_quality"] for r in feasible)
    assert chosen["forget_quality"] >= s.base["forget_quality"]
    out = unlearned_run.search("ga")
    assert len((out / "results.csv").read_text().splitlines()) == 9
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "alpha_curves.png").stat().st_size > 10_000
    artifacts = {a.path for a in client(tracking_uri(tiny_cfg, unlearned_run)).list_artifacts(s.parent_run_id)}
    assert {"results.csv", "chosen.yaml", "pareto.png", "alpha_curves.png", "model"} <= artifacts


def test_the_champion_is_registered_and_loads_with_transformers(ga_search, unlearned_run, tiny_cfg) -> None:
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM

    c = client(tracking_uri(tiny_cfg, unlearned_run))
    version = c.get_model_version_by_alias(ga_search.registered["name"], CHAMPION)
    assert version.tags["alpha"] == str(ga_search.chosen["alpha"])
    local = download_artifacts(artifact_uri=version.source, tracking_uri=tracking_uri(tiny_cfg, unlearned_run))
    model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True)
    assert model.config.model_type == "llama"


def test_a_finished_search_is_reused_not_rerun(ga_search, unlearned_run, tiny_cfg) -> None:
    again = run_search(tiny_cfg, unlearned_run, "ga")
    assert again == ga_search
    assert len(_children(tiny_cfg, unlearned_run, ga_search.parent_run_id)) == 8


def test_a_real_mlflow_server_serves_the_runs_over_rest(ga_search, unlearned_run, tiny_cfg, tmp_path) -> None:
    with mlflow_server(tracking_uri(tiny_cfg, unlearned_run)) as url:
        exp = rest(url, f"experiments/get-by-name?experiment_name={experiment_name(tiny_cfg)}")
        runs = rest(url, "runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]],
                                         "filter": f"tags.mlflow.parentRunId = '{ga_search.parent_run_id}'",
                                         "max_results": 100})["runs"]
        assert len(runs) == 8
        keys = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert {"forget_quality", "model_utility"} <= keys


def test_a_resume_from_unreadable_tune_state_fails_or_starts_anew_but_never_ends_short(unlearned_run, tiny_cfg,
                                                                                      tmp_path) -> None:
    """A Tune state file cut short (a full disk) made Tune log "Failed to restore the run state", restart the
    experiment in the same folder and end after 1 trial of 8, at every resume (found by scripts/chaos.py)."""
    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    space = tmp_path / "ga.yaml"
    space.write_text("method: ga\nalpha: {low: 0.0, high: 1.0}\nepochs: [3]\nsampler: grid\ngrid_step: 0.5\n"
                     "max_concurrent_trials: 1\n")
    cfg = tiny_cfg.model_copy(update={"tracking": tiny_cfg.tracking.model_copy(update={"register_model": False})})
    first = run_search(cfg, paths, "ga", space)
    out = paths.search("ga")
    (out / "result.json").unlink()  # as if the driver had died before writing it
    [state] = (out / "tune").glob("experiment_state-*.json")
    state.write_text("{}")  # whole JSON, but not Tune's: its restore fails, which it would answer by starting over
    with pytest.raises(UipeError, match="Tune could not restore the search's saved state"):
        run_search(cfg, paths, "ga", space, resume=True)
    state.write_bytes(b"")  # cut short: set aside, and with no whole session left the trials start anew
    again = run_search(cfg, paths, "ga", space, resume=True)
    assert again.trials == first.trials == 3 and again.failed == 0
    assert [again.chosen[k] for k in ("alpha", "epoch")] == [first.chosen[k] for k in ("alpha", "epoch")]
    assert again.parent_run_id == first.parent_run_id
    ids = [r.data.tags["uipe.trial_id"] for r in _children(cfg, paths, first.parent_run_id)]
    assert len(ids) == len(set(ids)) == 3  # the first trials' runs replaced by the new ones'
    assert list(out.glob("tune.unreadable-*/unreadable-state/experiment_state-*.json"))


def test_a_truncated_candidate_stops_the_search_before_it_starts(unlearned_run, tiny_cfg, tmp_path) -> None:
    from uipe.search.driver import make_setup

    paths = copy_run(unlearned_run, tmp_path / "truncated")
    weights = next(Path(paths.epoch_dir("ga", 2)).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(UipeError, match=re.escape(str(weights))):
        make_setup(tiny_cfg, paths, "ga")
    assert not paths.search("ga").exists()


def test_broken_weights_and_a_killed_trial_fail_their_trials_and_the_search_goes_on(unlearned_run, tiny_cfg, tmp_path,
                                                                                    monkeypatch) -> None:
    # A copy of the run whose GA epoch 2 weights are all NaN (the files are whole, so the search starts): every
    # epoch-2 trial raises. And one trial's process is killed mid-trial (as by the OOM killer). The others finish.
    from uipe import faults

    paths = copy_run(unlearned_run, tmp_path / "broken")
    weights = next(Path(paths.epoch_dir("ga", 2)).glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:] = b"\xff" * (len(raw) - start)  # 0xffffffff is a NaN in fp32
    weights.write_bytes(bytes(raw))
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.ENV, f"trial:kill,alpha=0.5,marker={marker}")
    space = tmp_path / "ga.yaml"
    space.write_text("method: ga\nalpha: {low: 0.0, high: 1.0}\nepochs: [2, 3]\nsampler: grid\ngrid_step: 0.5\n"
                     "max_concurrent_trials: 1\n")
    cfg = tiny_cfg.model_copy(update={"tracking": tiny_cfg.tracking.model_copy(update={"register_model": False}),
                                      "search": tiny_cfg.search.model_copy(update={"num_samples": None})})
    s = run_search(cfg, paths, "ga", space)
    killed_epoch = int(faults.fired(marker)["epoch"])  # one trial did die: at epoch 3, a failure beside epoch 2's three
    assert s.trials == 6 and s.failed == 3 + (killed_epoch == 3) and s.chosen["epoch"] == 3
    failed = [r for r in _children(cfg, paths, s.parent_run_id) if r.info.status == "FAILED"]
    assert len(failed) == s.failed and all("uipe.error" in r.data.tags for r in failed)
    rows = (paths.search("ga") / "results.csv").read_text().splitlines()
    assert sum(",failed," in row for row in rows) == s.failed


def test_a_seeded_search_repeats_trial_for_trial_however_its_trials_are_timed(unlearned_run, tiny_cfg, tmp_path,
                                                                               monkeypatch) -> None:
    """TPE learns from finished trials: with two in flight, the one that finishes first shapes the next suggestion.
    Told to the sampler in the order they were suggested (`deterministic: true`, as uipe study searches), the seed
    alone fixes the search: a run whose first trial (the base method at the last epoch) takes 4 s longer, as on a
    busy node, tries the same points as an unhindered one. Without it the two differ from TPE's first suggestion on
    (it sees another trial finished): measured, docs/BENCHMARKS.md "A seed repeats a search"."""
    from uipe import faults
    from uipe.report import from_csv

    space = tmp_path / "ga.yaml"
    space.write_text("method: ga\nalpha: {low: 0.0, high: 2.0}\nepochs: [2, 3]\nsampler: tpe\nstartup_trials: 2\n"
                     "num_samples: 10\nmax_concurrent_trials: 2\ndeterministic: true\n")
    cfg = tiny_cfg.model_copy(update={"tracking": tiny_cfg.tracking.model_copy(update={"register_model": False}),
                                      "search": tiny_cfg.search.model_copy(update={"num_samples": None})})
    tried = []
    for name, spec in (("plain", ""), ("slowed", "trial:delay,seconds=4,alpha=0,epoch=3")):
        monkeypatch.setenv(faults.ENV, spec)
        paths = copy_run(unlearned_run, tmp_path / name, methods=("ga",))
        run_search(cfg, paths, "ga", space)
        tried.append(sorted((r.alpha, r.epoch) for r in from_csv((paths.search("ga") / "results.csv").read_text())))
    assert len(tried[0]) == 10 and len(set(tried[0])) > 4  # TPE's own points, not the base points alone
    assert tried[0] == tried[1]


def test_a_screened_search_evaluates_in_full_only_what_could_matter_and_chooses_among_those(unlearned_run, tiny_cfg,
                                                                                          tmp_path) -> None:
    from uipe.report import from_csv

    paths = copy_run(unlearned_run, tmp_path / "screened", methods=("npo",))
    cfg = tiny_cfg.model_copy(update={"search": tiny_cfg.search.model_copy(update={"screening": True,
                                                                                    "num_samples": 10})})
    s = run_search(cfg, paths, "npo")
    rows = {r.trial_id: r for r in from_csv((paths.search("npo") / "results.csv").read_text())}
    split = s.fidelity
    assert len(rows) == s.trials == 10 and split["full"] + split["screened_only"] == 10
    assert split["full"] == sum(r.fidelity == "full" for r in rows.values())
    assert all(r.fidelity == "full" for r in rows.values() if r.alpha == 0.0)  # the base points: always in full
    for r in rows.values():  # a screened-only trial has every scoring metric and no utility
        assert math.isfinite(r.metric("forget_quality")) and math.isnan(r.utility) == (r.fidelity == "screen")
    chosen = [r for r in rows.values() if (r.alpha, r.epoch) == (s.chosen["alpha"], s.chosen["epoch"])]
    assert chosen and all(r.fidelity == "full" for r in chosen)
    assert split["screening_seconds"] + split["full_seconds"] == pytest.approx(s.trial_work_seconds)
    for run in _children(cfg, paths, s.parent_run_id):  # each child run says how it was evaluated
        r = rows[run.data.tags["uipe.trial_id"]]
        assert run.data.tags["uipe.fidelity"] == r.fidelity and ("model_utility" in run.data.metrics) == r.full


def test_an_objective_registered_in_the_catalogue_is_searched_with_no_other_change(unlearned_run, tiny_cfg,
                                                                                     tmp_path) -> None:
    """Adding an objective is one catalogue entry: a toy one (how much forget probability dropped, derived from what
    the evaluator reports) names the search's objective, and every trial reports it, computed in the trial process
    from the catalogue the driver sent."""
    from uipe import metrics
    from uipe.report import from_csv

    toy = metrics.Metric("toy_forget_drop", "1 - forget probability (a toy objective)", "toy",
                         derive=lambda m: 1.0 - m["forget_prob"], objective=True)
    metrics.register(toy)
    try:
        paths = copy_run(unlearned_run, tmp_path / "toy", methods=("ga",))
        cfg = tiny_cfg.model_copy(update={
            "search": tiny_cfg.search.model_copy(update={"objective": "toy_forget_drop", "num_samples": 6}),
            "tracking": tiny_cfg.tracking.model_copy(update={"register_model": False})})
        s = run_search(cfg, paths, "ga")
    finally:
        metrics.unregister(toy.name)
    rows = [r for r in from_csv((paths.search("ga") / "results.csv").read_text()) if r.full]
    assert s.objective == "toy_forget_drop" and len(rows) == s.trials == 6
    for r in rows:  # the trial computed it: 1 - forget probability, to float rounding
        assert r.objective == pytest.approx(1.0 - r.metric("forget_prob"), abs=1e-9)
        assert r.metric("toy_forget_drop") == pytest.approx(r.objective, abs=1e-12)
    feasible = [r for r in rows if r.feasible]
    assert s.chosen["objective"] == pytest.approx(max(r.objective for r in feasible))
    assert s.floors["0.95"]["uipe"]["objective"] == pytest.approx(s.chosen["objective"])


# ---- searches run as a user runs them: a CLI process each, with its own pool (`cpus_free` gives back the module's)
def test_search_survives_sigkill_of_the_driver_and_resume_logs_each_trial_once(unlearned_run, tiny_cfg,
                                                                               ray_session, cpus_free) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "uipe.cli", "search", "--method", "npo", "--run-dir", str(unlearned_run.root),
           "--set", "search.num_samples=10"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    finished = 0
    deadline = time.time() + 240
    for line in proc.stdout:  # kill the driver once 3 trials have finished (the console shows a line per third)
        done = re.match(r"\[search npo\] trial (\d+)/", line)
        finished = int(done.group(1)) if done and "FAILED" not in line else finished
        if finished >= 3 or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished >= 3
    state = json.loads((unlearned_run.search("npo") / "search_state.json").read_text())
    assert not (unlearned_run.search("npo") / "result.json").exists()

    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads((unlearned_run.search("npo") / "result.json").read_text())
    assert result["parent_run_id"] == state["parent_run_id"] and result["trials"] == 10
    children = _children(tiny_cfg, unlearned_run, state["parent_run_id"])
    ids = [r.data.tags["uipe.trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == 10


def test_a_search_stopped_by_sigterm_is_not_recorded_as_finished(unlearned_run, tiny_cfg, ray_session,
                                                                 tmp_path, cpus_free) -> None:
    """Tune answers Ctrl+C by stopping its trials and returning normally; the search then had 6 of its trials and
    was written, and reused, as finished (seen in a study). Now it says so, exit 2, and --resume finishes it. A
    SIGTERM (a scheduler's stop) takes the same path (uipe.ray_session.stop_on_sigterm raises SIGINT); before, Ray's
    handler exited 15 with nothing on the console."""
    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "uipe.cli", "search", "--method", "ga", "--run-dir", str(paths.root),
           "--set", "search.num_samples=10", "--set", "tracking.register_model=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"\[search ga\] trial [2-9]/", line) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)  # as one Ctrl+C: Tune stops its trials and returns
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, "".join(lines) + rest
    assert "interrupted" in rest and "--resume" in rest, rest
    assert not (paths.search("ga") / "result.json").exists()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert json.loads((paths.search("ga") / "result.json").read_text())["trials"] == 10


def test_a_tracking_server_that_stops_mid_search_loses_no_trial(unlearned_run, tiny_cfg, ray_session,
                                                               tmp_path, cpus_free) -> None:
    """The server dies after the first trial is logged: the search goes on (trials are Tune's record), ends saying
    to resume once the server is back, and the resume logs every trial exactly once."""
    import sqlite3

    from conftest import free_port

    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    db, port = tmp_path / "server.db", free_port()
    space = tmp_path / "ga.yaml"
    space.write_text("method: ga\nalpha: {low: 0.0, high: 1.0}\nepochs: [2, 3]\nsampler: grid\ngrid_step: 0.5\n"
                     "max_concurrent_trials: 1\n")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    cmd = [sys.executable, "-m", "uipe.cli", "search", "--method", "ga", "--run-dir", str(paths.root), "--space",
           str(space), "--set", f"tracking.uri=http://127.0.0.1:{port}", "--set", "tracking.register_model=false"]

    def children() -> int:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT count(*) FROM tags WHERE key = 'uipe.trial_id'").fetchone()[0]

    served = ("--artifacts-destination", str(tmp_path / "artifacts"))  # not ./mlartifacts in the working directory
    with mlflow_server(f"sqlite:///{db}", *served, port=port):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while children() < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert children() >= 1
    out, err = proc.communicate(timeout=600)  # the server is gone from here on
    assert proc.returncode == 2 and "--resume" in err and "Traceback" not in err, err[-2000:]
    assert len((paths.search("ga") / "results.csv").read_text().splitlines()) == 1 + 6  # every trial kept
    assert children() < 6  # a margin: five trials are still to run when the server stops
    with mlflow_server(f"sqlite:///{db}", *served, port=port) as url:
        # the resume talks to a working server: MLflow's own timeouts and retries, not the fail-fast ones above (a
        # server just restarted on a loaded machine can take over 5 s to answer its first request)
        fail_fast = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
        calm = {k: v for k, v in env.items() if k not in fail_fast}
        done = subprocess.run(cmd + ["--resume"], env=calm, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads((paths.search("ga") / "result.json").read_text())
        exp = rest(url, f"experiments/get-by-name?experiment_name={experiment_name(tiny_cfg)}")["experiment"]
        runs = rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                         "filter": f"tags.mlflow.parentRunId = '{result['parent_run_id']}'",
                                         "max_results": 100})["runs"]
        assert exp["tags"] and {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
    ids = [t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "uipe.trial_id"]
    assert len(ids) == len(set(ids)) == 6 == result["trials"]
