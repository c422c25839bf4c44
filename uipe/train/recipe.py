"""Training on Ray Train (V2) with FSDP2: `prepare` (TOFU's target and retain models) and `unlearn` (a base method,
a Hugging Face model folder per epoch). One loop, `train_loop`, read top to bottom: setup, train, save.

    prepare(cfg, run_dir) -> {"target": meta, "retain": meta}
    unlearn(cfg, run_dir, method) -> the manifest path (unlearn/<method>/manifest.json)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uipe.checkpoint import (
    config_hash, link_tree, load_train_state, model_identity, read_meta, records_hash, require_weights,
    save_train_state,
)
from uipe.config import ExperimentConfig
from uipe.errors import UipeError
from uipe.gate import rouge_failure, utility_failure
from uipe.io import atomic_write_json, code_version
from uipe.methods import UNLEARN_METHODS, get_objective
from uipe.paths import RunPaths
from uipe.ray_jobs import (
    check_ray_run, check_workers, ensure_ray, epoch_row, fit, read_json, restore_missing_epochs,
    runtime, storage_path, train_identity,
)
from uipe.progress import Reporter
from uipe.train_parts import (
    Job, Streams, accumulation_groups, export_epoch, finish_prepare, full_value, load_sharded, lr_factor, maybe_fail,
    mean_over_ranks,
)

# ==== the loop (runs on every Ray Train worker) =====================================================================


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from ray.train import Checkpoint
    from torch.distributed.device_mesh import init_device_mesh

    from uipe.models import load_tokenizer

    # ---- setup: process, device, data, sharded models, optimiser, and the state to resume from ----
    job: Job = config["job"]
    t_start = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # ~20x slower training here without it
    torch.set_num_threads(job.train.threads_per_worker)
    torch.manual_seed(job.train.seed)
    device = ray.train.torch.get_device() if job.runtime.use_gpu else torch.device("cpu")
    objective = get_objective(job.objective)
    streams = Streams(job, load_tokenizer(job.model_path), rank, world, objective.needs_retain, objective.needs_idk)
    mesh = init_device_mesh(device.type, (world,))
    model = load_sharded(job, device, mesh, trainable=True)
    ref = load_sharded(job, device, mesh, trainable=False) if objective.needs_ref else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.train.weight_decay)
    accum = job.train.effective_batch_size // (job.train.micro_batch_size * world)
    groups = accumulation_groups(streams.micro_batches_per_epoch(), accum)
    warmup = round(job.train.warmup_epochs * len(groups))
    total_steps = job.epochs * len(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total_steps,
                                                                     schedule=job.schedule))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "job_hash": job.job_hash}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure, or a re-run of the same run name: continue exactly
        with checkpoint.as_directory() as folder:
            state = load_train_state(Path(folder), model, optimizer)
        if state["job_hash"] != job.job_hash:
            raise RuntimeError(f"Ray checkpoint {checkpoint.path} belongs to another job; use a new run folder")
        scheduler.load_state_dict(state["scheduler"])
    report = Reporter(job.runtime.board) if rank == 0 else None  # to the driver, which logs and shows it

    setup_seconds = time.perf_counter() - t_start

    # ---- train: one optimizer step per group of micro-batches, metrics averaged over ranks per epoch ----
    for epoch in range(state["epoch"] + 1, job.epochs + 1):
        t0, sums, n_micro, tokens = time.perf_counter(), {}, 0, 0
        batches = streams.epoch(epoch, device)
        for size in groups:
            t_step, step_tokens = time.perf_counter(), 0
            for k in range(size):
                batch, n_tok = next(batches)
                model.set_requires_gradient_sync(k == size - 1)  # reduce-scatter once per optimizer step
                loss, metrics = objective.compute(model, ref, batch, job.params)
                (loss / size).backward()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                n_micro, step_tokens = n_micro + 1, step_tokens + n_tok
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            tokens += step_tokens
            maybe_fail(job.runtime.fault, epoch, rank)
            if report is not None:  # the last micro-batch's terms; tokens/s counts every rank's tokens
                report.step(state["step"], {**{k: float(v) for k, v in metrics.items()},
                                            "lr": scheduler.get_last_lr()[0], "grad_norm": float(full_value(grad_norm)),
                                            "tokens_per_s": step_tokens * world / (time.perf_counter() - t_step)})
        epoch_metrics = mean_over_ranks(sums, n_micro, device)
        seconds = time.perf_counter() - t0
        epoch_metrics |= {"epoch": epoch, "optimizer_steps": state["step"], "seconds": seconds,
                          "tokens_per_s": tokens * world / seconds}
        state["history"].append(epoch_metrics)
        state["epoch"], state["scheduler"] = epoch, scheduler.state_dict()
        if report is not None:
            report.epoch(epoch, state["step"], {**epoch_metrics, "total_steps": total_steps})

        # ---- save: an HF folder per epoch (unlearn), the sharded state as a Ray checkpoint (resume) ----
        hf_folder = None
        if job.export_every_epoch:
            hf_folder = export_epoch(job, model, Path(job.export) / f"epoch_{epoch:02d}", device, rank,
                                     {**job.meta, **epoch_metrics})
        if job.export_every_epoch or epoch % job.checkpoint_every == 0 or epoch == job.epochs:
            with tempfile.TemporaryDirectory(prefix="uipe-ckpt-") as tmp:
                save_train_state(Path(tmp), model, optimizer, state, rank)
                if hf_folder is not None:
                    link_tree(hf_folder, Path(tmp) / "hf")
                ray.train.report(epoch_metrics, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch:02d}")

    # ---- prepare: gate on greedy ROUGE-L, then publish the final folder ----
    result: dict[str, Any] = {"history": state["history"], "optimizer_steps": state["step"],
                              "setup_seconds": setup_seconds, "loop_seconds": time.perf_counter() - t_start}
    if not job.export_every_epoch:
        result |= finish_prepare(job, model, device, rank, state)
        if report is not None:  # the gate's figures beside the training curves
            gate = {f"gate_rouge_l_{k}": v for k, v in result["gate_rouge_l"].items()}
            if result["model_utility"] is not None:
                gate["gate_model_utility"] = result["model_utility"]
            report.final(state["step"], gate)
    return result


# ==== the driver: one TorchTrainer per model ==========================================================================


def prepare(cfg: ExperimentConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train TOFU's target (all data) and retain (retain + utility sets) models from the base model.

    A folder whose uipe_meta.json names the same data and config is reused; one made otherwise is an error.
    Both must pass prepare's gate (uipe.gate): greedy ROUGE-L recall >= prepare.min_rouge on every split they were
    trained on, and model utilities within prepare.max_utility_gap of each other (checked when both were trained
    here; a given model.target is taken as it is). A model that fails is never published or reused.
    """
    from uipe.data import ensure_data, training_parts
    from uipe.eval.evaluate import eval_records
    from uipe.gate import gate_sample
    from uipe.models import prepare_base_model

    paths = RunPaths.of(run_dir)
    ensure_ray()
    check_workers(cfg.train)
    for key, value in (("model.base", cfg.model.base), ("model.target", cfg.model.target)):
        if value and value != "tiny":
            require_weights(value, key)
    source = ensure_data(cfg, paths)
    split = cfg.data.forget_split
    parts = {role: training_parts(source, split, role) for role in ("target", "retain")}
    evaluation = {role: tuple(records) for role, records in eval_records(source, split).items()}
    base = prepare_base_model(cfg, paths, source)
    out: dict[str, Any] = {}
    pending = [(role, folder) for role, folder in (("target", paths.target_model), ("retain", paths.retain_model))
               if not (role == "target" and cfg.model.target)]
    if cfg.model.target:
        out["target"] = {"path": str(cfg.model.target), "trained": False}
    side_by_side = cfg.prepare.side_by_side and len(pending) == 2 and cfg.train.num_workers >= 2
    train_cfg = cfg.train.model_copy(update={"num_workers": cfg.train.num_workers // 2}) if side_by_side else cfg.train
    job_cfg = cfg.model_copy(update={"train": train_cfg})
    jobs = []
    for role, folder in pending:
        records = tuple(r for part in parts[role].values() for r in part)
        ident = {"role": role, "forget_split": split, "data_hash": records_hash(records), "config_hash": config_hash({
            "prepare": cfg.prepare, "train": train_identity(train_cfg), "model": cfg.model.model_dump(
                exclude={"target"}), "base": model_identity(base)})}
        meta = read_meta(folder)
        if meta is not None:
            if {k: meta.get(k) for k in ident} != ident:
                raise UipeError(f"{folder}: trained on other data or settings; use a new run folder or delete it")
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
        check_ray_run(storage_path(cfg, paths), run_name, job.job_hash, folder)
        jobs.append((role, folder, job, run_name))

    def train_one(item: tuple) -> None:
        role, folder, job, run_name = item
        result = fit(job_cfg, paths, job, run_name, keep_all=False, loop=train_loop, data=(source, parts[role]))
        counts = {name: len(items) for name, items in job.gate.items()}
        failure = rouge_failure(role, result.return_value["gate_rouge_l"], cfg.prepare.min_rouge, counts)
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
    mu = {role: out[role].get("model_utility") for role in ("target", "retain")}
    if None in mu.values():
        return  # a given target, or the gate switched off for a model: nothing to compare
    failure = utility_failure(mu["target"], mu["retain"], cfg.prepare.max_utility_gap)
    if failure is None:
        return
    for role in ("target", "retain"):  # both were trained here: a given target has no gate figures
        folder = Path(out[role]["path"])
        aside = folder.with_name(folder.name + ".failed")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
    raise UipeError(failure + f"; the models were moved to {paths.target_model.parent}/*.failed")


def unlearn(cfg: ExperimentConfig, run_dir: str | Path, method: str, resume: bool = True) -> Path:
    """Run `method` for unlearn.epochs from the target model; an HF folder per epoch and a manifest, written last.

    Re-running resumes (same run name, same job hash); a run folder holding another config's results is an error.
    resume=False deletes this method's earlier results (folders and Ray checkpoints) first.
    """
    from uipe.data import RETAIN_FOR, ensure_data, forget_and_retain, load_idk

    if method not in UNLEARN_METHODS:
        raise UipeError(f"unknown method {method!r}; choose one of {', '.join(UNLEARN_METHODS)}")
    objective, params = get_objective(method), cfg.method_params(method)
    paths = RunPaths.of(run_dir)
    theta_ini = require_weights(cfg.model.target or paths.target_model, "target model")
    ensure_ray()
    check_workers(cfg.train)
    source = ensure_data(cfg, paths)
    forget, retain = forget_and_retain(source, cfg.data.forget_split)
    idk = tuple(load_idk(source)) if objective.needs_idk else ()
    data_hash = records_hash(forget, retain, idk)
    ident = {"method": method, "params": params, "unlearn": cfg.unlearn.model_dump(include={"epochs", "lr"}),
             "train": train_identity(cfg.train), "model": cfg.model.model_dump(exclude={"target", "base"}),
             "theta_ini": model_identity(theta_ini), "data_hash": data_hash, "forget_split": cfg.data.forget_split}
    job_hash = config_hash(ident)
    folder, storage, run_name = paths.unlearn(method), storage_path(cfg, paths), f"{cfg.name}-{method}"
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
        if "://" not in storage:
            shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    job_file = folder / "job.json"
    old = read_json(job_file)
    if (old or {}).get("job_hash", job_hash) != job_hash or (old is None and folder.exists() and any(folder.iterdir())):
        raise UipeError(f"{folder}: results of a different config/data; use a new run folder or delete it")
    check_ray_run(storage, run_name, job_hash, folder)
    manifest = read_json(paths.manifest(method))
    if manifest is not None and manifest["job_hash"] == job_hash:
        return paths.manifest(method)  # finished before: nothing to do
    atomic_write_json(job_file, {"job_hash": job_hash, "method": method, "theta_ini": str(theta_ini)})
    meta = {"kind": "unlearn", "method": method, "theta_ini": str(theta_ini), "job_hash": job_hash,
            "params": params.model_dump(), "code_version": code_version()}
    job = Job(
        label=method, objective=method, params=params, model_path=str(theta_ini), forget=tuple(forget),
        retain=tuple(retain), idk=idk, epochs=cfg.unlearn.epochs, lr=cfg.unlearn.lr, train=cfg.train, model=cfg.model,
        job_hash=job_hash, export=str(folder), export_every_epoch=True, checkpoint_every=1,
        runtime=runtime(cfg, paths), meta=meta,
    )
    t_fit = time.perf_counter()
    splits = {cfg.data.forget_split: forget, RETAIN_FOR[cfg.data.forget_split]: retain}
    result = fit(cfg, paths, job, run_name, keep_all=True, loop=train_loop, data=(source, splits))
    timing = {"fit_seconds": time.perf_counter() - t_fit, "worker_setup_seconds": result.return_value["setup_seconds"],
              "worker_loop_seconds": result.return_value["loop_seconds"]}
    epochs = restore_missing_epochs(result, paths, method, cfg.unlearn.epochs)
    history = result.return_value["history"]
    atomic_write_json(paths.manifest(method), {
        "method": method, "params": params.model_dump(), "theta_ini": str(theta_ini), "job_hash": job_hash,
        "data_hash": data_hash, "forget_split": cfg.data.forget_split, "code_version": code_version(),
        "lr": cfg.unlearn.lr, "epochs": [{"epoch": e, "path": str(p), **epoch_row(history, e)} for e, p in epochs],
        "optimizer_steps": result.return_value["optimizer_steps"], "ray_run": str(result.path), "timing": timing,
    })
    return paths.manifest(method)
