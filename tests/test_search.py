"""The alpha search on the trained tiny world: Ray Tune + Optuna, MLflow parent/child runs, the registry, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_run, mlflow_server, rest
from uipe.search import run_search
from uipe.tracking import CHAMPION, client, experiment_name, tracking_uri

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _children(cfg, paths, parent: str) -> list:
    c = client(tracking_uri(cfg, paths))
    exp = c.get_experiment_by_name(experiment_name(cfg))
    return c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


@pytest.fixture(scope="module")
def ga_search(unlearned_run, tiny_cfg) -> dict:
    return run_search(tiny_cfg, unlearned_run, "ga")


def test_search_logs_a_parent_with_one_child_per_trial_and_picks_a_feasible_point(ga_search, unlearned_run,
                                                                                   tiny_cfg) -> None:
    s = ga_search
    assert s["trials"] == 8 and s["failed"] == 0
    children = _children(tiny_cfg, unlearned_run, s["parent_run_id"])
    assert len(children) == 8 and len({r.data.tags["uipe.trial_id"] for r in children}) == 8
    for run in children:
        assert {"forget_quality", "model_utility", "trial_seconds"} <= set(run.data.metrics)
        assert {"alpha", "epoch"} <= set(run.data.params)
    # The base method (alpha 0) was evaluated at every epoch, first.
    base_epochs = sorted(int(r.data.params["epoch"]) for r in children if float(r.data.params["alpha"]) == 0.0)
    assert base_epochs == list(range(1, tiny_cfg.unlearn.epochs + 1))
    chosen = s["chosen"]
    assert s["feasible"] and chosen["model_utility"] >= s["utility_threshold"]
    feasible = [r for r in children if r.data.metrics["model_utility"] >= s["utility_threshold"]]
    assert chosen["forget_quality"] == max(r.data.metrics["forget_quality"] for r in feasible)
    assert chosen["forget_quality"] >= s["base"]["forget_quality"]
    out = unlearned_run.search("ga")
    assert len((out / "results.csv").read_text().splitlines()) == 9
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "alpha_curves.png").stat().st_size > 10_000
    artifacts = {a.path for a in client(tracking_uri(tiny_cfg, unlearned_run)).list_artifacts(s["parent_run_id"])}
    assert {"results.csv", "chosen.yaml", "pareto.png", "alpha_curves.png", "model"} <= artifacts


def test_the_champion_is_registered_and_loads_with_transformers(ga_search, unlearned_run, tiny_cfg) -> None:
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM

    c = client(tracking_uri(tiny_cfg, unlearned_run))
    version = c.get_model_version_by_alias(ga_search["registered"]["name"], CHAMPION)
    assert version.tags["alpha"] == str(ga_search["chosen"]["alpha"])
    local = download_artifacts(artifact_uri=version.source, tracking_uri=tracking_uri(tiny_cfg, unlearned_run))
    model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True)
    assert model.config.model_type == "llama"


def test_a_finished_search_is_reused_not_rerun(ga_search, unlearned_run, tiny_cfg) -> None:
    again = run_search(tiny_cfg, unlearned_run, "ga")
    assert again == ga_search
    assert len(_children(tiny_cfg, unlearned_run, ga_search["parent_run_id"])) == 8


def test_a_real_mlflow_server_serves_the_runs_over_rest(ga_search, unlearned_run, tiny_cfg, tmp_path) -> None:
    with mlflow_server(tracking_uri(tiny_cfg, unlearned_run)) as url:
        exp = rest(url, f"experiments/get-by-name?experiment_name={experiment_name(tiny_cfg)}")
        runs = rest(url, "runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]],
                                         "filter": f"tags.mlflow.parentRunId = '{ga_search['parent_run_id']}'",
                                         "max_results": 100})["runs"]
        assert len(runs) == 8
        keys = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert {"forget_quality", "model_utility"} <= keys


def test_search_survives_sigkill_of_the_driver_and_resume_logs_each_trial_once(unlearned_run, tiny_cfg,
                                                                               ray_session) -> None:
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


def test_a_broken_checkpoint_fails_its_trials_and_the_search_goes_on(unlearned_run, tiny_cfg, tmp_path) -> None:
    # A copy of the run whose GA epoch 2 checkpoint is truncated: trials at epoch 2 raise, the others finish.
    paths = copy_run(unlearned_run, tmp_path / "broken")
    weights = next(Path(paths.epoch_dir("ga", 2)).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    space = tmp_path / "ga.yaml"
    space.write_text("method: ga\nalpha: {low: 0.0, high: 1.0}\nepochs: [2, 3]\nsampler: tpe\nnum_samples: 4\n"
                     "max_concurrent_trials: 1\n")
    cfg = tiny_cfg.model_copy(update={"tracking": tiny_cfg.tracking.model_copy(update={"register_model": False}),
                                      "search": tiny_cfg.search.model_copy(update={"num_samples": None})})
    s = run_search(cfg, paths, "ga", space)
    assert s["failed"] >= 1 and s["trials"] == 4 and s["chosen"]["epoch"] == 3
    failed = [r for r in _children(cfg, paths, s["parent_run_id"]) if r.info.status == "FAILED"]
    assert len(failed) == s["failed"] and all("uipe.error" in r.data.tags for r in failed)
