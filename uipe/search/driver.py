"""Automatic alpha selection on the driver: Ray Tune + Optuna over (alpha, checkpoint epoch), a cheap trial each.

    uipe search --method npo                # after `uipe prepare` and `uipe unlearn --method npo`
    uipe search --method npo --resume       # continue an interrupted search

run_search: space -> the trial processes (uipe/search/pool.py) -> the start model's utility measured in one of them
(the floor) -> the MLflow parent run and the Tuner, fresh or restored (uipe/search/experiment.py) -> results ->
choice, chosen model, registry (uipe/search/outcome.py). One search per folder at a time; a finished one is reused
before any process starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import ray
from pydantic import ValidationError

from uipe import metrics, tracking
from uipe.benchmarks import Benchmark, get_benchmark
from uipe.config import DataConfig, ExperimentConfig
from uipe.console import say
from uipe.errors import UipeError
from uipe.io import exclusive
from uipe.paths import RunPaths
from uipe.ray_session import ensure_ray
from uipe.results import SearchOutcome
from uipe.schema import one_line
from uipe.search.experiment import STATE_FILE, run_experiment, trial_results
from uipe.search.outcome import RESULT_FILE, finish
from uipe.search.pool import release_shared, trial_pool
from uipe.search.space import SearchSpace, default_space_path, load_space
from uipe.search.trial import THETA_INI, TrialCall, TrialSetup, theta_ini_metrics
from uipe.stages import cached_value, recorded, reusable


def run_search(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path | None = None,
               resume: bool = False) -> SearchOutcome:
    """Validate, run (or resume) the Tune search, then report, choose, write and register the chosen model."""
    path, space = resolve_space(cfg, method, space_path)
    bench = benchmark_of(cfg)
    if cfg.search.screening and (space.objective == "pareto" or cfg.search.workers_per_trial > 1):
        raise UipeError("search.screening: needs a single objective (pareto ranks every trial by model utility) and "
                        "search.workers_per_trial 1 (sharded trials evaluate in full)")
    setup = make_setup(cfg, paths, method, reference_free=space.objective == "reference_free")
    epochs = space.candidate_epochs(sorted(setup.epoch_dirs))
    setup = with_form(cfg, space, setup, epochs)
    with exclusive(paths.search(space.label(method)), f"a search of {space.label(method)}"):
        return _execute(cfg, paths, method, path, space, setup, epochs, resume, space.objective_metric(bench))


def benchmark_of(cfg: ExperimentConfig) -> Benchmark:
    """The run's benchmark, its names in the config checked against its catalogue."""
    from uipe.benchmarks import check_config

    return check_config(cfg)


def resolve_space(cfg: ExperimentConfig, method: str, space_path: Path | None) -> tuple[Path, SearchSpace]:
    path = Path(space_path) if space_path else default_space_path(method, cfg.search.space_dir)
    space = load_space(path, method)
    overrides = {k: getattr(cfg.search, k) for k in ("num_samples", "objective", "signal", "select_on", "form")
                 if getattr(cfg.search, k)}
    overrides |= {k: getattr(cfg.search, k) for k in ("anchor", "deterministic") if getattr(cfg.search, k) is not None}
    try:  # validated again: an override can make a space the file alone would not (a grid of groups, say)
        return path, SearchSpace.model_validate(space.model_dump() | overrides)
    except ValidationError as e:
        raise UipeError(one_line(e, f"{path} with the config's search overrides")) from None


def make_setup(cfg: ExperimentConfig, paths: RunPaths, method: str, reference_free: bool = False) -> TrialSetup:
    """What every trial needs. Forget quality needs the retain reference; a reference-free search needs the holdout
    split instead (and still reports forget quality where a reference exists, as a check)."""
    bench = benchmark_of(cfg)
    data = bench.ensure_data(cfg, paths)
    theta_ini, dirs = _epoch_dirs(paths, method, cfg, data, bench)
    reference: str | None = cfg.eval.retain_reference or str(paths.retain_reference)
    if reference_free:
        bench.check_reference_free(data, cfg.data.forget_split)
        reference = reference if Path(reference).exists() else None
    elif not Path(reference).exists():
        raise UipeError(f"{reference}: no retain reference; run `uipe prepare` then `uipe reference`, set "
                        "eval.retain_reference to a folder of TOFU eval logs, or search with objective "
                        "reference_free (search.objective)")
    return TrialSetup(theta_ini, dirs, bench.name, data, cfg.data.forget_split, cfg.model.prompt_template,
                      cfg.model.max_length, cfg.eval, reference, cfg.model.dtype,
                      max(1, int(cfg.search.cpus_per_trial)))


def with_form(cfg: ExperimentConfig, space: SearchSpace, setup: TrialSetup, epochs: list[int]) -> TrialSetup:
    """The setup with what the space's form reads: its groups (every parameter in exactly one, checked now rather
    than in every trial) and, for the weighted form, each candidate epoch's importance folder (estimated where
    missing; uipe.search.importance)."""
    from dataclasses import replace

    from uipe.coefficients import DEFAULT_GROUPS, assign_groups
    from uipe.safetensors_io import read_checkpoint

    if space.form == "groups":
        groups = space.groups or DEFAULT_GROUPS
        assign_groups(sorted(read_checkpoint(setup.theta_ini).specs), groups, "search space groups")
        setup = replace(setup, groups=dict(groups))
    if space.form == "weighted":
        from uipe.search.importance import ensure_importance

        ensure_ray()
        release_shared()  # the estimate asks Ray for CPUs that a stage's shared pool may hold
        setup = replace(setup, importance=ensure_importance(setup, epochs, space.weighted.items,
                                                            cfg.search.cpus_per_trial, cfg.search.gpus_per_trial))
    return setup


def _epoch_dirs(paths: RunPaths, method: str, cfg: ExperimentConfig, data: str,
                bench: Benchmark) -> tuple[str, dict[int, str]]:
    """theta_ini and the epoch checkpoints from the unlearning manifest, which must have forgotten the same data the
    search evaluates (a search scored on another forget split or data would choose alpha for the wrong question)."""
    from uipe.methods import get_objective

    manifest = paths.manifest(method)
    if not manifest.is_file():
        raise UipeError(f"{manifest}: no unlearning manifest; run `uipe unlearn --method {method}` first")
    m = json.loads(manifest.read_text())
    if m.get("forget_split") != cfg.data.forget_split:
        raise UipeError(f"{manifest}: unlearned {m.get('forget_split')}, but the search evaluates "
                        f"{cfg.data.forget_split} (data.forget_split); unlearn that split first")
    records = bench.unlearning_records(data, cfg.data.forget_split, get_objective(method).needs_idk)
    if m.get("data_hash") != bench.records_hash(*records):
        raise UipeError(f"{manifest}: unlearned other data than {data} holds now; re-run `uipe unlearn --method "
                        f"{method}` (or point data.source at the data it used)")
    dirs = {int(e["epoch"]): str(e["path"]) for e in m["epochs"]}
    if not dirs:
        raise UipeError(f"{manifest}: lists no epoch checkpoints")
    _check_candidates(m["theta_ini"], dirs)
    return m["theta_ini"], dirs


def _check_candidates(theta_ini: str, dirs: dict[int, str]) -> None:
    """Every candidate readable and shaped as theta_ini (headers and file sizes only): a truncated or corrupt
    file stops the search before it starts, naming the file, instead of failing its trials one by one."""
    from uipe.safetensors_io import read_checkpoint, validate_pair

    ini = read_checkpoint(theta_ini)
    for epoch in sorted(dirs):
        validate_pair(ini, read_checkpoint(dirs[epoch]))


def _identity(space: SearchSpace, setup: TrialSetup, epochs: list[int], threshold: float,
              screening: bool = False) -> str:
    """The search's identity: what a finished or interrupted search folder must match to be reused or resumed.
    Written as searches wrote it before benchmarks had names, so their folders keep being reused: the objective
    words resolved to the benchmark's defaults (spaces named them), the default benchmark left out."""
    bench = get_benchmark(setup.benchmark)
    words = {"objective": space.objective or bench.default_objective, "signal": space.signal or bench.default_signal}
    setup_doc = setup.identity()
    if setup_doc["benchmark"] == DataConfig.model_fields["benchmark"].default:
        del setup_doc["benchmark"]
    space_doc = space.model_dump() | words
    if not space.beyond_global:  # the global form's searches keep the identity they had before forms existed
        for key in ("form", "groups", "weighted", "anchor", "trials_per_extra_dimension"):
            del space_doc[key]
    doc = {"space": space_doc, "setup": setup_doc, "epochs": epochs, "utility_threshold": threshold}
    if screening:  # only when on: the searches made before the option keep their identity
        doc["screening"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _floor(cfg: ExperimentConfig, space: SearchSpace, setup: TrialSetup, epochs: list[int],
           ini: dict[str, float]) -> tuple[float, str]:
    """The search's utility threshold (the space's floor x theta_ini's utility) and its identity."""
    threshold = space.utility_floor * ini[get_benchmark(setup.benchmark).utility]
    return threshold, _identity(space, setup, epochs, threshold, cfg.search.screening)


def _start_metrics(setup: TrialSetup, cache: Path, pool: Any = None, call: list | None = None) -> dict[str, float]:
    """theta_ini's evaluation (the utility the floor refers to), cached beside the search folders; measured by a
    worker of `pool` where there is one (its processes load the model anyway, sharded where a trial's is; the driver
    then loads none), else here. `call`: [a reference to a TrialCall of the setup]."""
    from uipe.eval.reference import model_hash

    want = {"model": model_hash(setup.theta_ini), "eval": setup.eval.model_dump(), "data": setup.data,
            "forget_split": setup.forget_split, "reference": setup.reference}
    measure = (lambda: ray.get(pool.run.remote(call, {}, THETA_INI, 0.0, THETA_INI))) if pool is not None else (
        lambda: theta_ini_metrics(setup))
    return cached_value(cache, want, measure)


def _previous(paths: RunPaths, label: str, identity: str, resume: bool, utility: str) -> SearchOutcome | None:
    """A finished search with this identity (returned as is), an interrupted one (None: restore it when `resume`),
    or an error for a search folder made with another space, checkpoints or data. `utility`: the benchmark's
    utility metric, which a result.json written before the utility was named in it measured."""
    out = paths.search(label)
    state_path = out / STATE_FILE
    if not state_path.is_file():
        if (out / "tune").exists():
            raise UipeError(f"{out}: a search folder without {STATE_FILE}; remove it to start anew")
        return None
    # the identity hashes the space, the checkpoints, the evaluation data and the utility threshold
    reusable(recorded(state_path), {"identity": identity}, out, "holds a search with another space, checkpoints or "
             "data", "refuse")
    if (out / RESULT_FILE).is_file():
        doc = {"utility_metric": utility, **json.loads((out / RESULT_FILE).read_text())}
        return SearchOutcome.from_json(doc, str(out / RESULT_FILE))
    if not resume:
        raise UipeError(f"{out}: an interrupted search is there; pass --resume to continue it, or remove it")
    return None


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one worker of a search's pool holds: workers_per_trial processes of cpus_per_trial and gpus_per_trial."""
    return {"cpu": cfg.search.cpus_per_trial, "gpu": cfg.search.gpus_per_trial, "workers": cfg.search.workers_per_trial}


def _trial_processes(cfg: ExperimentConfig, space: SearchSpace) -> contextlib.AbstractContextManager:
    """The pool the search's trials run in: as many workers as trials run at once."""
    return trial_pool(trial_resources(cfg), space.max_concurrent_trials)


def _execute(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path, space: SearchSpace,
             setup: TrialSetup, epochs: list[int], resume: bool, metric: str) -> SearchOutcome:
    ensure_ray()
    # Save Tune's experiment state after every step (not every >= 10 s), so a driver killed right after a trial
    # finished loses at most that trial's bookkeeping; outcome.finish reconciles MLflow with what Tune kept.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    out = paths.search(space.label(method))
    bench = get_benchmark(setup.benchmark)
    cache = paths.root / "search" / "theta_ini_metrics.json"
    if (out / RESULT_FILE).is_file():  # finished before: reused as it is, with no trial processes, unless it differs
        _, identity = _floor(cfg, space, setup, epochs, _start_metrics(setup, cache))
        previous = _previous(paths, space.label(method), identity, resume, bench.utility)
        if previous is not None:
            say(f"[search {space.label(method)}] finished before with the same space and checkpoints: reusing "
                f"{out / RESULT_FILE}")
            return previous
    start = time.time()
    # The trial processes start first: they import torch and load the model while the driver measures theta_ini
    # (in one of them) and opens the MLflow run, and take the first trial as soon as Tune has started.
    with _trial_processes(cfg, space) as pool:
        probe = [ray.put(TrialCall(setup, 0.0, metric, metrics.snapshot()))]
        pool.warm.remote(probe)
        tracking.ensure_experiment(cfg, paths)  # the store opened (or made) meanwhile; the parent run comes later
        ini = _start_metrics(setup, cache, pool, probe)
        threshold, identity = _floor(cfg, space, setup, epochs, ini)
        _previous(paths, space.label(method), identity, resume, bench.utility)  # refuses another search's folder
        grid, uri, parent = run_experiment(cfg, paths, method, space_path, space, setup, epochs, resume, metric,
                                           pool, ini, threshold, identity)
    total = space.trials_needed(epochs)
    # Tune answers a SIGINT by stopping its trials and returning normally: a search cut short is not finished, and
    # must not be recorded (and later reused) as if it were
    if grid.num_terminated + grid.num_errors < total:
        raise UipeError(f"search {space.label(method)}: stopped after {grid.num_terminated + grid.num_errors} of "
                        f"{total} trials (interrupted); run the same command with --resume to finish it")
    results = trial_results(grid, bench.utility)
    return finish(cfg, paths, method, space, setup, results, ini, threshold, uri, parent, time.time() - start,
                  metric)

