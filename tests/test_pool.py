"""Trial processes that outlive a search (uipe/search/pool.py): the searches of a stage share them and get the same
trials as searches with pools of their own; a worker that dies fails only the call it ran and is replaced."""

from __future__ import annotations

import math

import pytest

from conftest import copy_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GRID = "method: {m}\nalpha: {{low: 0.0, high: 1.0}}\nepochs: [1, 3]\nsampler: grid\ngrid_step: 0.5\n"


def _cfg(tiny_cfg):
    return tiny_cfg.model_copy(update={"tracking": tiny_cfg.tracking.model_copy(update={"register_model": False}),
                                      "search": tiny_cfg.search.model_copy(update={"num_samples": None})})


def _trials(paths, method: str) -> list[tuple]:
    from uipe.report import from_csv

    rows = from_csv((paths.search(method) / "results.csv").read_text())
    return sorted((r.alpha, r.epoch, r.objective, r.utility) for r in rows)


def test_the_searches_of_a_stage_share_trial_processes_and_find_what_their_own_pools_find(unlearned_run, tiny_cfg,
                                                                                           tmp_path) -> None:
    import ray

    from uipe.search import pool as pools
    from uipe.search.driver import run_search

    cfg = _cfg(tiny_cfg)
    spaces = {m: tmp_path / f"{m}.yaml" for m in ("ga", "npo")}
    for m, path in spaces.items():
        path.write_text(GRID.format(m=m))
    own = copy_run(unlearned_run, tmp_path / "own")
    for m in spaces:
        run_search(cfg, own, m, spaces[m])
    shared, pids = copy_run(unlearned_run, tmp_path / "shared"), []
    with pools.shared_trial_pool():
        for m in spaces:
            run_search(cfg, shared, m, spaces[m])
            pids.append(ray.get(pools._shared["pool"].pids.remote()))
    assert pools._shared["pool"] is None  # given back at the end of the block
    assert len(pids[0]) == 2 and pids[0] == pids[1]  # NPO's search ran in the processes GA's search started
    for m in spaces:  # the same 6 points, scored the same, whichever process held the model before
        assert len(_trials(own, m)) == 6 and _trials(shared, m) == _trials(own, m)


def test_a_pool_worker_that_dies_fails_only_its_call_and_is_replaced(unlearned_run, tiny_cfg, tmp_path) -> None:
    import ray

    from uipe import faults, metrics
    from uipe.search.driver import make_setup
    from uipe.search.pool import TrialPool
    from uipe.search.trial import THETA_INI, TrialCall, theta_ini_metrics

    marker = tmp_path / "killed"
    spec = faults.parse(f"trial:kill,alpha=0.5,marker={marker};trial:raise,alpha=0.25")  # the raise: every time
    setup = make_setup(tiny_cfg, unlearned_run, "ga")
    call = [ray.put(TrialCall(setup, 0.0, "forget_quality", metrics.snapshot(), spec, None))]
    pool = TrialPool.remote({"cpu": 1, "gpu": 0}, 2)

    def run(alpha: float, trial: str) -> dict:
        return ray.get(pool.run.remote(call, {"alpha": alpha, "epoch": 1}, "full", 0.0, trial), timeout=120)

    try:
        before = ray.get(pool.pids.remote())
        with pytest.raises(ray.exceptions.RayError, match="(?i)died|exit"):
            run(0.5, "trial-a")
        after = ray.get(pool.pids.remote())
        assert len(after) == 2 and len(set(before) & set(after)) == 1  # the dead one replaced, the other kept
        for trial in ("trial-b", "trial-c"):  # a trial's own error leaves its process free for the next trial
            with pytest.raises(ray.exceptions.RayError, match="injected test fault"):
                run(0.25, trial)
        assert ray.get(pool.pids.remote()) == after
        # the next calls run (the kill fired once), in both processes, as in a process that never failed
        for alpha, trial in ((0.5, "trial-d"), (0.0, "trial-e")):
            out = run(alpha, trial)
            assert out["alpha"] == alpha and out["epoch"] == 1 and math.isfinite(out["objective"])
        assert faults.fired(marker) == {"alpha": "0.5", "epoch": "1"}
        # theta_ini measured by a worker whose model trials have extrapolated: the start model itself, reloaded, as
        # the driver measures it (a search's floor comes from this call)
        assert ray.get(pool.run.remote(call, {}, THETA_INI, 0.0, "ini"), timeout=120) == theta_ini_metrics(setup)
        # the pool's own process lost: Ray restarts it with fresh workers, and a call still gets its evaluation
        ray.kill(pool, no_restart=False)
        assert run(0.0, "trial-f")["objective"] == out["objective"]  # the last call's point, scored as before
        assert not set(ray.get(pool.pids.remote())) & set(after)
    finally:
        ray.kill(pool)


def test_a_worker_the_cluster_cannot_place_holds_up_no_call(unlearned_run, tiny_cfg) -> None:
    """Three workers of one CPU on a 2-CPU Ray: the third waits for a CPU, and the calls go to the two that are up
    (as trials must when a space asks for more trials at once than the cluster holds)."""
    import ray

    from uipe import metrics
    from uipe.search.driver import make_setup
    from uipe.search.pool import TrialPool
    from uipe.search.trial import TrialCall

    call = [ray.put(TrialCall(make_setup(tiny_cfg, unlearned_run, "ga"), 0.0, "forget_quality", metrics.snapshot()))]
    pool = TrialPool.remote({"cpu": 1, "gpu": 0}, 3)
    try:
        refs = [pool.run.remote(call, {"alpha": a, "epoch": 1}, "full", 0.0, f"t{i}") for i, a in
                enumerate((0.0, 0.25, 0.5, 0.75, 1.0, 0.0))]
        out = ray.get(refs, timeout=180)  # a call handed to the unplaced worker would wait for ever
        assert [r["alpha"] for r in out] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]
        assert out[0]["objective"] == out[-1]["objective"]
    finally:
        ray.kill(pool)
