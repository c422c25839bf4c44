"""A search's Tune experiment and its MLflow parent run: the Tuner (fresh or restored), its callbacks, the proxy
trainable whose points the pool evaluates, and the trials Tune kept, as TrialResults. uipe/search/driver.py decides
whether to run one (reuse, resume, the floor); this module runs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ray
from ray import tune

from uipe import faults, metrics, tracking
from uipe.benchmarks import get_benchmark
from uipe.config import FLOORS, ExperimentConfig
from uipe.io import atomic_write_json, code_version
from uipe.paths import RunPaths
from uipe.results import TrialResult
from uipe.search import tune_state
from uipe.search.outcome import RESULT_FILE
from uipe.search.pool import PROXY_RESOURCES, proxy_trial
from uipe.search.progress import Progress
from uipe.search.screening import ScreeningScheduler
from uipe.search.space import SearchSpace, build_searcher
from uipe.search.trial import TrialCall, TrialSetup

STATE_FILE = "search_state.json"  # the search's identity and its MLflow parent run: written before Tune starts


def run_experiment(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path, space: SearchSpace,
                   setup: TrialSetup, epochs: list[int], resume: bool, metric: str, pool: Any,
                   ini: dict[str, float], threshold: float, identity: str) -> tuple[tune.ResultGrid, str, str]:
    """The MLflow parent run and the Tune experiment (fresh or restored) whose trials `pool` evaluates."""
    bench = get_benchmark(setup.benchmark)
    uri, exp_id, parent = _parent_run(cfg, paths, method, space_path, space, setup, threshold, identity, metric)
    total = space.trials_needed(epochs)
    callbacks = [tracking.TrialLogger(uri, exp_id, parent, method),
                 Progress(space.label(method), total, metrics.short(metric), metrics.short(bench.utility))]
    # screening weighs a point at the space's floor and at every floor a result reports (uipe.report.FLOORS)
    thresholds = [threshold, *(f * ini[bench.utility] for f in FLOORS)] if cfg.search.screening else None
    trainable = make_trainable(cfg, setup, threshold, metric, ini, pool)
    tuner = _tuner(paths, method, space, trainable, epochs, cfg.search.seed, callbacks, resume, thresholds,
                   bench.screening_utility)
    with tune_state.restore_or_fail(paths.search(space.label(method)) / "tune"):
        return tuner.fit(), uri, parent


def _parent_run(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path, space: SearchSpace,
                setup: TrialSetup, threshold: float, identity: str, metric: str) -> tuple[str, str, str]:
    state_path = paths.search(space.label(method)) / STATE_FILE
    uri, exp_id = tracking.ensure_experiment(cfg, paths)
    if state_path.is_file():
        return uri, exp_id, json.loads(state_path.read_text())["parent_run_id"]
    from uipe.eval.reference import model_hash

    run_id = tracking.create_run(uri, exp_id, f"search-{space.label(method)}", {
        "uipe.method": method, "uipe.kind": "search", "uipe.form": space.form, "uipe.code_version": code_version(),
        "uipe.space_file": str(space_path), "uipe.theta_ini": setup.theta_ini, **tracking.source_tags()},
        parent=cfg.tracking.parent_run_id)
    tracking.log_datasets(uri, run_id, setup.data, _eval_splits(setup), "evaluation")
    tracking.log_flat(uri, run_id, {}, {
        "method": method, "space_file": str(space_path), "sampler": space.sampler, "objective": space.objective,
        "objective_metric": metric,
        "alpha_low": space.alpha.low, "alpha_high": space.alpha.high, "num_samples": space.num_samples,
        "form": space.form, "anchor": space.anchor, "dimensions": space.dimensions(),
        "utility_floor": space.utility_floor, "forget_split": setup.forget_split, "theta_ini": setup.theta_ini,
        "checkpoints": json.dumps(setup.epoch_dirs), "data": setup.data, "retain_reference": setup.reference,
        "theta_ini_hash": model_hash(setup.theta_ini), "utility_threshold": threshold,
        "method_params": json.dumps(cfg.method_params(method).model_dump())})
    tracking.log_text(uri, run_id, space_path.read_text(), "space.yaml")
    atomic_write_json(state_path, {"identity": identity, "parent_run_id": run_id, "experiment_id": exp_id})
    return uri, exp_id, run_id


def _eval_splits(setup: TrialSetup) -> dict[str, list]:
    """The evaluation data a search scores every trial on, by the benchmark's split name."""
    return {k: list(v) for k, v in get_benchmark(setup.benchmark).eval_splits(setup.data, setup.forget_split).items()}


def make_trainable(cfg: ExperimentConfig, setup: TrialSetup, threshold: float, metric: str,
                   ini: dict[str, float], pool: Any) -> Any:
    """The Tune trainable with its resources: a light proxy whose point a pool worker evaluates (uipe/search/pool.py;
    with search.workers_per_trial > 1, a group of processes over which the model is sharded)."""
    call = TrialCall(setup, threshold, metric, metrics.snapshot(), faults.from_env(), ini)
    # [a reference]: Tune resolves its parameters, not what they hold, so the proxy never unpickles the setup
    ref = [ray.put(call)]
    return tune.with_resources(tune.with_parameters(proxy_trial, pool=pool, call=ref,
                                                    screening=cfg.search.screening), PROXY_RESOURCES)


def _tuner(paths: RunPaths, method: str, space: SearchSpace, trainable: Any, epochs: list[int], seed: int,
           callbacks: list, resume: bool, screening: list[float] | None = None, proxy: str = "") -> tune.Tuner:
    """`screening`: the utility thresholds the ScreeningScheduler weighs screened points at (None: every trial is
    evaluated in full)."""
    tune_dir = paths.search(space.label(method)) / "tune"
    if resume and tune_dir.exists():
        tune_state.prepare_resume(tune_dir, f"search {space.label(method)}")
    if resume and tune_dir.exists() and tune.Tuner.can_restore(str(tune_dir)):
        # resume_errored=False: a trial that raised stays failed (and Ray 2.60's restart_errored breaks Optuna).
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True)
    searcher = build_searcher(space, epochs, seed, _warm_start(paths, method, space))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=space.trials_needed(epochs),
                                    max_concurrent_trials=space.max_concurrent_trials, reuse_actors=True,
                                    scheduler=ScreeningScheduler(screening, proxy) if screening else None),
        run_config=tune.RunConfig(name="tune", storage_path=str(paths.search(space.label(method))), callbacks=callbacks,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
    )


def _warm_start(paths: RunPaths, method: str, space: SearchSpace) -> dict | None:
    """The global search's chosen (alpha, epoch) of this method, where it has finished in this run folder: a form
    beyond one alpha starts from it, so it begins where the paper's operator ended."""
    result = paths.search(method) / RESULT_FILE
    if not space.beyond_global or not result.is_file():
        return None
    chosen = json.loads(result.read_text()).get("chosen") or {}
    return chosen if "alpha" in chosen and "epoch" in chosen else None


def trial_results(grid: tune.ResultGrid, utility: str) -> list[TrialResult]:
    """The trials Tune kept. `utility`: the benchmark's utility metric, which a trial reported before the record had
    a `utility` field carried only under its own name (a search interrupted then and resumed now)."""
    out = []
    for r in grid:
        cfg = r.config or {}
        alpha, epoch = float(cfg.get("alpha", float("nan"))), int(cfg.get("epoch", -1))
        if r.error is None and r.metrics and "objective" in r.metrics:
            reported = {"utility": r.metrics[utility]} if utility in r.metrics else {}
            out.append(TrialResult.from_report(_trial_id(r), cfg, reported | r.metrics))
        else:
            error = str(r.error).splitlines()[-1][:300] if r.error else "no result"
            out.append(TrialResult.failed(_trial_id(r), alpha, epoch, error))
    return out


def _trial_id(result: Any) -> str:
    """Tune's trial id: reported with every result, else read from the trial folder (<name>_<id>_<index>_...)."""
    if result.metrics and "trial_id" in result.metrics:
        return str(result.metrics["trial_id"])
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name) if result.path else None
    return match.group(1) if match else ""
