"""What a finished search leaves: the results table and plots, the chosen point, the chosen model written with the
folder form and registered, and every trial as an MLflow child run (back-filled when the server was away).

The results table and Tune's own state are the record: MLflow is brought in line with them here, so a tracking
server that was down during the search loses nothing once it is back (`uipe search --resume` finishes the job).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from uipe import tracking
from uipe.config import ExperimentConfig
from uipe.errors import UipeError
from uipe.io import atomic_write_json, atomic_write_text
from uipe.paths import RunPaths
from uipe.report import base_row, best_at_floors, choose, pareto_front, plot_search, to_csv
from uipe.search.result import TrialResult
from uipe.search.space import SearchSpace
from uipe.search.trial import TrialSetup

RESULT_FILE = "result.json"
LARGE_MODEL_BYTES = 2 * 2**30  # above this the registry gets a pointer to the folder, not a copy


def finish(cfg: ExperimentConfig, paths: RunPaths, method: str, space: SearchSpace, setup: TrialSetup,
           results: list[TrialResult], ini: dict, threshold: float, uri: str, parent: str, wall: float) -> dict:
    """Table, plots, choice, chosen model; everything also on the MLflow parent run. result.json is written last,
    so a search that stops here (a tracking server down) is finished by the next --resume."""
    out = paths.search(method)
    atomic_write_text(out / "results.csv", to_csv(results))
    label = {"forget_quality": "forget quality (KS p-value vs the retain model)",
             "forget_quality_select": "forget quality, selection fold (KS p-value vs the retain model)",
             "holdout_ks": "holdout KS p-value (forget vs holdout truth ratios)",
             "mia_loss_closeness": "1 - 2|MIA AUC - 0.5| (loss attack, forget vs holdout)",
             "mia_min_k_pp_closeness": "1 - 2|MIA AUC - 0.5| (Min-K%++ attack, forget vs holdout)",
             }[space.objective_metric]
    plots = plot_search(results, method, threshold, out, label)
    best, base = choose(results), base_row(results)
    try:
        c = tracking.client(uri)
        reconcile_children(uri, parent, method, results)
        if best is None:
            c.set_terminated(parent, "FAILED")
    except tracking.unreachable_errors() as e:
        raise UipeError(f"search {method}: every trial is in {out / 'results.csv'}, but the tracking server {uri} "
                        f"is unreachable ({type(e).__name__}); run the same command with --resume once it is back "
                        "to log them") from None
    if best is None:
        raise UipeError(f"search {method}: every trial failed; see {out / 'results.csv'} and the MLflow runs")
    work = sum(r.trial_seconds for r in results if r.ok)  # screened-only trials' work too
    summary = {
        "method": method, "objective": space.objective_metric, "chosen": best.summary(),
        "base": base.summary() if base else None,
        "theta_ini": {k: ini.get(k) for k in ("forget_quality", "model_utility", "forget_prob", "related_prob",
                                               "holdout_ks", "mia_loss_auc", "mia_min_k_pp_auc")},
        "utility_threshold": threshold, "feasible": best.feasible,
        "trials": len(results), "failed": sum(not r.ok for r in results),
        "pareto_front": [r.summary() for r in pareto_front(results)], "search_seconds": wall,
        "floors": best_at_floors(results, ini["model_utility"]),
        "trial_work_seconds": work, "fidelity": fidelity_split(results),
        # (wall - trial work) / wall, with wall counted once per concurrent trial slot
        "tune_overhead": 1 - work / (wall * space.max_concurrent_trials) if wall > 0 else None,
        "max_concurrent_trials": space.max_concurrent_trials, "parent_run_id": parent,
    }
    chosen_dir = _write_chosen(setup, best, out / "chosen")
    summary["chosen_model"] = str(chosen_dir)
    atomic_write_text(out / "chosen.yaml", yaml.safe_dump({"method": method, "alpha": best.alpha,
                                                          "epoch": best.epoch, "theta_ini": setup.theta_ini,
                                                          "theta_un": setup.epoch_dirs[best.epoch],
                                                          "model": str(chosen_dir)}, sort_keys=False))
    for p in [out / "results.csv", out / "chosen.yaml", *plots]:
        c.log_artifact(parent, str(p))
    tracking.log_flat(c, parent, {f"chosen_{k}": v for k, v in best.numbers().items()}
                      | {"tune_overhead": summary["tune_overhead"] or 0.0, "search_seconds": wall})
    if cfg.tracking.register_model:
        summary["registered"] = _register(cfg, uri, parent, method, chosen_dir, best)
    c.set_terminated(parent, "FINISHED")
    atomic_write_json(out / RESULT_FILE, summary)
    return summary


def fidelity_split(results: list[TrialResult]) -> dict:
    """How many trials were evaluated in full and how many stopped after screening, and the trial work spent
    screening (scoring passes) against full evaluation."""
    done = [r for r in results if r.ok]
    screen = sum(r.trial_seconds if not r.full else r.metrics.get("screen_seconds", 0.0) for r in done)
    return {"full": sum(r.full for r in done), "screened_only": sum(not r.full for r in done),
            "screening_seconds": screen, "full_seconds": sum(r.trial_seconds for r in done) - screen}


def reconcile_children(uri: str, parent: str, method: str, results: list[TrialResult]) -> None:
    """Exactly one child run per trial of the final results: runs of trials Tune no longer knows (finished just
    before the driver died, then re-sampled after the restore) are deleted; trials without a run (the tracking
    server was away when they finished) are logged now."""
    c = tracking.client(uri)
    exp_id = c.get_run(parent).info.experiment_id
    children = tracking.child_runs(uri, exp_id, parent)
    kept = {r.trial_id for r in results}
    orphans = [run for tid, run in children.items() if tid not in kept]
    for run in orphans:
        c.delete_run(run.info.run_id)
    if orphans:
        c.set_tag(parent, "uipe.orphaned_trial_runs_deleted", str(len(orphans)))
    missing = [r for r in results if r.trial_id and r.trial_id not in children]
    for r in missing:
        tracking.log_trial(uri, exp_id, parent, method, r)
    if missing:
        c.set_tag(parent, "uipe.trial_runs_backfilled", str(len(missing)))


def _write_chosen(setup: TrialSetup, best: TrialResult, dest: Path) -> Path:
    from uipe.extrapolate import extrapolate_folder

    return extrapolate_folder(setup.theta_ini, setup.epoch_dirs[best.epoch], best.alpha, dest,
                              overwrite=True, progress=False)


def _register(cfg: ExperimentConfig, uri: str, parent: str, method: str, chosen: Path, best: TrialResult) -> dict:
    """A copy of a small model goes into the parent run's artifacts; a large one is registered by its path."""
    size = sum(p.stat().st_size for p in chosen.iterdir() if p.is_file())
    c = tracking.client(uri)
    if size <= LARGE_MODEL_BYTES:
        c.log_artifacts(parent, str(chosen), "model")
        source = f"{c.get_run(parent).info.artifact_uri}/model"
    else:
        source = chosen.resolve().as_uri()
    name = cfg.tracking.registered_model_name or f"uipe-{cfg.name}-{method}"
    version = tracking.register_model(uri, name, source, parent, {"alpha": str(best.alpha),
                                                                   "epoch": str(best.epoch), "method": method})
    return {"name": name, "version": version, "alias": tracking.CHAMPION, "source": source}
