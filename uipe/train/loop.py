"""The training loop every Ray Train worker runs, read top to bottom: setup, train, save. One loop serves
`prepare` (objective finetune, gated final model) and `unlearn` (a base method, a Hugging Face folder per epoch);
uipe/train/recipe.py builds its Job on the driver.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uipe.checkpoint import link_tree, load_train_state, prune_train_states, save_train_state
from uipe.methods import get_objective
from uipe.models import peak_memory_bytes
from uipe.progress import Reporter
from uipe.train.export import export_epoch, finish_prepare
from uipe.train.job import Job
from uipe.train.sharding import full_value, load_sharded, mean_over_ranks
from uipe.train.streams import Streams


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from ray.train import Checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig

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
    if objective.check is not None:  # the driver checks first; a worker never trains on params that do not fit
        objective.check(job.params, AutoConfig.from_pretrained(job.model_path,
                                                               trust_remote_code=job.model.trust_remote_code))
    train_only = None if objective.trainable is None else partial(objective.trainable, job.params)
    model = load_sharded(job, device, mesh, trainable=True, train_only=train_only)
    ref = load_sharded(job, device, mesh, trainable=False) if objective.needs_ref else None
    # Only trained parameters: a frozen one (RMU) gets no AdamW step and no weight decay, so it stays bit-identical.
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=job.lr, weight_decay=job.train.weight_decay)
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
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, job.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            tokens += step_tokens
            job.runtime.faults.point("train.step", epoch=epoch, rank=rank)  # tests only: see uipe/faults.py
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
            job.runtime.faults.point("train.report", epoch=epoch, rank=rank)  # tests only: see uipe/faults.py
            if rank == 0 and epoch > job.train.keep_train_states:  # at the last epoch, wait for Ray's commit
                prune_train_states(job.runtime.run_storage, committed_epochs(wait=epoch == job.epochs),
                                   job.train.keep_train_states)

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


def committed_epochs(wait: bool) -> list[int]:
    """The epochs whose checkpoints Ray has committed; with `wait`, after the newest report is committed too.

    Why ask Ray: `ray.train.report` returns once this rank's files are uploaded, not once every rank's are; the
    controller commits a checkpoint only when all ranks have reported. Pruning on rank 0's word alone lost a run
    (on-prem check, a worker killed mid-upload): epoch e stayed uncommitted, the restart went back to e-1, whose state
    rank 0 had already deleted. Without `wait` this does not block training (an epoch's commit lands a poll later, so
    one more state stays on disk until the next epoch); with it, if a rank dies, the call ends with the worker group.
    """
    import ray.train

    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=None if wait else 0)
    names = (Path(r.checkpoint.path).name for r in reported)
    return [int(n.removeprefix("epoch_")) for n in names if n.startswith("epoch_") and n[6:].isdigit()]


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
