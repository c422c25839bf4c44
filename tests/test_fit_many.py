"""Several unlearning methods in one fit (one worker group, theta_ini and the reference loaded once) train exactly
as one fit per method; a worker killed in the second method resumes that method exactly and leaves the first
method's outputs untouched; each method keeps its own MLflow run. The newer methods (RMU, UNDIAL, WGA, SatImp) train
through the same fit on 2 FSDP2 workers; RMU's frozen parameters stay bit-identical, and it resumes exactly after a
worker fails; a bad RMU layer is refused before any worker starts.

theta_ini is the tiny preset's random-init model (no prepare: these check the mechanics, not the forgetting).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from uipe.config import load_config
from uipe.errors import UipeError

torch.set_num_threads(1)

# GA first (a fresh load), NPO (theta_ini re-read into the same model; the shared frozen reference), RMU (some
# parameters frozen: a fresh load after a shared model), then the other newer methods (re-reads again)
METHODS = ["ga", "npo", "rmu", "undial", "wga", "satimp"]


def _cfg(synth_dir: Path, tiny_base: Path, *extra: str):
    # tiny_base has the tiny preset's 4 layers; rmu.layer 2 trains layers 0-2's mlp.down_proj.weight.
    return load_config(None, [f"data.source={synth_dir}", f"model.target={tiny_base}", "unlearn.epochs=2",
                              "unlearn.rmu.layer=2", "train.max_failures=2", *extra])


def _weights(manifest: Path) -> list[bytes]:
    rows = json.loads(manifest.read_text())["epochs"]
    return [(Path(r["path"]) / "model.safetensors").read_bytes() for r in rows]


def _leftovers(run: Path) -> list[str]:
    """Staging folders of checkpoints and temporary export folders left in a run folder."""
    return sorted(str(p) for p in [*run.rglob(".uipe-staging/*"), *run.rglob(".epoch_*.tmp")])


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.ray
@pytest.mark.slow
def test_one_fit_for_many_methods_equals_one_fit_each_and_resumes_the_method_that_failed(
        ray_session: object, synth_dir: Path, tiny_base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from uipe.checkpoint import checkpoint_name
    from uipe.methods.rmu import Params, is_trainable
    from uipe.paths import RunPaths
    from uipe.tracking import tracking_uri
    from uipe.train.recipe import unlearn, unlearn_methods

    cfg = _cfg(synth_dir, tiny_base, "train.overlap_exports=yes")  # exports written while the next epoch trains
    together = unlearn_methods(cfg, tmp_path / "together", METHODS)
    timing = json.loads(together["npo"].read_text())["timing"]
    assert timing["fit_methods"] == METHODS and timing["job_seconds"] < timing["fit_seconds"]
    for method in METHODS:
        manifest = json.loads(together[method].read_text())
        assert manifest["optimizer_steps"] >= 2 and all(math.isfinite(e["loss"]) for e in manifest["epochs"]), method
        assert len(set(_weights(together[method]))) == 2, method  # each epoch moved the weights
    # Bit for bit, every epoch, as one fit of its own: NPO (the re-read path) and RMU (a fresh load after it). GA
    # is the first job, loaded as in any fit. NPO alone writes each export before training on (overlap off): the
    # same bytes as exports written while the next epoch trains.
    alone = {"npo": _cfg(synth_dir, tiny_base, "train.overlap_exports=no"), "rmu": cfg}
    for method in ("npo", "rmu"):
        assert _weights(together[method]) == _weights(unlearn(alone[method], tmp_path / f"alone-{method}", method)), \
            method
    # The Ray checkpoints hold each export as hard links to its files (no second copy), and no staging or
    # temporary folder is left behind.
    paths = RunPaths.of(tmp_path / "together")
    for method in METHODS:
        for row in json.loads(together[method].read_text())["epochs"]:
            ckpt = paths.ray_storage / f"{cfg.name}-{'+'.join(METHODS)}" / checkpoint_name(method, row["epoch"])
            assert (ckpt / "hf" / "model.safetensors").stat().st_ino == \
                (Path(row["path"]) / "model.safetensors").stat().st_ino, (method, row["epoch"])
    assert _leftovers(tmp_path / "together") == []
    # RMU trained only layers 0-2's down projections; every other tensor is theta_ini's, bit for bit.
    ini, params = load_file(tiny_base / "model.safetensors"), Params(layer=2)
    trained = sorted(k for k in ini if is_trainable(params, k))
    assert trained == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    for row in json.loads(together["rmu"].read_text())["epochs"]:
        a = load_file(Path(row["path"]) / "model.safetensors")
        for key, value in ini.items():
            assert torch.equal(a[key], value) != (key in trained), key  # trained ones moved, the rest did not

    # Rank 1 dies at NPO's first step. GA's last checkpoint is then committed (rank 0 waits for it before NPO, and
    # rank 1 cannot step without rank 0), so the restarted worker group starts from it: GA is done (that checkpoint
    # holds no training state, only its results) and NPO trains from theta_ini. Then rank 1 raises in RMU's second
    # epoch: RMU resumes from its epoch-1 sharded state (whose optimizer holds only the trained parameters) if Ray
    # had committed it, else it starts over; either way the same weights.
    killed, raised = tmp_path / "killed_once", tmp_path / "raised_once"
    run = tmp_path / "faulted"
    monkeypatch.setenv("UIPE_FAULTS", f"train.step:kill,job=npo,epoch=1,rank=1,marker={killed};"
                                      f"train.step:raise,job=rmu,epoch=2,rank=1,marker={raised}")
    faulted = unlearn_methods(cfg, run, METHODS)
    assert "job=npo" in killed.read_text() and "job=rmu" in raised.read_text()
    for method in METHODS:
        assert _weights(faulted[method]) == _weights(together[method]), method
    # GA's epochs were written before the fault and not again (a restart never goes back into a finished job: its
    # last checkpoint is committed before the next job starts).
    assert _leftovers(run) == []
    paths = RunPaths.of(run)
    ga_files = {k: v for k, v in _mtimes(paths.unlearn("ga")).items() if k.startswith("epoch_")}  # not the manifest
    assert len(ga_files) > 4 and all(mtime < killed.stat().st_mtime_ns for mtime in ga_files.values())

    # MLflow: one run per method, each finished, each epoch's metrics logged once (a retrained epoch is not logged
    # again), every optimizer step's loss once
    client = MlflowClient(tracking_uri(cfg, paths))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name for r in runs) == sorted(f"unlearn-{m}" for m in METHODS)
    for run_info in runs:
        assert run_info.info.status == "FINISHED", run_info.info.run_name
        epochs = [m.step for m in client.get_metric_history(run_info.info.run_id, "epoch_loss")]
        steps = [m.step for m in client.get_metric_history(run_info.info.run_id, "loss")]
        assert sorted(epochs) == [2, 4] and sorted(steps) == [1, 2, 3, 4], run_info.info.run_name


def test_a_bad_rmu_layer_is_refused_before_any_worker_starts(synth_dir: Path, tiny_base: Path,
                                                             tmp_path: Path) -> None:
    from uipe.train.recipe import unlearn_methods

    with pytest.raises(UipeError, match=r"unlearn.rmu.layer: 4 is beyond the model's depth \(4 decoder layers"):
        unlearn_methods(_cfg(synth_dir, tiny_base, "unlearn.rmu.layer=4"), tmp_path / "run", ["ga", "rmu"])
    assert not (tmp_path / "run").exists()  # nothing written, not even GA's folder


@pytest.mark.parametrize("other, folders, words", [
    (["model.target={tmp}/other-target"], ["longer"], "only runs of one target and benchmark share a fit"),
    (["data.benchmark=muse", "data.forget_split=raw/forget"], ["longer"],
     "only runs of one target and benchmark share a fit"),
    ([], ["a/longer", "b/longer"], "need folders of different names"),  # their jobs' labels would be the same
])
def test_a_run_that_cannot_share_the_fit_is_refused_before_any_worker_starts(synth_dir: Path, tiny_base: Path,
                                                                            tmp_path: Path, other: list[str],
                                                                            folders: list[str], words: str) -> None:
    from uipe.train.recipe import unlearn_methods

    more = _cfg(synth_dir, tiny_base, *[o.format(tmp=tmp_path) for o in other])
    with pytest.raises(UipeError, match=words):
        unlearn_methods(_cfg(synth_dir, tiny_base), tmp_path / "run", ["ga"],
                        more=[(more, tmp_path / "x" / f) for f in folders])
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists()


@pytest.mark.ray
def test_an_export_that_fails_while_written_fails_the_fit_and_leaves_no_folder(
        ray_session: object, synth_dir: Path, tiny_base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 1's export is written while epoch 2 trains; it fails after its files were written, before the rename.
    The fit fails with the writer's error, and nothing of epoch 1 is in the method's folder or in Ray's storage."""
    from uipe.paths import RunPaths
    from uipe.train.recipe import unlearn

    marker = tmp_path / "raised"
    monkeypatch.setenv("UIPE_FAULTS", f"train.export:raise,job=ga,epoch=1,marker={marker}")
    run = tmp_path / "run"
    with pytest.raises(Exception, match="injected test fault in job ga on epoch 1"):
        unlearn(_cfg(synth_dir, tiny_base, "train.max_failures=0", "train.num_workers=1", "train.overlap_exports=yes"),
                run, "ga")
    assert marker.is_file()
    paths = RunPaths.of(run)
    assert sorted(p.name for p in paths.unlearn("ga").iterdir()) == ["job.json"]  # no epoch, no manifest, no tmp
    assert not list(paths.ray_storage.rglob("state.json"))  # no checkpoint reported for it
    assert _leftovers(run) == []


@pytest.mark.ray
@pytest.mark.slow
def test_another_runs_longer_training_in_the_same_fit_equals_its_own_fit_and_is_reused_alone(
        ray_session: object, synth_dir: Path, tiny_base: Path, tmp_path: Path) -> None:
    """A study seed's more-iterations baseline: GA for 4 epochs into its own folder, in the fit of GA's 2-epoch run
    (one worker group for both). The longer run's epochs are bit for bit those of a fit of its own (its own 4-epoch
    schedule, theta_ini re-read after the first job), its folder holds its own job hash and manifest, and a later
    call for that run alone (as the study's scoring makes) finds it done and trains nothing."""
    from uipe.paths import RunPaths
    from uipe.train.recipe import unlearn, unlearn_methods

    short, longer = _cfg(synth_dir, tiny_base), _cfg(synth_dir, tiny_base, "unlearn.epochs=4")
    manifests = unlearn_methods(short, tmp_path / "seed", ["ga"], more=[(longer, tmp_path / "seed" / "longer")])
    together = RunPaths.of(tmp_path / "seed" / "longer").manifest("ga")
    mine, theirs = json.loads(manifests["ga"].read_text()), json.loads(together.read_text())
    assert [e["epoch"] for e in mine["epochs"]] == [1, 2] and [e["epoch"] for e in theirs["epochs"]] == [1, 2, 3, 4]
    assert theirs["timing"]["fit_methods"] == ["ga", "ga-longer"] and mine["job_hash"] != theirs["job_hash"]
    assert all(str(tmp_path / "seed" / "longer" / "unlearn" / "ga") in e["path"] for e in theirs["epochs"])

    alone = unlearn(longer, tmp_path / "alone", "ga")
    assert json.loads(alone.read_text())["job_hash"] == theirs["job_hash"]
    assert _weights(together) == _weights(alone)
    assert _weights(manifests["ga"]) != _weights(alone)[:2]  # the 2-epoch run decays its rate sooner: not a prefix

    before = _mtimes(tmp_path / "seed")
    assert unlearn(longer, tmp_path / "seed" / "longer", "ga") == together
    assert _mtimes(tmp_path / "seed") == before and not (tmp_path / "seed" / "longer" / "ray").exists()
    assert _leftovers(tmp_path / "seed") == []
