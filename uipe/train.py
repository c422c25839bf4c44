"""Training on Ray Train (V2) with FSDP2: `prepare` (TOFU's target and retain models) and `unlearn` (a base method,
a Hugging Face model folder per epoch). One loop, `train_loop`, read top to bottom: setup, train, save.

    prepare(cfg, run_dir) -> {"target": meta, "retain": meta}
    unlearn(cfg, run_dir, method) -> the manifest path (unlearn/<method>/manifest.json)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uipe.checkpoint import (
    gather_full_state, latest_run_state, link_tree, load_train_state, model_identity, read_meta, records_hash,
    config_hash, require_weights, save_train_state, write_hf_folder,
)
from uipe.config import ExperimentConfig, TrainConfig
from uipe.errors import UipeError
from uipe.io import atomic_dir, atomic_write_json, code_version
from uipe.methods import UNLEARN_METHODS, get_objective
from uipe.paths import RunPaths
from uipe.train_parts import Job, StepLog, Streams, accumulation_groups, lr_factor, shard_model

GATE_ITEMS = 200  # prepare's ROUGE gate: a deterministic sample of training questions
FAULT_ENV = "UIPE_TEST_FAULT"  # tests only: see Job.fault


# ==== the loop (runs on every Ray Train worker) =====================================================================


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from ray.train import Checkpoint
    from torch.distributed.device_mesh import init_device_mesh

    from uipe.models import load_tokenizer

    # ---- setup: process, device, data, sharded models, optimiser, and the state to resume from ----
    job: Job = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # ~20x slower training here without it
    torch.set_num_threads(job.train.threads_per_worker)
    torch.manual_seed(job.train.seed)
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    objective = get_objective(job.objective)
    streams = Streams(job, load_tokenizer(job.model_path), rank, world, objective.needs_retain, objective.needs_idk)
    mesh = init_device_mesh(device.type, (world,))
    model = _load_sharded(job, device, mesh, trainable=True)
    ref = _load_sharded(job, device, mesh, trainable=False) if objective.needs_ref else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.train.weight_decay)
    accum = job.train.effective_batch_size // (job.train.micro_batch_size * world)
    groups = accumulation_groups(streams.micro_batches_per_epoch(), accum)
    warmup = round(job.train.warmup_epochs * len(groups))
    total_steps = job.epochs * len(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total_steps))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "job_hash": job.job_hash, "mlflow_run": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure, or a re-run of the same run name: continue exactly
        with checkpoint.as_directory() as folder:
            state = load_train_state(Path(folder), model, optimizer)
        if state["job_hash"] != job.job_hash:
            raise RuntimeError(f"Ray checkpoint {checkpoint.path} belongs to another job; use a new run folder")
        scheduler.load_state_dict(state["scheduler"])
    log = StepLog(job, state["mlflow_run"]) if rank == 0 else None
    if log is not None:
        state["mlflow_run"] = log.start()

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
            _maybe_fail(job.fault, epoch, rank)
            if log is not None:
                last = {k: float(v) for k, v in metrics.items()}
                log.log(state["step"], {**last, "lr": scheduler.get_last_lr()[0], "grad_norm": float(_local(grad_norm)),
                                        "tokens_per_s": step_tokens * world / (time.perf_counter() - t_step)})
        epoch_metrics = _mean_over_ranks(sums, n_micro, device)
        seconds = time.perf_counter() - t0
        epoch_metrics |= {"epoch": epoch, "optimizer_steps": state["step"], "seconds": seconds,
                          "tokens_per_s": tokens * world / seconds}
        state["history"].append(epoch_metrics)
        state["epoch"], state["scheduler"] = epoch, scheduler.state_dict()
        if rank == 0:
            log.log(state["step"], {f"epoch_{k}": v for k, v in epoch_metrics.items() if k != "epoch"})
            log.flush()
            _progress(job, epoch, state["step"], total_steps, epoch_metrics, seconds)

        # ---- save: an HF folder per epoch (unlearn), the sharded state as a Ray checkpoint (resume) ----
        hf_folder = None
        if job.export_every_epoch:
            hf_folder = _export(job, model, Path(job.export) / f"epoch_{epoch:02d}", device, rank,
                                {**job.meta, **epoch_metrics})
        if job.export_every_epoch or epoch % job.checkpoint_every == 0 or epoch == job.epochs:
            with tempfile.TemporaryDirectory(prefix="uipe-ckpt-") as tmp:
                save_train_state(Path(tmp), model, optimizer, state, rank)
                if hf_folder is not None:
                    link_tree(hf_folder, Path(tmp) / "hf")
                ray.train.report(epoch_metrics, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch:02d}")

    # ---- prepare: gate on greedy ROUGE-L, then publish the final folder ----
    result: dict[str, Any] = {"history": state["history"], "optimizer_steps": state["step"]}
    if not job.export_every_epoch:
        result |= _finish_prepare(job, model, device, rank, state)
    if log is not None:
        log.finish()
    return result


# ==== loop helpers ==================================================================================================


def _load_sharded(job: Job, device: torch.device, mesh: Any, trainable: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # fp32 master weights; on GPU the bf16 MixedPrecisionPolicy computes in bf16 unless dtype says float32.
    bf16 = device.type == "cuda" and job.model.dtype != "float32"
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=job.model.trust_remote_code).to(device)
    model = shard_model(model, mesh, bf16)
    if trainable:
        return model.train()
    model.requires_grad_(False)
    return model.eval()


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _mean_over_ranks(sums: dict[str, torch.Tensor], n_micro: int, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
                         + [torch.tensor(float(n_micro), dtype=torch.float64, device=device)])
    dist.all_reduce(packed)
    return {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}


def _save_dtype(job: Job, device: torch.device) -> torch.dtype:
    from uipe.models import resolve_dtype

    return resolve_dtype(job.model.dtype, device)


def _export(job: Job, model: torch.nn.Module, out: Path, device: torch.device, rank: int,
            meta: dict[str, Any]) -> Path | None:
    """Gather the full weights (every rank), rank 0 writes the folder atomically; returns it on rank 0."""
    full = gather_full_state(model)
    if rank != 0:
        return None
    with atomic_dir(out, overwrite=True) as tmp:
        write_hf_folder(tmp, full, job.model_path, _save_dtype(job, device), meta)
    return out


def _finish_prepare(job: Job, model: torch.nn.Module, device: torch.device, rank: int,
                    state: dict[str, Any]) -> dict[str, Any]:
    full = gather_full_state(model)
    if rank != 0:
        return {}
    rouge = _rouge_gate(job, full, device)
    meta = {**job.meta, "rouge_l_recall": rouge, "optimizer_steps": state["step"], "history": state["history"]}
    if rouge >= job.min_rouge:  # below the gate nothing is published; the driver raises
        with atomic_dir(job.export, overwrite=True) as tmp:
            write_hf_folder(tmp, full, job.model_path, _save_dtype(job, device), meta)
    return {"rouge_l_recall": rouge}


def _rouge_gate(job: Job, full: dict[str, torch.Tensor], device: torch.device) -> float:
    """Mean greedy ROUGE-L recall on a deterministic sample of the training questions (an unsharded copy, rank 0)."""
    import random

    from transformers import AutoConfig, AutoModelForCausalLM

    from uipe.eval.scoring import greedy_generate, rouge_l_recall
    from uipe.models import load_tokenizer, prompt_token_ids

    config = AutoConfig.from_pretrained(job.model_path, trust_remote_code=job.model.trust_remote_code)
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=job.model.trust_remote_code)
    plain.load_state_dict(full)
    plain = plain.to(device).eval()
    tok = load_tokenizer(job.model_path)
    items = random.Random(job.train.seed).sample(job.forget, min(job.gate_items, len(job.forget)))
    prompts = [prompt_token_ids(tok, r.question, job.model.prompt_template) for r in items]
    texts = greedy_generate(plain, tok, prompts, batch_size=64, max_new_tokens=job.max_new_tokens)
    return float(sum(rouge_l_recall([r.answer for r in items], texts)) / len(items))


def _progress(job: Job, epoch: int, step: int, total_steps: int, m: dict[str, float], seconds: float) -> None:
    every = max(1, job.epochs // 10)  # at most ~10 lines for a long fine-tuning run
    if epoch % every and epoch != job.epochs:
        return
    parts = [f"[{job.label}] epoch {epoch}/{job.epochs} step {step}/{total_steps} loss {m['loss']:.3f}"]
    parts += [f"{k} {m[k]:.3f}" for k in ("forget_nll", "retain_nll", "nll") if k in m]
    parts.append(f"{seconds:.1f} s/epoch ETA {seconds * (job.epochs - epoch):.0f}s")
    # Ray Train V2 patches print() into its logger, which a wrapped stdout then echoes twice: write the stream.
    sys.__stdout__.write(" ".join(parts) + "\n")
    sys.__stdout__.flush()


def _maybe_fail(fault: str, epoch: int, rank: int) -> None:
    """Tests only: raise once (a marker file remembers) in the given epoch on the given rank."""
    if not fault:
        return
    spec = dict(item.split("=", 1) for item in fault.split(","))
    marker = Path(spec["marker"])
    if int(spec["epoch"]) == epoch and int(spec["rank"]) == rank and not marker.exists():
        marker.write_text(f"failed once in epoch {epoch} on rank {rank}\n")
        raise RuntimeError(f"injected test fault in epoch {epoch} on rank {rank}")


# ==== the driver: checks, identities, one TorchTrainer per model =====================================================


def ensure_ray() -> None:
    """Start a local Ray (no dashboard) unless one is up: the CLI, the search and the tests share one session."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)


def _use_gpu(train: TrainConfig) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if train.use_gpu == "yes" and gpus < train.num_workers:
        raise UipeError(f"train.use_gpu=yes: {train.num_workers} workers need {train.num_workers} GPUs, Ray has {gpus:g}")
    return train.use_gpu == "yes" or (train.use_gpu == "auto" and gpus >= train.num_workers)


def _check_workers(train: TrainConfig) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if train.num_workers > cpus:
        raise UipeError(f"train.num_workers={train.num_workers}: Ray has only {cpus:g} CPUs (one per worker)")


def _storage(cfg: ExperimentConfig, paths: RunPaths) -> str:
    path = cfg.train.storage_path or str(paths.ray_storage)
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _train_identity(train: TrainConfig) -> dict[str, Any]:
    """The training settings that change the weights (not where Ray stores checkpoints, nor retry counts)."""
    return train.model_dump(exclude={"storage_path", "max_failures"})


def _tracking(cfg: ExperimentConfig, paths: RunPaths) -> tuple[str, str]:
    return cfg.tracking.uri or f"sqlite:///{paths.mlflow_db}", cfg.tracking.experiment or f"uipe-{cfg.name}"


def _check_ray_run(storage: str, run_name: str, job_hash: str, folder: Path) -> None:
    state = latest_run_state(storage, run_name)
    if state is not None and state.get("job_hash") != job_hash:
        raise UipeError(f"{storage}/{run_name}: Ray checkpoints of a different config/data; use a new run folder, "
                        f"or delete it (and {folder}) to start over")


def _fit(cfg: ExperimentConfig, paths: RunPaths, job: Job, run_name: str, keep_all: bool) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.train.threads_per_worker),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=job.use_gpu),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=_storage(cfg, paths),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all else 1),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()


def _job(cfg: ExperimentConfig, paths: RunPaths, **fields: Any) -> Job:
    uri, experiment = _tracking(cfg, paths)
    return Job(train=cfg.train, model=cfg.model, tracking_uri=uri, experiment=experiment,
               use_gpu=_use_gpu(cfg.train), fault=os.environ.get(FAULT_ENV, ""), **fields)


def prepare(cfg: ExperimentConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train TOFU's target (all data) and retain (retain + utility sets) models from the base model.

    A folder whose uipe_meta.json names the same data and config is reused; one made otherwise is an error.
    On the tiny preset both must reach greedy ROUGE-L recall >= prepare.min_rouge on their own training questions.
    """
    from uipe.data import ensure_data, retain_training_records, target_training_records
    from uipe.models import prepare_base_model

    paths = RunPaths.of(run_dir)
    ensure_ray()
    _check_workers(cfg.train)
    for key, value in (("model.base", cfg.model.base), ("model.target", cfg.model.target)):
        if value and value != "tiny":
            require_weights(value, key)
    source = ensure_data(cfg, paths)
    split = cfg.data.forget_split
    sets = {"target": target_training_records(source, split), "retain": retain_training_records(source, split)}
    base = prepare_base_model(cfg, paths, source)
    out: dict[str, Any] = {}
    for role, folder in (("target", paths.target_model), ("retain", paths.retain_model)):
        if role == "target" and cfg.model.target:
            out[role] = {"path": str(cfg.model.target), "trained": False}
            continue
        records = tuple(sets[role])
        ident = {"role": role, "forget_split": split, "data_hash": records_hash(records), "config_hash": config_hash({
            "prepare": cfg.prepare, "train": _train_identity(cfg.train), "model": cfg.model.model_dump(
                exclude={"target"}), "base": model_identity(base)})}
        meta = read_meta(folder)
        if meta is not None:
            if {k: meta.get(k) for k in ident} != ident:
                raise UipeError(f"{folder}: trained on other data or settings; use a new run folder or delete it")
            out[role] = {**meta, "path": str(folder), "trained": False}
            continue
        run_name = f"{cfg.name}-prepare-{role}"
        job = _job(cfg, paths, label=f"prepare-{role}", objective="finetune", params=None, model_path=str(base),
                   forget=records, retain=(), idk=(), epochs=cfg.prepare.epochs, lr=cfg.prepare.lr,
                   job_hash=config_hash(ident), export=str(folder), export_every_epoch=False,
                   checkpoint_every=max(1, cfg.prepare.epochs // 3), meta={**ident, "kind": role, "base": str(base),
                   "code_version": code_version()}, gate_items=GATE_ITEMS, min_rouge=cfg.prepare.min_rouge,
                   max_new_tokens=cfg.eval.max_new_tokens)
        _check_ray_run(_storage(cfg, paths), run_name, job.job_hash, folder)
        result = _fit(cfg, paths, job, run_name, keep_all=False)
        rouge = result.return_value["rouge_l_recall"]
        if rouge < cfg.prepare.min_rouge:
            raise UipeError(f"prepare {role}: greedy ROUGE-L recall {rouge:.3f} < prepare.min_rouge "
                            f"{cfg.prepare.min_rouge} on {min(GATE_ITEMS, len(records))} training questions; "
                            "raise prepare.epochs or prepare.lr")
        out[role] = {**read_meta(folder), "path": str(folder), "trained": True}
    return out


def unlearn(cfg: ExperimentConfig, run_dir: str | Path, method: str, resume: bool = True) -> Path:
    """Run `method` for unlearn.epochs from the target model; an HF folder per epoch and a manifest, written last.

    Re-running resumes (same run name, same job hash); a run folder holding another config's results is an error.
    resume=False deletes this method's earlier results (folders and Ray checkpoints) first.
    """
    from uipe.data import ensure_data, forget_and_retain, load_idk

    if method not in UNLEARN_METHODS:
        raise UipeError(f"unknown method {method!r}; choose one of {', '.join(UNLEARN_METHODS)}")
    objective, params = get_objective(method), cfg.method_params(method)
    paths = RunPaths.of(run_dir)
    theta_ini = require_weights(cfg.model.target or paths.target_model, "target model")
    ensure_ray()
    _check_workers(cfg.train)
    source = ensure_data(cfg, paths)
    forget, retain = forget_and_retain(source, cfg.data.forget_split)
    idk = tuple(load_idk(source)) if objective.needs_idk else ()
    data_hash = records_hash(forget, retain, idk)
    ident = {"method": method, "params": params, "unlearn": cfg.unlearn.model_dump(include={"epochs", "lr"}),
             "train": _train_identity(cfg.train), "model": cfg.model.model_dump(exclude={"target", "base"}),
             "theta_ini": model_identity(theta_ini), "data_hash": data_hash, "forget_split": cfg.data.forget_split}
    job_hash = config_hash(ident)
    folder, storage, run_name = paths.unlearn(method), _storage(cfg, paths), f"{cfg.name}-{method}"
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
        if "://" not in storage:
            shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    job_file = folder / "job.json"
    old = read_json(job_file)
    if (old or {}).get("job_hash", job_hash) != job_hash or (old is None and folder.exists() and any(folder.iterdir())):
        raise UipeError(f"{folder}: results of a different config/data; use a new run folder or delete it")
    _check_ray_run(storage, run_name, job_hash, folder)
    manifest = read_json(paths.manifest(method))
    if manifest is not None and manifest["job_hash"] == job_hash:
        return paths.manifest(method)  # finished before: nothing to do
    atomic_write_json(job_file, {"job_hash": job_hash, "method": method, "theta_ini": str(theta_ini)})
    meta = {"kind": "unlearn", "method": method, "theta_ini": str(theta_ini), "job_hash": job_hash,
            "params": params.model_dump(), "code_version": code_version()}
    job = _job(cfg, paths, label=method, objective=method, params=params, model_path=str(theta_ini),
               forget=tuple(forget), retain=tuple(retain), idk=idk, epochs=cfg.unlearn.epochs, lr=cfg.unlearn.lr,
               job_hash=job_hash, export=str(folder), export_every_epoch=True, checkpoint_every=1, meta=meta)
    result = _fit(cfg, paths, job, run_name, keep_all=True)
    epochs = _restore_missing_epochs(result, paths, method, cfg.unlearn.epochs)
    history = result.return_value["history"]
    atomic_write_json(paths.manifest(method), {
        "method": method, "params": params.model_dump(), "theta_ini": str(theta_ini), "job_hash": job_hash,
        "data_hash": data_hash, "forget_split": cfg.data.forget_split, "code_version": code_version(),
        "lr": cfg.unlearn.lr, "epochs": [{"epoch": e, "path": str(p), **_epoch_row(history, e)} for e, p in epochs],
        "optimizer_steps": result.return_value["optimizer_steps"], "ray_run": str(result.path),
    })
    return paths.manifest(method)


def read_json(path: Path) -> dict[str, Any] | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def _epoch_row(history: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    keys = ("loss", "forget_loss", "retain_loss", "forget_nll", "retain_nll", "optimizer_steps", "seconds")
    row = next(h for h in history if h["epoch"] == epoch)
    return {k: row[k] for k in keys if k in row}


def _restore_missing_epochs(result: Any, paths: RunPaths, method: str, epochs: int) -> list[tuple[int, Path]]:
    """Every epoch folder present, copied back from its Ray checkpoint if it was deleted after a crash."""
    by_name = {Path(c.path).name: c for c, _ in (result.best_checkpoints or [])}
    out = []
    for e in range(1, epochs + 1):
        target = paths.epoch_dir(method, e)
        if not (target / "config.json").is_file():
            ckpt = by_name.get(target.name)
            if ckpt is None:
                raise UipeError(f"{target}: missing and no Ray checkpoint holds it; re-run with resume=False")
            with ckpt.as_directory() as d, atomic_dir(target, overwrite=True) as tmp:
                shutil.copytree(Path(d) / "hf", tmp, dirs_exist_ok=True)
        out.append((e, target))
    return out


__all__ = ["prepare", "unlearn", "train_loop", "ensure_ray"]
