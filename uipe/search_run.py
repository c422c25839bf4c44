"""Running one search: the MLflow parent run, the Tuner (fresh or restored), and what is done with the results
(table, plots, the chosen configuration, the chosen model written with the folder form and registered).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from uipe.config import ExperimentConfig
from uipe.console import Task, say
from uipe.errors import UipeError
from uipe.ray_jobs import ensure_ray
from uipe.io import atomic_write_json, atomic_write_text, code_version
from uipe.paths import RunPaths
from uipe.report import base_row, choose, completed, pareto_front, plot_search, to_csv
from uipe.search import TrialSetup, theta_ini_metrics, trial
from uipe.search_space import SearchSpace, build_searcher
from uipe import tracking

STATE_FILE = "search_state.json"
RESULT_FILE = "result.json"
LARGE_MODEL_BYTES = 2 * 2**30  # above this the registry gets a pointer to the folder, not a copy


class Progress(tune.Callback):
    """The search's progress display on the driver: trials done, the best feasible forget quality so far, an ETA."""

    def __init__(self, method: str, total: int) -> None:
        self.method, self.total, self.done, self.failed, self.best = method, total, 0, 0, None
        self.task: Task | None = None

    def setup(self, **info: Any) -> None:
        self.task = Task(f"search {self.method}", self.total)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        if r.get("feasible") and (self.best is None or r["forget_quality"] > self.best):
            self.best = r["forget_quality"]
        self._advance(f"last alpha {trial.config['alpha']:.3f} epoch {trial.config['epoch']} "
                      f"FQ {r.get('forget_quality', float('nan')):.3g} MU {r.get('model_utility', float('nan')):.3f}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self._advance(f"last alpha {trial.config['alpha']:.3f} epoch {trial.config['epoch']} FAILED "
                      "(recorded in MLflow; the search goes on)")

    def _advance(self, last: str) -> None:
        self.done += 1
        best = f"{self.best:.3g}" if self.best is not None else "none yet"
        failed = f", {self.failed} failed" if self.failed else ""
        if self.task is not None:
            self.task.update(self.done, f"trial {self.done}/{self.total} | best feasible FQ {best}{failed} | {last}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.task is not None:
            self.task.finish()

    def __getstate__(self) -> dict:  # Tune checkpoints its callbacks; a live display does not pickle
        return {**self.__dict__, "task": None}


def _identity(space: SearchSpace, setup: TrialSetup, epochs: list[int]) -> str:
    doc = {"space": space.model_dump(), "setup": dataclasses.asdict(setup), "epochs": epochs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _parent_run(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path, space: SearchSpace,
                setup: TrialSetup, identity: str) -> tuple[str, str, str]:
    state_path = paths.search(method) / STATE_FILE
    uri, exp_id = tracking.ensure_experiment(cfg, paths)
    if state_path.is_file():
        return uri, exp_id, json.loads(state_path.read_text())["parent_run_id"]
    from uipe.eval.reference import model_hash

    c = tracking.client(uri)
    run = c.create_run(exp_id, run_name=f"search-{method}", tags={
        "uipe.method": method, "uipe.kind": "search", "uipe.code_version": code_version(),
        "uipe.space_file": str(space_path), "uipe.theta_ini": setup.theta_ini, **tracking.source_tags()})
    tracking.log_datasets(c, run.info.run_id, setup.data, _eval_splits(setup), "evaluation")
    tracking.log_flat(c, run.info.run_id, {}, {
        "method": method, "space_file": str(space_path), "sampler": space.sampler, "objective": space.objective,
        "alpha_low": space.alpha.low, "alpha_high": space.alpha.high, "num_samples": space.num_samples,
        "utility_floor": space.utility_floor, "forget_split": setup.forget_split, "theta_ini": setup.theta_ini,
        "checkpoints": json.dumps(setup.epoch_dirs), "data": setup.data, "retain_reference": setup.reference,
        "theta_ini_hash": model_hash(setup.theta_ini), "utility_threshold": setup.utility_threshold,
        "method_params": json.dumps(cfg.method_params(method).model_dump())})
    c.log_text(run.info.run_id, space_path.read_text(), "space.yaml")
    atomic_write_json(state_path, {"identity": identity, "parent_run_id": run.info.run_id, "experiment_id": exp_id})
    return uri, exp_id, run.info.run_id


def _eval_splits(setup: TrialSetup) -> dict[str, list]:
    """The evaluation data a search scores every trial on, by TOFU split name."""
    from uipe.data import eval_split_for
    from uipe.eval.evaluate import eval_records

    names = {"forget": eval_split_for(setup.forget_split), "retain": "retain_perturbed",
             "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed",
             "related": "related_perturbed"}
    return {names[role]: records for role, records in eval_records(setup.data, setup.forget_split).items()}


def _previous(paths: RunPaths, method: str, identity: str, resume: bool) -> dict | None:
    """A finished search with this identity (returned as is), an interrupted one (None: restore it when `resume`),
    or an error for a search folder made with another space, checkpoints or data."""
    out = paths.search(method)
    state_path = out / STATE_FILE
    if not state_path.is_file():
        if (out / "tune").exists():
            raise UipeError(f"{out}: a search folder without {STATE_FILE}; remove it to start anew")
        return None
    if json.loads(state_path.read_text())["identity"] != identity:
        raise UipeError(f"{out}: holds a search with another space, checkpoints or data; remove it (or use "
                        "another --run-dir) to start anew")
    if (out / RESULT_FILE).is_file():
        return json.loads((out / RESULT_FILE).read_text())
    if not resume:
        raise UipeError(f"{out}: an interrupted search is there; pass --resume to continue it, or remove it")
    return None


def _tuner(paths: RunPaths, method: str, space: SearchSpace, setup: TrialSetup, epochs: list[int], seed: int,
           resources: dict[str, float], callbacks: list, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup), resources)
    tune_dir = paths.search(method) / "tune"
    if resume and tune_dir.exists() and tune.Tuner.can_restore(str(tune_dir)):
        # resume_errored=False: a trial that raised stays failed (and Ray 2.60's restart_errored breaks Optuna).
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True)
    searcher = build_searcher(space, epochs, seed)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=space.trials_needed(epochs),
                                    max_concurrent_trials=space.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(paths.search(method)), callbacks=callbacks,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
    )


def _trial_id(result: Any) -> str:
    """Tune's trial id: reported with every result, else read from the trial folder (<name>_<id>_<index>_...)."""
    if result.metrics and "trial_id" in result.metrics:
        return str(result.metrics["trial_id"])
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name) if result.path else None
    return match.group(1) if match else ""


def _rows(grid: tune.ResultGrid) -> list[dict]:
    rows = []
    for r in grid:
        cfg = r.config or {}
        row = {"trial_id": _trial_id(r),
               "alpha": float(cfg.get("alpha", float("nan"))), "epoch": int(cfg.get("epoch", -1))}
        if r.error is None and r.metrics and "forget_quality" in r.metrics:
            row.update({k: v for k, v in r.metrics.items() if isinstance(v, (int, float))}, status="ok")
        else:
            row.update(status="failed", error=str(r.error).splitlines()[-1][:300] if r.error else "no result")
        rows.append(row)
    return rows


def execute(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path, space: SearchSpace,
            setup: TrialSetup, epochs: list[int], resume: bool) -> dict:
    ensure_ray()
    # Save Tune's experiment state after every step (not every >= 10 s), so a driver killed right after a trial
    # finished loses at most that trial's bookkeeping; `_drop_orphans` reconciles MLflow with what Tune kept.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    out = paths.search(method)
    ini = theta_ini_metrics(setup, paths.root / "search" / "theta_ini_metrics.json")
    setup = dataclasses.replace(setup, utility_threshold=space.utility_floor * ini["model_utility"])
    identity = _identity(space, setup, epochs)
    previous = _previous(paths, method, identity, resume)
    if previous is not None:
        say(f"[search {method}] finished before with the same space and checkpoints: reusing {out / RESULT_FILE}")
        return previous
    uri, exp_id, parent = _parent_run(cfg, paths, method, space_path, space, setup, identity)
    total = space.trials_needed(epochs)
    callbacks = [tracking.TrialLogger(uri, exp_id, parent, method), Progress(method, total)]
    resources = {"cpu": cfg.search.cpus_per_trial, "gpu": cfg.search.gpus_per_trial}
    tuner = _tuner(paths, method, space, setup, epochs, cfg.search.seed, resources, callbacks, resume)
    start = time.time()
    grid = tuner.fit()
    wall = time.time() - start
    rows = _rows(grid)
    return finish(cfg, paths, method, space, setup, rows, ini, uri, parent, wall)


def finish(cfg: ExperimentConfig, paths: RunPaths, method: str, space: SearchSpace, setup: TrialSetup,
           rows: list[dict], ini: dict, uri: str, parent: str, wall: float) -> dict:
    """Table, plots, choice, chosen model; everything also on the MLflow parent run."""
    out = paths.search(method)
    c = tracking.client(uri)
    _drop_orphans(uri, parent, rows)
    atomic_write_text(out / "results.csv", to_csv(rows))
    plots = plot_search(rows, method, setup.utility_threshold, out)
    best, base = choose(rows), base_row(rows)
    if best is None:
        c.set_terminated(parent, "FAILED")
        raise UipeError(f"search {method}: every trial failed; see {out / 'results.csv'} and the MLflow runs")
    work = sum(r.get("trial_seconds", 0.0) for r in completed(rows))
    summary = {
        "method": method, "chosen": _pick(best), "base": _pick(base) if base else None,
        "theta_ini": {k: ini.get(k) for k in ("forget_quality", "model_utility", "forget_prob", "related_prob")},
        "utility_threshold": setup.utility_threshold, "feasible": bool(best["feasible"]),
        "trials": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
        "pareto_front": [_pick(r) for r in pareto_front(rows)], "search_seconds": wall, "trial_work_seconds": work,
        # (wall - trial work) / wall, with wall counted once per concurrent trial slot
        "tune_overhead": 1 - work / (wall * space.max_concurrent_trials) if wall > 0 else None,
        "max_concurrent_trials": space.max_concurrent_trials, "parent_run_id": parent,
    }
    chosen_dir = _write_chosen(setup, best, out / "chosen")
    summary["chosen_model"] = str(chosen_dir)
    atomic_write_text(out / "chosen.yaml", yaml.safe_dump({"method": method, "alpha": best["alpha"],
                                                          "epoch": best["epoch"], "theta_ini": setup.theta_ini,
                                                          "theta_un": setup.epoch_dirs[best["epoch"]],
                                                          "model": str(chosen_dir)}, sort_keys=False))
    for p in [out / "results.csv", out / "chosen.yaml", *plots]:
        c.log_artifact(parent, str(p))
    tracking.log_flat(c, parent, {f"chosen_{k}": v for k, v in best.items() if isinstance(v, (int, float))}
                      | {"tune_overhead": summary["tune_overhead"] or 0.0, "search_seconds": wall})
    if cfg.tracking.register_model:
        summary["registered"] = _register(cfg, uri, parent, method, chosen_dir, best)
    c.set_terminated(parent, "FINISHED")
    atomic_write_json(out / RESULT_FILE, summary)
    return summary


def _drop_orphans(uri: str, parent: str, rows: list[dict]) -> None:
    """Child runs of trials Tune no longer knows (finished just before the driver died, then re-sampled after the
    restore) are deleted, so each trial of the final results appears in MLflow exactly once."""
    c = tracking.client(uri)
    kept = {r["trial_id"] for r in rows}
    exp_id = c.get_run(parent).info.experiment_id
    orphans = [run for tid, run in tracking.child_runs(uri, exp_id, parent).items() if tid not in kept]
    for run in orphans:
        c.delete_run(run.info.run_id)
    if orphans:
        c.set_tag(parent, "uipe.orphaned_trial_runs_deleted", str(len(orphans)))


def _pick(row: dict) -> dict:
    keys = ("alpha", "epoch", "forget_quality", "model_utility", "feasible", "forget_prob", "forget_rougeL",
            "related_prob", "related_rougeL", "related_forget_quality")
    return {k: row.get(k) for k in keys}


def _write_chosen(setup: TrialSetup, best: dict, dest: Path) -> Path:
    from uipe.extrapolate import extrapolate_folder

    return extrapolate_folder(setup.theta_ini, setup.epoch_dirs[best["epoch"]], best["alpha"], dest,
                              overwrite=True, progress=False)


def _register(cfg: ExperimentConfig, uri: str, parent: str, method: str, chosen: Path, best: dict) -> dict:
    """A copy of a small model goes into the parent run's artifacts; a large one is registered by its path."""
    size = sum(p.stat().st_size for p in chosen.iterdir() if p.is_file())
    c = tracking.client(uri)
    if size <= LARGE_MODEL_BYTES:
        c.log_artifacts(parent, str(chosen), "model")
        source = f"{c.get_run(parent).info.artifact_uri}/model"
    else:
        source = chosen.resolve().as_uri()
    name = cfg.tracking.registered_model_name or f"uipe-{cfg.name}-{method}"
    version = tracking.register_model(uri, name, source, parent, {"alpha": str(best["alpha"]),
                                                                   "epoch": str(best["epoch"]), "method": method})
    return {"name": name, "version": version, "alias": tracking.CHAMPION, "source": source}
