"""What a finished search leaves: the results table and plots, the chosen point, the chosen model written with the
folder form and registered, and every trial as an MLflow child run (back-filled when the server was away).

The results table and Tune's own state are the record: MLflow is brought in line with them here, so a tracking
server that was down during the search loses nothing once it is back (`uipe search --resume` finishes the job).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from uipe import metrics, tracking
from uipe.benchmarks import get_benchmark
from uipe.coefficients import Extrapolation
from uipe.config import ExperimentConfig
from uipe.decisions import base_row, best_at_floors, choose, pareto_front
from uipe.errors import UipeError
from uipe.io import atomic_write_json, atomic_write_text
from uipe.model_registry import CHAMPION, register_model
from uipe.paths import RunPaths
from uipe.report import plot_search, to_csv
from uipe.results import SearchOutcome, TrialResult
from uipe.search.space import SearchSpace
from uipe.search.trial import TrialSetup, resolve_point

RESULT_FILE = "result.json"
LARGE_MODEL_BYTES = 2 * 2**30  # above this the registry gets a pointer to the folder, not a copy


def finish(cfg: ExperimentConfig, paths: RunPaths, method: str, space: SearchSpace, setup: TrialSetup,
           results: list[TrialResult], ini: dict, threshold: float, uri: str, parent: str, wall: float,
           objective: str) -> SearchOutcome:
    """Table, plots, choice, chosen model; everything also on the MLflow parent run. result.json is written last,
    so a search that stops here (a tracking server down) is finished by the next --resume. `objective`: the
    catalogue name of the metric the search maximised."""
    out = paths.search(space.label(method))
    utility = get_benchmark(setup.benchmark).utility
    atomic_write_text(out / "results.csv", to_csv(results))
    plots = plot_search(results, method, threshold, out, objective, utility)
    best, base = choose(results), base_row(results)
    try:
        reconcile_children(uri, parent, method, results)
        if best is None:
            tracking.set_terminated(uri, parent, "FAILED")
    except tracking.unreachable_errors() as e:
        raise UipeError(f"search {method}: every trial is in {out / 'results.csv'}, but the tracking server {uri} "
                        f"is unreachable ({type(e).__name__}); run the same command with --resume once it is back "
                        "to log them") from None
    if best is None:
        raise UipeError(f"search {method}: every trial failed; see {out / 'results.csv'} and the MLflow runs")
    work = sum(r.trial_seconds for r in results if r.ok)  # screened-only trials' work too
    chosen_dir = _write_chosen(setup, best, out / "chosen")
    outcome = SearchOutcome(
        method=method, objective=objective, utility_metric=utility, chosen=best.summary(),
        base=base.summary() if base else None,
        theta_ini={k: ini.get(k) for k in metrics.benchmark_headline(ini)},
        utility_threshold=threshold, feasible=best.feasible,
        trials=len(results), failed=sum(not r.ok for r in results),
        pareto_front=[r.summary() for r in pareto_front(results)], search_seconds=wall,
        floors=best_at_floors(results, ini[utility]),
        trial_work_seconds=work, fidelity=fidelity_split(results),
        # (wall - trial work) / wall, with wall counted once per concurrent trial slot
        tune_overhead=1 - work / (wall * space.max_concurrent_trials) if wall > 0 else None,
        max_concurrent_trials=space.max_concurrent_trials, parent_run_id=parent, chosen_model=str(chosen_dir),
        form=space.form_name)
    atomic_write_text(out / "chosen.yaml", yaml.safe_dump(_chosen_doc(method, space, setup, best, chosen_dir),
                                                          sort_keys=False))
    tracking.log_files(uri, parent, [out / "results.csv", out / "chosen.yaml", *plots])
    chosen = best.numbers() | {k: best.metric(k) for k in metrics.headline(best.metrics)}
    tracking.log_flat(uri, parent, {f"chosen_{k}": v for k, v in chosen.items()}
                      | {"tune_overhead": outcome.tune_overhead or 0.0, "search_seconds": wall})
    if cfg.tracking.register_model:
        outcome = replace(outcome, registered=_register(cfg, uri, parent, method, space, chosen_dir, best))
    tracking.set_terminated(uri, parent, "FINISHED")
    atomic_write_json(out / RESULT_FILE, outcome.to_json())
    return outcome


def fidelity_split(results: list[TrialResult]) -> dict:
    """How many trials were evaluated in full and how many stopped after screening, and the trial work spent
    screening (scoring passes) against full evaluation."""
    done = [r for r in results if r.ok]
    screen = sum(r.trial_seconds if not r.full else r.screen_seconds for r in done)
    return {"full": sum(r.full for r in done), "screened_only": sum(not r.full for r in done),
            "screening_seconds": screen, "full_seconds": sum(r.trial_seconds for r in done) - screen}


def reconcile_children(uri: str, parent: str, method: str, results: list[TrialResult]) -> None:
    """Exactly one whole child run per trial of the final results, saying what the results say. Deleted: runs of
    trials Tune no longer knows (finished just before the driver died, then re-sampled after the restore), runs cut
    short (the driver killed while logging them), runs whose outcome the final results contradict (a trial failed by
    a lost Ray node, run again after the restore: seen in the chaos run), and a second run of one trial. Trials
    without such a run (the tracking server was away when they finished) are logged now."""
    exp_id = tracking.experiment_of(uri, parent)
    want = {r.trial_id: "FINISHED" if r.ok else "FAILED" for r in results}
    whole: set[str] = set()
    stale = []
    for trial_id, run_id, status in tracking.children(uri, exp_id, parent):
        if want.get(trial_id) == status and trial_id not in whole:
            whole.add(trial_id)
        else:
            stale.append(run_id)
    for run_id in stale:
        tracking.delete_run(uri, run_id)
    if stale:
        tracking.set_tag(uri, parent, "uipe.orphaned_trial_runs_deleted", str(len(stale)))
    missing = [r for r in results if r.trial_id and r.trial_id not in whole]
    for r in missing:
        tracking.log_trial(uri, exp_id, parent, method, r, check=False)
    if missing:
        tracking.set_tag(uri, parent, "uipe.trial_runs_backfilled", str(len(missing)))


def _chosen_doc(method: str, space: SearchSpace, setup: TrialSetup, best: TrialResult, model: Path) -> dict:
    """chosen.yaml: the point with its full coefficient vector and the folders it was extrapolated from."""
    r = resolve_point(setup, Extrapolation.from_vector(best.epoch, best.alpha, best.coefficients))
    return {"method": method, "form": space.form, "alpha": best.alpha, "epoch": best.epoch, **best.coefficients,
            "theta_ini": setup.theta_ini, "base": r.base, "theta_un": r.unlearned, "importance": r.importance,
            "model": str(model)}


def _write_chosen(setup: TrialSetup, best: TrialResult, dest: Path) -> Path:
    from uipe.extrapolate import extrapolate_folder

    r = resolve_point(setup, Extrapolation.from_vector(best.epoch, best.alpha, best.coefficients))
    return extrapolate_folder(r.base, r.unlearned, r.coefficients, dest, overwrite=True, progress=False,
                              importance=r.importance, record={"form": r.point.form, **r.point.vector()})


def _register(cfg: ExperimentConfig, uri: str, parent: str, method: str, space: SearchSpace, chosen: Path,
              best: TrialResult) -> dict:
    """A copy of a small model goes into the parent run's artifacts; a large one is registered by its path. Tags:
    the point's alpha, epoch, form and full coefficient vector."""
    size = sum(p.stat().st_size for p in chosen.iterdir() if p.is_file())
    name = cfg.tracking.registered_model_name or f"uipe-{cfg.name}-{space.label(method)}"
    tags = {"alpha": str(best.alpha), "epoch": str(best.epoch), "method": method, "form": space.form,
            **{k: str(v) for k, v in best.coefficients.items()}}
    version, source = register_model(uri, name, chosen, parent, tags, copy=size <= LARGE_MODEL_BYTES)
    return {"name": name, "version": version, "alias": CHAMPION, "source": source}
