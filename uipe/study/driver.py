"""`uipe study`: does automatic alpha selection make unlearning better, by how much, and is it more than noise?

    uipe study --seeds 5                                  # the tiny preset, seeds 0-4, 2 CPU cores
    uipe study --seeds 0,7 --set "unlearn.methods=[ga]"   # chosen seeds, one method

Per seed, in <study>/seed-<s>: a fresh synthetic world (data.synth.seed), fresh reference models and unlearning
(train.seed) and a fresh search (search.seed): `uipe run`, choosing on the forget split's selection fold, with
the base method trained study.longer_factor times as many epochs (<study>/seed-<s>/longer) in the same fit as its
unlearning, before its searches; each epoch of that longer run scored at alpha 0 by the searches' trial processes.
uipe/study/arms.py compares the arms of one seed, uipe/study/aggregate.py the seeds. Every stage is reused when its
outputs exist, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from uipe import tracking
from uipe.config import ExperimentConfig
from uipe.console import Task, say, stage
from uipe.errors import UipeError
from uipe.io import atomic_write_json, atomic_write_text, exclusive
from uipe.methods import UNLEARN_METHODS
from uipe.paths import RunPaths
from uipe.results import TrialResult
from uipe.stages import cached_value, recorded, reusable
from uipe.study.records import SeedResult

IDENTITY_FILE = "study_config.json"  # the configuration the folder was made with (all but the seed list)
STATE_FILE = "study_state.json"  # the study's and each seed's MLflow run
RESULT_FILE = "study.json"


def check_study(cfg: ExperimentConfig, root: Path) -> None:
    """Refuse, before anything is written, a study that cannot compare forget quality or a folder made with another
    configuration (adding seeds to a study is fine: the seed list is not part of its identity)."""
    if cfg.data.benchmark != "tofu":  # its records, folds and cross-fitting read TOFU's forget quality
        raise UipeError(f"uipe study compares TOFU's forget quality on author folds; on {cfg.data.benchmark} run "
                        "scripts/muse_seeds.py (uipe run per seed beside the base method trained longer)")
    if not (cfg.prepare.retain or cfg.eval.retain_reference):
        raise UipeError("uipe study compares forget quality: it needs a retain model (prepare.retain: true) or "
                        "eval.retain_reference")
    reusable(recorded(root / IDENTITY_FILE), _identity(cfg), root, "holds a study made with another configuration",
             "refuse")


def _identity(cfg: ExperimentConfig) -> dict:
    doc = cfg.model_dump(mode="json", exclude={"study": {"seeds"}})
    # options added later, left out while unused, so a study folder made before them is resumed, not refused
    for section, key, unused in (("study", "forms", []), ("search", "form", None), ("search", "anchor", None)):
        if doc[section][key] == unused:
            del doc[section][key]
    for method in UNLEARN_METHODS:  # the parameters of methods the study does not run (and of methods added since)
        if method not in cfg.unlearn.methods:
            doc["unlearn"].pop(method, None)
    return doc


def run_study(cfg: ExperimentConfig, root: Path, command: str) -> dict:
    """Every seed's pipeline and baselines, then the aggregate: study.json, study.md, plots, the MLflow run."""
    root = root.resolve()
    check_study(cfg, root)
    with exclusive(root, "uipe study"):
        if recorded(root / IDENTITY_FILE) is None:
            atomic_write_json(root / IDENTITY_FILE, _identity(cfg))
        return _run(cfg, root, command)


def _run(cfg: ExperimentConfig, root: Path, command: str) -> dict:
    """study.json: the command, the configuration, every seed's record (records.SeedResult.to_json) and the
    aggregate."""
    from uipe.study.aggregate import aggregate, markdown, plot_differences, plot_fronts

    start = time.time()
    uri, exp_id, experiment, study_run = _study_run(cfg, root)
    records = []
    for i, seed in enumerate(cfg.study.seeds):
        stage(f"study: seed {seed} ({i + 1} of {len(cfg.study.seeds)})")
        seed_run = _seed_run(uri, exp_id, study_run, root, seed)
        seed_cfg = seed_config(cfg, seed, uri, experiment, seed_run)
        record = run_seed(seed_cfg, root / f"seed-{seed}", seed)
        _log_seed(uri, seed_run, record)
        records.append(record)
    agg = aggregate(records, cfg.study.floors)
    text = markdown(agg, command)
    plots = [plot_fronts(records, root / "fronts.png"), plot_differences(agg, root / "differences.png")]
    atomic_write_text(root / "study.md", text)
    result = {"command": command, "config": cfg.model_dump(mode="json"), "seeds": [r.to_json() for r in records],
              "aggregate": agg, "seconds": time.time() - start, "mlflow_run_id": study_run}
    atomic_write_json(root / RESULT_FILE, result)
    tracking.log_files(uri, study_run, [root / RESULT_FILE, root / "study.md", *plots])
    tracking.set_terminated(uri, study_run, "FINISHED")
    say(text)
    say(f"Study done in {time.time() - start:.0f} s: {root / 'study.md'}, {root / RESULT_FILE}, plots {root}/*.png")
    return result


def seed_config(cfg: ExperimentConfig, seed: int, uri: str, experiment: str, parent: str) -> ExperimentConfig:
    """The study's configuration for one seed: its own world, training and search seeds; the search chooses on the
    selection fold and, unless the study's configuration says otherwise, tells the sampler finished trials in order,
    so the seed repeats it; its MLflow runs nest under the seed's run in the study's experiment."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}-seed{seed}"
    raw["data"]["synth"]["seed"] = raw["train"]["seed"] = raw["search"]["seed"] = seed
    raw["search"]["select_on"] = "selection_fold"
    if raw["search"]["deterministic"] is None:
        raw["search"]["deterministic"] = True
    raw["tracking"].update(uri=uri, experiment=experiment, parent_run_id=parent)
    return ExperimentConfig.model_validate(raw)


def run_seed(cfg: ExperimentConfig, root: Path, seed: int) -> SeedResult:
    """`uipe run` in the seed's folder with the longer baseline trained before its searches, then per method the
    arms compared (uipe/study/arms.py)."""
    from uipe.pipeline import run_pipeline
    from uipe.report import from_csv
    from uipe.search.pool import shared_trial_pool
    from uipe.study.arms import method_record

    paths = RunPaths.of(root)
    methods = {}
    # one pool of trial processes for the seed's searches, the scoring of the longer runs' epochs and the forms: the
    # longer runs train in the unlearning stage's fit (after the methods' own runs), while no trial process holds a CPU
    with shared_trial_pool():
        summaries = run_pipeline(cfg, paths, (lambda data: [(longer_config(cfg, paths, data), paths.root / "longer")])
                                 if cfg.study.more_baseline else None)
        for s in summaries:  # each method's SearchOutcome (uipe/results.py)
            method = s.method
            search = from_csv((paths.search(method) / "results.csv").read_text())
            longer = longer_trajectory(cfg, paths, method) if cfg.study.more_baseline else []
            forms = {form: form_search(cfg, paths, method, form) for form in cfg.study.forms}
            methods[method] = method_record(search, longer, s.theta_ini, s.utility_threshold, cfg.study.floors,
                                            cfg.unlearn.epochs, cfg.unlearn.epochs * cfg.study.longer_factor, forms)
    return SeedResult(seed, methods, str(root))


def form_search(cfg: ExperimentConfig, paths: RunPaths, method: str, form: str) -> list[TrialResult]:
    """A form beyond one alpha searched on the seed's checkpoints (its own search folder, warm-started from the
    global search's choice); `anchor` is the global form with the anchor epoch searched too."""
    from uipe.report import from_csv
    from uipe.search.driver import run_search

    raw = cfg.model_dump(mode="json")
    raw["search"].update(form="global" if form == "anchor" else form, anchor=form == "anchor")
    stage(f"search {method}: the {form} form")
    outcome = run_search(ExperimentConfig.model_validate(raw), paths, method, resume=True)  # reuses or resumes
    return from_csv((Path(outcome.chosen_model).parent / "results.csv").read_text())


def longer_config(cfg: ExperimentConfig, paths: RunPaths, data: str) -> ExperimentConfig:
    """The more-iterations baseline: the same method, target, data and retain reference, for longer_factor x the
    epochs (its own learning-rate schedule over the longer run, as running the base method longer would have)."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}-longer"
    raw["unlearn"]["epochs"] = cfg.unlearn.epochs * cfg.study.longer_factor
    raw["model"]["target"] = cfg.model.target or str(paths.target_model)
    raw["data"]["source"] = data
    raw["eval"]["retain_reference"] = cfg.eval.retain_reference or str(paths.retain_reference)
    return ExperimentConfig.model_validate(raw)


def longer_trajectory(cfg: ExperimentConfig, paths: RunPaths, method: str) -> list[TrialResult]:
    """Every epoch of the longer run scored at alpha 0 with the search's evaluator (cached beside it)."""
    from uipe.data import ensure_data
    from uipe.search.driver import benchmark_of, make_setup, resolve_space
    from uipe.train.recipe import unlearn

    long_cfg = longer_config(cfg, paths, ensure_data(cfg, paths))
    long_paths = RunPaths.of(paths.root / "longer")
    unlearn(long_cfg, long_paths.root, method)  # trained in the unlearning stage's fit: returns its manifest
    metric = resolve_space(cfg, method, None)[1].objective_metric(benchmark_of(cfg))
    setup = make_setup(long_cfg, long_paths, method)
    epochs = sorted(setup.epoch_dirs)
    want = {"setup": setup.identity(), "objective": metric, "epochs": epochs}
    reports = cached_value(long_paths.root / f"trajectory-{method}.json", want,
                           lambda: _score_epochs(cfg, setup, epochs, metric, method))
    return [TrialResult.from_report(f"longer-e{e}", {"alpha": 0.0, "epoch": e}, r) for e, r in zip(epochs, reports)]


def _score_epochs(cfg: ExperimentConfig, setup, epochs: list[int], metric: str, method: str) -> list[dict]:
    """Each epoch at alpha 0, as a search's trial: in a pool of trial processes (uipe/search/pool.py; the study's
    shared one), as many at once as the cluster's CPUs hold trials."""
    import ray

    from uipe import metrics
    from uipe.search.driver import trial_resources
    from uipe.search.pool import trial_pool
    from uipe.search.trial import TrialCall

    # the searches' resources, so the study's shared pool serves these calls (a sharded trial's group included)
    resources = trial_resources(cfg)
    per_slot = max(cfg.search.cpus_per_trial * cfg.search.workers_per_trial, 1e-9)
    slots = max(1, min(len(epochs), int(ray.cluster_resources().get("CPU", 1) // per_slot)))
    call = [ray.put(TrialCall(setup, 0.0, metric, metrics.snapshot()))]
    with trial_pool(resources, slots) as pool:
        refs = [pool.run.remote(call, {"alpha": 0.0, "epoch": e}, "full", 0.0, f"longer-e{e}") for e in epochs]
        progress, pending = Task(f"score {method} longer", len(refs)), list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            progress.update(len(refs) - len(pending), f"epoch {len(refs) - len(pending)}/{len(refs)} at alpha 0")
        progress.finish()
        return ray.get(refs)


def _study_run(cfg: ExperimentConfig, root: Path) -> tuple[str, str, str, str]:
    """(tracking URI, experiment id, experiment name, the study's MLflow run id), the run made once."""
    experiment = cfg.tracking.experiment or f"uipe-study-{cfg.name}"
    named = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": experiment})})
    uri, exp_id = tracking.ensure_experiment(named, RunPaths.of(root))
    state = recorded(root / STATE_FILE) or {}
    if "study_run_id" not in state:
        run_id = tracking.create_run(uri, exp_id, f"study-{cfg.name}", {"uipe.kind": "study",
                                                                        **tracking.source_tags()})
        tracking.log_flat(uri, run_id, {}, {
            "floors": json.dumps(cfg.study.floors), "longer_factor": cfg.study.longer_factor,
            "methods": json.dumps(cfg.unlearn.methods), "forget_split": cfg.data.forget_split})
        state = {"study_run_id": run_id, "seed_runs": {}}
        atomic_write_json(root / STATE_FILE, state)
    else:
        tracking.resume_run(uri, state["study_run_id"])
    return uri, exp_id, experiment, state["study_run_id"]


def _seed_run(uri: str, exp_id: str, study_run: str, root: Path, seed: int) -> str:
    state = recorded(root / STATE_FILE) or {}
    if str(seed) not in state.get("seed_runs", {}):
        state.setdefault("seed_runs", {})[str(seed)] = tracking.create_run(
            uri, exp_id, f"seed-{seed}", {"uipe.kind": "study-seed", "uipe.seed": str(seed)}, parent=study_run)
        atomic_write_json(root / STATE_FILE, state)
    return state["seed_runs"][str(seed)]


def _log_seed(uri: str, run_id: str, record: SeedResult) -> None:
    """The seed's headline numbers on its run: each arm's forget quality (report fold) and utility per floor."""
    from uipe.decisions import floor_key
    from uipe.study.aggregate import REPORTED, log10_fq
    from uipe.study.records import UTILITY

    numbers = {}
    for method, m in record.methods.items():
        for arm, by_floor in m.arms.items():
            for floor, p in by_floor.items():
                if p is not None:
                    at = f"{method}.{arm}.f{floor_key(floor)}"
                    numbers[f"{at}.{REPORTED}"] = log10_fq(p.forget_quality_report)
                    numbers[f"{at}.{UTILITY}"] = p.utility
        numbers |= {f"{method}.{arm}.hypervolume": v for arm, v in m.hypervolume.items()}
    tracking.log_flat(uri, run_id, numbers)
    tracking.set_terminated(uri, run_id, "FINISHED")
