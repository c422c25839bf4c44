"""The training loop every Ray Train worker runs, read top to bottom: setup, train, save. One loop serves
`prepare` (objective finetune, gated final model) and `unlearn` (a base method, a Hugging Face folder per epoch);
uipe/train/recipe.py builds the Jobs on the driver.

A fit runs a group of jobs in order on one worker group (issue 27: starting a worker group costs 15-20 s on the tiny
preset, a method trains for ~12 s of it). The group's processes, tokenizer and frozen reference are set up once;
each job starts from theta_ini again (its own shards re-read from the page cache), with its own seed, optimizer,
schedule, exports and checkpoints, so it trains exactly as it would in a fit of its own.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uipe.checkpoint import load_train_state
from uipe.methods import get_objective
from uipe.models import peak_memory_bytes
from uipe.progress import Reporter
from uipe.train.export import finish_prepare
from uipe.train.job import Job
from uipe.train.saving import EpochSaver
from uipe.train.sharding import full_value, load_sharded, mean_over_ranks, reload_initial, sync_gradients
from uipe.train.streams import Streams


@dataclass
class Worker:
    """What a rank sets up once and every job of its group shares."""

    rank: int
    world: int
    device: torch.device
    mesh: Any
    tokenizer: Any
    ref: torch.nn.Module | None  # the frozen theta_ini, where some job needs it
    group_hash: str
    saver: EpochSaver


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from torch.distributed.device_mesh import init_device_mesh

    from uipe.checkpoint import STATE_FILE
    from uipe.models import load_tokenizer

    # ---- setup, once per worker group: process, device, tokenizer, frozen reference, where to resume ----
    jobs: tuple[Job, ...] = config["jobs"]
    t_start, first = time.perf_counter(), jobs[0]  # the driver checked: one theta_ini, model and train config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # ~20x slower training here without it
    torch.set_num_threads(first.train.threads_per_worker)
    device = ray.train.torch.get_device() if first.runtime.use_gpu else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    checkpoint = ray.train.get_checkpoint()  # a restart after a failure, or a re-run of the same run name
    state: dict[str, Any] = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
        if state["job_hash"] != config["group_hash"]:
            raise RuntimeError(f"Ray checkpoint {checkpoint.path} belongs to another job; use a new run folder")
    done: dict[str, dict[str, Any]] = dict(state.get("done", {}))  # finished jobs' results, carried in each state
    if state and state["epoch"] == jobs[state["job"]].epochs and jobs[state["job"]].export_every_epoch:
        # an unlearning job's last checkpoint: it finished (and carries no training state to load: see train_job)
        done[state["label"]] = {"history": state["history"], "optimizer_steps": state["step"],
                                "job_setup_seconds": 0.0, "job_seconds": 0.0}
    todo = [(i, job) for i, job in enumerate(jobs) if job.label not in done and job.label not in config["skip"]]
    needs_ref = any(get_objective(job.objective).needs_ref for _, job in todo)
    worker = Worker(rank, world, device, mesh, load_tokenizer(first.model_path),
                    load_sharded(first, device, mesh, trainable=False) if needs_ref else None,
                    config["group_hash"], EpochSaver(rank, {job.label: i for i, job in enumerate(jobs)},
                                                     overlap_exports(first)))
    setup_seconds = time.perf_counter() - t_start

    # ---- train each job in turn, from theta_ini, resuming the one the checkpoint was saved in ----
    model, reusable = None, False
    for index, job in todo:
        t_job = time.perf_counter()
        trains_all = get_objective(job.objective).trainable is None
        if not (reusable and trains_all):
            model = None  # the previous job's model is freed before a fresh load
            gc.collect()  # FSDP2's hooks hold reference cycles
        model = start_model(job, worker, model)
        reusable = trains_all
        resume = checkpoint if state.get("job") == index else None
        done[job.label] = train_job(job, worker, model, resume, done, t_job)
    worker.saver.flush()  # the last job's last checkpoint, once its export is written
    return {"jobs": done, "setup_seconds": setup_seconds, "loop_seconds": time.perf_counter() - t_start}


def overlap_exports(job: Job) -> bool:
    """Whether exports are written while training goes on: train.overlap_exports, auto meaning on GPUs only."""
    return job.train.overlap_exports == "yes" or (job.train.overlap_exports == "auto" and job.runtime.use_gpu)


def start_model(job: Job, w: Worker, model: torch.nn.Module | None) -> torch.nn.Module:
    """theta_ini as `job` trains it: `model` (the previous job's, every parameter trained) with its shards re-read
    in place, bit-identical to a fresh load; else (None) a fresh load, as for a job that trains only some parameters
    (FSDP2 reads requires_grad as it initialises)."""
    objective = get_objective(job.objective)
    if objective.check is not None:  # the driver checks first; a worker never trains on params that do not fit
        from transformers import AutoConfig

        objective.check(job.params, AutoConfig.from_pretrained(job.model_path,
                                                               trust_remote_code=job.model.trust_remote_code))
    if model is not None:
        reload_initial(model, job.model_path)
        return model.train()
    train_only = None if objective.trainable is None else partial(objective.trainable, job.params)
    return load_sharded(job, w.device, w.mesh, trainable=True, train_only=train_only)


def train_job(job: Job, w: Worker, model: torch.nn.Module, resume: Any, done: dict[str, Any],
              t_job: float) -> dict[str, Any]:
    """One job from theta_ini (or from `resume`, the group's newest checkpoint, saved in this job): its epochs,
    exports and checkpoints; prepare's gate at the end. Returns its result (history, steps, timing from `t_job`, when
    its model started loading)."""
    # ---- setup: seed, data, optimiser, schedule, and the state to resume from ----
    rank, world, device = w.rank, w.world, w.device
    torch.manual_seed(job.train.seed)
    objective = get_objective(job.objective)
    streams = Streams(job, w.tokenizer, rank, world, objective.needs_retain, objective.needs_idk)
    # Only trained parameters: a frozen one (RMU) gets no AdamW step and no weight decay, so it stays bit-identical.
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=job.lr, weight_decay=job.train.weight_decay)
    accum = job.train.effective_batch_size // (job.train.micro_batch_size * world)
    groups = accumulation_groups(streams.micro_batches_per_epoch(), accum)
    warmup = round(job.train.warmup_epochs * len(groups))
    total_steps = job.epochs * len(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total_steps,
                                                                     schedule=job.schedule))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    if resume is not None:  # continue exactly where the checkpoint left this job
        with resume.as_directory() as folder:
            state = load_train_state(Path(folder), model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
    state |= {"job_hash": w.group_hash, "job": w.saver.pruner.order[job.label], "label": job.label, "done": done}
    report = Reporter(job.runtime.board, job.label) if rank == 0 else None  # to the driver, which logs and shows it
    job_setup_seconds = time.perf_counter() - t_job

    # ---- train: one optimizer step per group of micro-batches, metrics averaged over ranks per epoch ----
    for epoch in range(state["epoch"] + 1, job.epochs + 1):
        t0, sums, n_micro, tokens = time.perf_counter(), {}, 0, 0
        batches = streams.epoch(epoch, device)
        for size in groups:
            t_step, step_tokens = time.perf_counter(), 0
            for k in range(size):
                batch, n_tok = next(batches)
                sync_gradients(model, k == size - 1)  # reduce-scatter once per optimizer step
                loss, metrics = objective.compute(model, w.ref, batch, job.params)
                (loss / size).backward()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                n_micro, step_tokens = n_micro + 1, step_tokens + n_tok
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, job.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            tokens += step_tokens
            # tests: uipe/faults.py
            job.runtime.faults.point("train.step", job=job.label, epoch=epoch, rank=rank, step=state["step"])
            if report is not None:  # the last micro-batch's terms; tokens/s counts every rank's tokens
                report.step(state["step"], {**{k: float(v) for k, v in metrics.items()},
                                            "lr": scheduler.get_last_lr()[0], "grad_norm": float(full_value(grad_norm)),
                                            "tokens_per_s": step_tokens * world / (time.perf_counter() - t_step)})
        epoch_metrics = mean_over_ranks(sums, n_micro, device)
        seconds = time.perf_counter() - t0
        epoch_metrics |= {"epoch": epoch, "optimizer_steps": state["step"], "seconds": seconds,
                          "tokens_per_s": tokens * world / seconds,
                          "peak_memory_bytes": peak_memory_bytes(device)}  # rank 0's; CUDA: allocated
        state["history"].append(epoch_metrics)
        state["epoch"], state["scheduler"] = epoch, scheduler.state_dict()
        if report is not None:
            report.epoch(epoch, state["step"], {**epoch_metrics, "total_steps": total_steps})

        # ---- save: an HF folder per epoch (unlearn), the sharded state as a Ray checkpoint (resume) ----
        w.saver.save(job, epoch, model, optimizer, state, epoch_metrics, device, report)

    # ---- prepare: gate on greedy ROUGE-L, then publish the final folder ----
    result: dict[str, Any] = {"history": state["history"], "optimizer_steps": state["step"],
                              "job_setup_seconds": job_setup_seconds}
    if not job.export_every_epoch:
        result |= finish_prepare(job, model, device, rank, state)
        if report is not None:  # the gate's figures beside the training curves
            gate = {f"gate_rouge_l_{k}": v for k, v in result["gate_rouge_l"].items()}
            if result["model_utility"] is not None:
                gate["gate_model_utility"] = result["model_utility"]
            report.final(state["step"], gate)
    if report is not None and not job.export_every_epoch:  # an unlearning job ends with its last report
        report.done()
    return result | {"job_seconds": time.perf_counter() - t_job}


def lr_factor(step: int, warmup: int, total: int, schedule: str = "linear") -> float:
    """Linear warm-up to the peak over `warmup` steps, then a decay towards 0 at `total`: linear (TOFU's trainer)
    or cosine (half a cosine period, which spends longer near the peak and anneals more gently at the end).

    `step` counts optimizer steps already taken. Unlike HF's schedule the first step is not taken at lr 0 and the
    last one not at exactly 0: step s of warm-up uses (s+1)/warmup; with p = (s-warmup)/(total-warmup), decay uses
    1-p (linear) or (1+cos(pi p))/2 (cosine).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return max(0.0, (total - step) / max(1, total - warmup))


def accumulation_groups(micro_batches: int, accum: int) -> list[int]:
    """Micro-batches per optimizer step; a last, shorter group still steps (its loss is scaled by its own size)."""
    full, rest = divmod(micro_batches, accum)
    return [accum] * full + ([rest] if rest else [])
