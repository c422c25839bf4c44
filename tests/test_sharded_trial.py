"""A search trial whose model is sharded over two gloo workers (search.workers_per_trial = 2) measures what the
one-process trial measures: the same items, the same numbers up to float noise (issue 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ALPHA, EPOCH = 1.5, 2


def _items_loop(cfg: dict) -> None:
    """A test-only worker loop: the trial's own sharded model and evaluator, reporting per-item values."""
    import ray.train
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from uipe.io import atomic_write_json
    from uipe.search.sharded import sharded_model
    from uipe.coefficients import Extrapolation
    from uipe.search.trial import build_evaluator, resolve_point

    setup = cfg["setup"]
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (ray.train.get_context().get_world_size(),))
    model = sharded_model(resolve_point(setup, Extrapolation(EPOCH, ALPHA)), torch.device("cpu"), mesh, torch.float32)
    res = build_evaluator(setup).evaluate(model, generate=False)
    local = sum(p.to_local().numel() for p in model.parameters())
    if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps no metrics without a checkpoint: a file
        atomic_write_json(cfg["out"], {"truth_ratio": res.per_item["forget"]["truth_ratio"],
                                       "prob": res.per_item["forget"]["prob"], "local_params": local,
                                       "params": sum(p.numel() for p in model.parameters())})


def test_a_two_worker_trial_matches_the_one_process_trial(unlearned_run, tiny_cfg, ray_session, tmp_path) -> None:
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uipe.search.driver import _trainable, make_setup
    from uipe.results import TrialResult
    from uipe.search.trial import build_evaluator, context, evaluate_point
    from uipe.update_vector import cached_update_vector

    setup = make_setup(tiny_cfg, unlearned_run, "ga")
    one = evaluate_point(setup, ALPHA, EPOCH, 0.0)
    model, _, device = context(setup)
    cached_update_vector(setup.theta_ini, setup.epoch_dirs[EPOCH], device=device).apply(model, ALPHA)
    items = build_evaluator(setup).evaluate(model, generate=False).per_item["forget"]

    # per item: forget quality's inputs from the sharded model, each rank holding about half of every matrix.
    # The workers cannot import this test module: its loop travels by value.
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(_items_loop, train_loop_config={"setup": setup, "out": str(tmp_path / "items.json")},
                 scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="items", storage_path=str(tmp_path / "items"))).fit()
    got = json.loads((tmp_path / "items.json").read_text())
    assert got["local_params"] < 0.6 * got["params"]
    for key in ("truth_ratio", "prob"):
        np.testing.assert_allclose(got[key], items[key], rtol=1e-4)

    # the trainable the search runs with workers_per_trial = 2 (a Ray Train group inside the Tune trial)
    cfg = tiny_cfg.model_copy(update={"search": tiny_cfg.search.model_copy(update={"workers_per_trial": 2})})
    paths = type(unlearned_run).of(tmp_path / "run")
    trainable = _trainable(cfg, paths.search("ga"), setup, 0.0, "forget_quality", {}, pool=None)  # no pool: sharded
    grid = tune.Tuner(trainable, param_space={"alpha": ALPHA, "epoch": EPOCH},
                      run_config=tune.RunConfig(name="sharded", storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    assert grid.errors == []
    sharded = TrialResult.from_report("t", {"alpha": ALPHA, "epoch": EPOCH}, grid[0].metrics)
    for key in ("forget_quality", "model_utility", "forget_prob", "forget_truth_ratio", "retain_rougeL",
                "holdout_ks", "mia_loss_auc"):
        a, b = one.numbers().get(key, one.metrics.get(key)), sharded.numbers().get(key, sharded.metrics.get(key))
        assert b == pytest.approx(a, rel=1e-4, abs=1e-9), key
