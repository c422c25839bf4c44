"""Driver-side plumbing for the training recipes: resource checks, run identities, one TorchTrainer per job,
and reading results back (epoch rows, epoch folders restored from Ray checkpoints).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from uipe import faults
from uipe.checkpoint import latest_run_state
from uipe.config import ExperimentConfig, TrainConfig
from uipe.errors import UipeError
from uipe.io import atomic_dir
from uipe.paths import RunPaths
from uipe.stages import reusable
from uipe.train.job import Job, Runtime


def use_gpu(train: TrainConfig) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if train.use_gpu == "yes" and gpus < train.num_workers:
        raise UipeError(f"train.use_gpu=yes: {train.num_workers} workers need as many GPUs, Ray has {gpus:g}")
    return train.use_gpu == "yes" or (train.use_gpu == "auto" and gpus >= train.num_workers)


def check_workers(train: TrainConfig) -> None:
    cpus = ray.cluster_resources().get("CPU", 0)
    if train.num_workers > cpus:
        raise UipeError(f"train.num_workers={train.num_workers}: Ray has only {cpus:g} CPUs (one per worker)")


def storage_path(cfg: ExperimentConfig, paths: RunPaths) -> str:
    path = cfg.train.storage_path or str(paths.ray_storage)
    return path if "://" in path else str(Path(path).expanduser().resolve())


def train_identity(train: TrainConfig) -> dict[str, Any]:
    """The training settings that change the weights (not storage, retention, retries, nor FSDP2 memory policy)."""
    return train.model_dump(exclude={"storage_path", "max_failures", "reshard_after_forward", "keep_train_states"})


def check_ray_run(storage: str, run_name: str, job_hash: str, folder: Path) -> None:
    reusable(latest_run_state(storage, run_name), {"job_hash": job_hash}, f"{storage}/{run_name}",
             f"Ray checkpoints of a different config/data (delete them and {folder} to start over)", "refuse")


def fit(cfg: ExperimentConfig, paths: RunPaths, job: Job, run_name: str, keep_all: bool,
        loop: Callable[[dict[str, Any]], dict[str, Any]], data: tuple[str, dict[str, Any]] | None = None) -> Any:
    """One TorchTrainer fit. Rank 0 reports to a Board; this driver logs the reports to MLflow (the one writer of the
    tracking store) and shows them as the fit's progress display. `data`: (source, {split: records}) of the
    training data, logged as the run's MLflow datasets."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uipe.progress import Board, Follower

    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.train.threads_per_worker),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    board = Board.remote()
    storage = storage_path(cfg, paths)
    job = dataclasses.replace(job, runtime=dataclasses.replace(job.runtime, board=board,
                                                               run_storage=f"{storage.rstrip('/')}/{run_name}"))
    trainer = TorchTrainer(
        loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=job.runtime.use_gpu),
        torch_config=TorchConfig(backend="nccl" if job.runtime.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all else 1),
            worker_runtime_env={"env_vars": env},
        ),
    )
    watcher = FitWatcher(cfg, paths, job, data)
    try:
        with Follower(board, watcher.handle):
            result = trainer.fit()
    except BaseException:
        watcher.close("FAILED")
        raise
    finally:
        ray.kill(board)
    watcher.close("FINISHED")
    return result


class FitWatcher:
    """Driver side of one fit: its MLflow run and its progress display, fed by rank 0's reports."""

    def __init__(self, cfg: ExperimentConfig, paths: RunPaths, job: Job,
                 data: tuple[str, dict[str, Any]] | None = None) -> None:
        from uipe.console import Task
        from uipe.tracking import TrainRunLog, ensure_experiment

        uri, experiment_id = ensure_experiment(cfg, paths)
        name = job.label if job.objective == "finetune" else f"unlearn-{job.label}"
        params = {"method": job.objective, "lr": job.lr, "epochs": job.epochs, "schedule": job.schedule,
                  **(job.params.model_dump() if job.params else {}),
                  **{f"train.{k}": v for k, v in job.train.model_dump().items()}}
        self.run = TrainRunLog(uri, experiment_id, name, job.job_hash, job.objective, params, data,
                               cfg.tracking.parent_run_id)
        self.task = Task(job.label, job.epochs)
        self.epochs, self.failed_events = job.epochs, 0

    def handle(self, event: dict[str, Any]) -> None:
        try:
            if event["kind"] == "steps":
                self.run.log(event["rows"])
            elif event["kind"] == "epoch":
                m = event["metrics"]
                self.run.log([(event["step"], {f"epoch_{k}": v for k, v in m.items()
                                               if k not in ("epoch", "total_steps")})])
                losses = " ".join(f"{k} {m[k]:.3f}" for k in ("loss", "forget_nll", "retain_nll") if k in m)
                self.task.update(event["epoch"], f"epoch {event['epoch']}/{self.epochs} step {event['step']}/"
                                 f"{m['total_steps']} {losses} {m['seconds']:.1f} s/epoch",
                                 eta_s=m["seconds"] * (self.epochs - event["epoch"]))
            elif event["kind"] == "final":
                self.run.log([(event["step"], event["metrics"])])
        except Exception as e:  # noqa: BLE001 - a tracking hiccup must not kill the fit; say it once
            self.failed_events += 1
            if self.failed_events == 1:
                from uipe.console import warn

                warn(f"could not log training metrics to MLflow ({type(e).__name__}: {e}); training goes on")

    def close(self, status: str) -> None:
        self.task.finish()
        try:
            self.run.finish(status)
        except Exception:  # noqa: BLE001 - the fit's own outcome matters more than its run's status
            pass


def runtime(cfg: ExperimentConfig, paths: RunPaths) -> Runtime:
    return Runtime(use_gpu=use_gpu(cfg.train), faults=faults.from_env())


def epoch_row(history: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    keys = ("loss", "forget_loss", "retain_loss", "forget_nll", "retain_nll", "optimizer_steps", "seconds",
            "tokens_per_s", "peak_memory_bytes")
    row = next(h for h in history if h["epoch"] == epoch)
    return {k: row[k] for k in keys if k in row}


def restore_missing_epochs(result: Any, paths: RunPaths, method: str, epochs: int) -> list[tuple[int, Path]]:
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

