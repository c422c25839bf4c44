"""The training recipes on the driver, top to bottom: `prepare` (the benchmark's target and retain models) and
`unlearn` (base methods, a Hugging Face model folder per epoch each), Ray Train TorchTrainers running
uipe/train/loop.py; every method of one `unlearn` call trains in one fit (one worker group).

    prepare(cfg, run_dir) -> {"target": meta, "retain": meta}
    unlearn(cfg, run_dir, "ga") -> the manifest path (unlearn/ga/manifest.json)
    unlearn_methods(cfg, run_dir, ["ga", "npo"]) -> {method: manifest path}
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from uipe.benchmarks import Benchmark, get_benchmark
from uipe.checkpoint import config_hash, model_identity, read_meta, require_weights
from uipe.config import ExperimentConfig
from uipe.errors import UipeError
from uipe.gate import rouge_failure, utility_failure
from uipe.io import atomic_write_json, code_version
from uipe.methods import get_objective
from uipe.paths import RunPaths
from uipe.stages import recorded, reusable
from uipe.ray_session import ensure_ray
from uipe.train.driver import (
    check_ray_run, check_workers, epoch_row, fit, group_hash, restore_missing_epochs, runtime, storage_path,
    train_identity,
)
from uipe.train.job import Job
from uipe.train.loop import train_loop


def prepare(cfg: ExperimentConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train TOFU's target (all data) and retain (retain + utility sets) models from the base model (the retain
    model only with prepare.retain: a deployment has none, and searches with a reference-free objective).

    A folder whose uipe_meta.json names the same data and config is reused; one made otherwise is an error.
    Both must pass prepare's gate (uipe.gate): greedy ROUGE-L recall >= prepare.min_rouge on every split they were
    trained on, and model utilities within prepare.max_utility_gap of each other (checked when both were trained
    here; a given model.target is taken as it is). A model that fails is never published or reused.
    """
    from uipe.gate import gate_sample
    from uipe.tiny_model import prepare_base_model

    paths = RunPaths.of(run_dir)
    ensure_ray()
    check_workers(cfg.train)
    for key, value in (("model.base", cfg.model.base), ("model.target", cfg.model.target)):
        if value and value != "tiny":
            require_weights(value, key)
    bench = get_benchmark(cfg.data.benchmark)
    source = bench.ensure_data(cfg, paths)
    split = cfg.data.forget_split
    parts = {role: dict(bench.training_parts(source, split, role)) for role in ("target", "retain")}
    # the utility-gap half of the gate is TOFU's model utility; a raw-text benchmark's models are gated on ROUGE-L
    evaluation = {} if bench.raw_text else {
        role: tuple(records) for role, records in bench.evaluation_records(source, split).items()}
    base = prepare_base_model(cfg, paths, source)
    out: dict[str, Any] = {}
    trained_here = [(role, folder) for role, folder in (("target", paths.target_model), ("retain", paths.retain_model))
                    if not (role == "target" and cfg.model.target)]
    if cfg.model.target:
        out["target"] = {"path": str(cfg.model.target), "trained": False}
    # The recipe (and so each model's identity) does not depend on prepare.retain: a target trained side by side
    # with a retain model is the one a run without a retain model reuses.
    side_by_side = cfg.prepare.side_by_side and len(trained_here) == 2 and cfg.train.num_workers >= 2
    pending = [(role, folder) for role, folder in trained_here if role != "retain" or cfg.prepare.retain]
    train_cfg = cfg.train.model_copy(update={"num_workers": cfg.train.num_workers // 2}) if side_by_side else cfg.train
    job_cfg = cfg.model_copy(update={"train": train_cfg})
    jobs = []
    for role, folder in pending:
        records = tuple(r for part in parts[role].values() for r in part)
        recipe = {"prepare": cfg.prepare.model_dump(mode="json", exclude={"retain"}),  # retain: which, not how
                  "train": train_identity(train_cfg), "model": cfg.model.model_dump(exclude={"target"}),
                  "base": model_identity(base)}
        ident = {"role": role, "forget_split": split, "data_hash": bench.records_hash(records),
                 "config_hash": config_hash(recipe)}
        meta = read_meta(folder)
        if reusable(meta, ident, folder, "trained on other data or settings", "refuse"):
            out[role] = {**meta, "path": str(folder), "trained": False}
            continue
        run_name = f"{cfg.name}-prepare-{role}"
        job = Job(
            label=f"prepare-{role}", objective="finetune", params=None, model_path=str(base), forget=records,
            retain=(), idk=(), epochs=cfg.prepare.epochs, lr=cfg.prepare.lr, train=train_cfg, model=cfg.model,
            job_hash=config_hash(ident), export=str(folder), export_every_epoch=False,
            checkpoint_every=max(1, cfg.prepare.epochs // 3), runtime=runtime(cfg, paths),
            meta={**ident, "kind": role, "base": str(base), "code_version": code_version()},
            schedule=cfg.prepare.schedule, gate=gate_sample(parts[role], cfg.prepare.gate_items, train_cfg.seed),
            eval_splits=evaluation, forget_split=split, eval=cfg.eval, min_rouge=cfg.prepare.min_rouge,
        )
        check_ray_run(storage_path(cfg, paths), run_name, group_hash([job]), folder)
        jobs.append((role, folder, job, run_name))

    def train_one(item: tuple) -> None:
        role, folder, job, run_name = item
        result = fit(job_cfg, paths, [job], run_name, keep_all=False, loop=train_loop,
                     data={job.label: (source, parts[role])})
        counts = {name: len(items) for name, items in job.gate.items()}
        figures = result.return_value["jobs"][job.label]["gate_rouge_l"]
        failure = rouge_failure(role, figures, cfg.prepare.min_rouge, counts)
        if failure:  # one after the other, a failing target stops prepare before the retain model trains
            raise UipeError(failure)
        out[role] = {**read_meta(folder), "path": str(folder), "trained": True}

    if len(jobs) == 2 and side_by_side:  # two TorchTrainers at once: each fit blocks its own thread
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(train_one, jobs))
    else:
        for item in jobs:
            train_one(item)
    check_utility_gap(cfg, paths, out)
    return out


def check_utility_gap(cfg: ExperimentConfig, paths: RunPaths, out: dict[str, Any]) -> None:
    """The second half of the gate: target and retain utilities within prepare.max_utility_gap. A failing pair is
    moved aside (models/<role>.failed, for inspection), so no later stage or rerun uses it."""
    mu = {role: out.get(role, {}).get("model_utility") for role in ("target", "retain")}
    if None in mu.values():
        return  # a given target, no retain model, or the gate switched off for a model: nothing to compare
    failure = utility_failure(mu["target"], mu["retain"], cfg.prepare.max_utility_gap)
    if failure is None:
        return
    for role in ("target", "retain"):  # both were trained here: a given target has no gate figures
        folder = Path(out[role]["path"])
        aside = folder.with_name(folder.name + ".failed")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
    raise UipeError(failure + f"; the models were moved to {paths.target_model.parent}/*.failed")


def check_method_applies(bench: Benchmark, method: str) -> None:
    """One line, before any worker starts, for a method the benchmark's data cannot feed: IdkDPO's "I don't know"
    answers need forget questions, and a raw-text benchmark (MUSE) has none."""
    if get_objective(method).needs_idk and bench.raw_text:
        raise UipeError(f"unlearn {method}: needs forget questions to answer \"I don't know\" to, and "
                        f"{bench.name}'s forget set is raw text; choose another method (unlearn.methods)")


def unlearn(cfg: ExperimentConfig, run_dir: str | Path, method: str, resume: bool = True) -> Path:
    """Run `method` for unlearn.epochs from the target model: unlearn_methods with one method."""
    return unlearn_methods(cfg, run_dir, [method], resume)[method]


def unlearn_methods(cfg: ExperimentConfig, run_dir: str | Path, methods: list[str], resume: bool = True,
                    more: Sequence[tuple[ExperimentConfig, Path]] = ()) -> dict[str, Path]:
    """Run each method for unlearn.epochs from the target model, all in one fit (one worker group, theta_ini and the
    frozen reference loaded once); an HF folder per epoch and a manifest per method, written last.

    `more`: other runs of the same methods from the same target, each (its config, its run folder), trained in the
    same fit after these (e.g. a study seed's more-iterations baseline: other epochs, its own folder); their jobs are
    labelled `<method>-<folder name>`, and each keeps its folders, manifests and identities as if run alone.

    Re-running resumes (same methods, same job hashes): a method with a manifest is done, the fit resumes the
    others; a run folder holding another config's results is an error. resume=False deletes these methods' earlier
    results (folders and the fit's Ray checkpoints) first.
    """
    if not methods or len(set(methods)) < len(methods):
        raise UipeError(f"unlearn: methods {methods} must name at least one method, each once")
    paths = RunPaths.of(run_dir)
    runs = [(cfg, paths, "")] + [(c, RunPaths.of(d), Path(d).name) for c, d in more]
    if len({suffix for _, _, suffix in runs[1:]}) < len(more):  # the folder's name tells their jobs apart
        raise UipeError(f"unlearn: the runs {[str(p.root) for _, p, _ in runs[1:]]} need folders of different names")
    bench = get_benchmark(cfg.data.benchmark)
    for method in methods:
        check_method_applies(bench, method)
    theta_ini = require_weights(cfg.model.target or paths.target_model, "target model")
    for run_cfg, run_paths, _ in runs[1:]:  # one worker group: one start model, one benchmark's data
        start = Path(run_cfg.model.target or run_paths.target_model)
        if start.resolve() != Path(theta_ini).resolve() or run_cfg.data.benchmark != cfg.data.benchmark:
            raise UipeError(f"unlearn: {run_paths.root} starts from {start} on {run_cfg.data.benchmark}, not from "
                            f"{theta_ini} on {cfg.data.benchmark}: only runs of one target and benchmark share a fit")
    for method in methods:  # e.g. RMU's layer within the model's depth: one line, before any worker starts
        objective = get_objective(method)
        if objective.check is not None:
            from transformers import AutoConfig

            objective.check(cfg.method_params(method),
                            AutoConfig.from_pretrained(theta_ini, trust_remote_code=cfg.model.trust_remote_code))
    ensure_ray()
    check_workers(cfg.train)
    # (config, paths, method, job, data hash) per job, these methods' first; a job's label names its checkpoints
    entries, data = [], {}
    for run_cfg, run_paths, suffix in runs:
        source = bench.ensure_data(run_cfg, run_paths)
        for method in methods:
            job, splits, data_hash = unlearn_job(run_cfg, run_paths, bench, source, method, theta_ini)
            job = dataclasses.replace(job, label=f"{method}-{suffix}" if suffix else method)
            entries.append((run_cfg, run_paths, method, job, data_hash))
            data[job.label] = (source, splits)
    jobs = [job for *_, job, _ in entries]
    labels = [job.label for job in jobs]
    storage, run_name = storage_path(cfg, paths), f"{cfg.name}-{'+'.join(labels)}"
    if not resume:
        for _, run_paths, method, _, _ in entries:
            shutil.rmtree(run_paths.unlearn(method), ignore_errors=True)
        if "://" not in storage:
            shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    check_ray_run(storage, run_name, group_hash(jobs), paths.unlearn(methods[0]))
    done = frozenset(job.label for _, run_paths, method, job, _ in entries
                     if reusable(recorded(run_paths.manifest(method)), {"job_hash": job.job_hash},
                                 run_paths.unlearn(method)))
    if len(done) < len(jobs):
        for _, run_paths, method, job, _ in entries:
            if job.label not in done:
                atomic_write_json(run_paths.unlearn(method) / "job.json", {
                    "job_hash": job.job_hash, "method": method, "theta_ini": str(theta_ini)})
        t_fit = time.perf_counter()
        result = fit(cfg, paths, jobs, run_name, keep_all=True, loop=train_loop, data=data, skip=done)
        fit_seconds = time.perf_counter() - t_fit
        for run_cfg, run_paths, method, job, data_hash in entries:
            if job.label not in done:
                write_manifest(run_cfg, run_paths, method, job, data_hash, result, fit_seconds, labels)
    return {method: paths.manifest(method) for method in methods}


def unlearn_job(cfg: ExperimentConfig, paths: RunPaths, bench: Benchmark, source: str, method: str,
                theta_ini: Path) -> tuple[Job, dict[str, Any], str]:
    """`method`'s Job, its named training splits and their hash, after refusing a folder that holds another
    config's results."""
    objective, params = get_objective(method), cfg.method_params(method)
    forget, retain, idk = bench.unlearning_records(source, cfg.data.forget_split, objective.needs_idk)
    data_hash = bench.records_hash(forget, retain, idk)
    ident = {"method": method, "params": params, "unlearn": cfg.unlearn.model_dump(include={"epochs", "lr"}),
             "train": train_identity(cfg.train), "model": cfg.model.model_dump(exclude={"target", "base"}),
             "theta_ini": model_identity(theta_ini), "data_hash": data_hash, "forget_split": cfg.data.forget_split}
    job_hash = config_hash(ident)
    folder = paths.unlearn(method)
    job_file = folder / "job.json"
    old = recorded(job_file)
    if old is None and folder.exists() and any(folder.iterdir()):
        raise UipeError(f"{folder}: results without a {job_file.name}; use a new run folder or delete it")
    reusable(old, {"job_hash": job_hash}, folder, "results of a different config/data", "refuse")
    meta = {"kind": "unlearn", "method": method, "theta_ini": str(theta_ini), "job_hash": job_hash,
            "params": params.model_dump(), "code_version": code_version()}
    job = Job(
        label=method, objective=method, params=params, model_path=str(theta_ini), forget=tuple(forget),
        retain=tuple(retain), idk=idk, epochs=cfg.unlearn.epochs, lr=cfg.unlearn.lr, train=cfg.train, model=cfg.model,
        job_hash=job_hash, export=str(folder), export_every_epoch=True, checkpoint_every=1,
        runtime=runtime(cfg, paths), meta=meta,
    )
    return job, dict(zip(bench.unlearning_split_names(cfg.data.forget_split), (forget, retain))), data_hash


def write_manifest(cfg: ExperimentConfig, paths: RunPaths, method: str, job: Job, data_hash: str, result: Any,
                   fit_seconds: float, group: list[str]) -> None:
    """What the search reads of a finished method: its epoch folders (restored from Ray if deleted), their
    training metrics, identities, and where the time went (`group`: the jobs that shared the fit)."""
    out = result.return_value
    mine = out["jobs"][job.label]
    timing = {"fit_seconds": fit_seconds, "fit_methods": group, "worker_setup_seconds": out["setup_seconds"],
              "job_setup_seconds": mine["job_setup_seconds"], "job_seconds": mine["job_seconds"],
              "worker_loop_seconds": out["loop_seconds"]}
    epochs = restore_missing_epochs(result, paths, method, cfg.unlearn.epochs, job.label)
    atomic_write_json(paths.manifest(method), {
        "method": method, "params": job.meta["params"], "theta_ini": job.model_path, "job_hash": job.job_hash,
        "data_hash": data_hash, "forget_split": cfg.data.forget_split, "code_version": code_version(),
        "lr": cfg.unlearn.lr, "epochs": [{"epoch": e, "path": str(p), **epoch_row(mine["history"], e)}
                                         for e, p in epochs],
        "optimizer_steps": mine["optimizer_steps"], "ray_run": str(result.path), "timing": timing,
    })
