"""Several unlearning methods in one fit (one worker group, theta_ini and the reference loaded once) train exactly
as one fit per method; a worker killed in the second method resumes that method exactly and leaves the first
method's outputs untouched; each method keeps its own MLflow run.

theta_ini is the tiny preset's random-init model (no prepare: these check the mechanics, not the forgetting).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uipe.config import load_config

torch.set_num_threads(1)

# GA (no reference), NPO (the shared frozen reference), RMU (some parameters frozen: a fresh load, not a reload)
METHODS = ["ga", "npo", "rmu"]


def _cfg(synth_dir: Path, tiny_base: Path, *extra: str):
    return load_config(None, [f"data.source={synth_dir}", f"model.target={tiny_base}", "unlearn.epochs=2",
                              "unlearn.rmu.layer=2", "train.max_failures=1", *extra])


def _weights(manifest: Path) -> list[bytes]:
    rows = json.loads(manifest.read_text())["epochs"]
    return [(Path(r["path"]) / "model.safetensors").read_bytes() for r in rows]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its inode and modification time: what rewriting would change."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.ray
@pytest.mark.slow
def test_one_fit_for_many_methods_equals_one_fit_each_and_resumes_the_method_that_failed(
        ray_session: object, synth_dir: Path, tiny_base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from uipe.paths import RunPaths
    from uipe.tracking import tracking_uri
    from uipe.train.recipe import unlearn, unlearn_methods

    cfg = _cfg(synth_dir, tiny_base)
    together = unlearn_methods(cfg, tmp_path / "together", METHODS)
    timing = json.loads(together["npo"].read_text())["timing"]
    assert timing["fit_methods"] == METHODS and timing["job_seconds"] < timing["fit_seconds"]
    for method in METHODS:  # bit for bit, every epoch, as if each had had a fit of its own
        alone = unlearn(cfg, tmp_path / f"alone-{method}", method)
        assert _weights(together[method]) == _weights(alone), method
    # two epochs moved GA's weights at all (a group that trained nothing would also be "identical")
    assert len(set(_weights(together["ga"]))) == 2

    # Rank 1 dies in NPO's second epoch: Ray restarts the worker group, which skips GA (done, its results in the
    # checkpoint's state) and resumes NPO from its epoch-1 state, then trains RMU.
    killed = tmp_path / "killed_once"
    run = tmp_path / "faulted"
    monkeypatch.setenv("UIPE_FAULTS", f"train.step:kill,job=npo,epoch=2,rank=1,marker={killed}")
    faulted = unlearn_methods(cfg, run, METHODS)
    assert killed.is_file() and "job=npo" in killed.read_text()
    for method in METHODS:
        assert _weights(faulted[method]) == _weights(together[method]), method
    # GA's folder was written before the fault and not again (a restart never goes back into a finished job: its
    # last checkpoint is committed before the next job starts); a rewrite would show in the files' times.
    paths = RunPaths.of(run)
    ga_files = {k: v for k, v in _files(paths.unlearn("ga")).items() if k.startswith("epoch_")}  # not the manifest
    assert len(ga_files) > 4 and all(mtime < killed.stat().st_mtime_ns for _, mtime in ga_files.values())

    # MLflow: one run per method, each finished, each epoch's metrics logged once (a retrained epoch is not logged
    # again), every optimizer step's loss once
    client = MlflowClient(tracking_uri(cfg, paths))
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert sorted(r.info.run_name for r in runs) == sorted(f"unlearn-{m}" for m in METHODS)
    for run_info in runs:
        assert run_info.info.status == "FINISHED", run_info.info.run_name
        epochs = [m.step for m in client.get_metric_history(run_info.info.run_id, "epoch_loss")]
        steps = [m.step for m in client.get_metric_history(run_info.info.run_id, "loss")]
        assert sorted(epochs) == [2, 4] and sorted(steps) == [1, 2, 3, 4], run_info.info.run_name
