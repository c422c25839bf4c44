"""Driver-side plumbing for the training recipes: resource checks, run identities, one TorchTrainer per group of
jobs, and reading results back (epoch rows, epoch folders restored from Ray checkpoints).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from uipe import faults
from uipe.checkpoint import RAY_TRAIN_SNAPSHOT, checkpoint_name, config_hash, latest_run_state, set_aside_unreadable_run
from uipe.config import ExperimentConfig, TrainConfig
from uipe.console import warn
from uipe.errors import UipeError
from uipe.io import atomic_dir
from uipe.paths import RunPaths
from uipe.stages import reusable
from uipe.train.job import Job, Runtime

HEALTH_CHECK_INTERVAL_S = "0.5"


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
    """The training settings that change the weights (not storage, retention, retries, FSDP2's memory policy, nor
    when exports are written)."""
    return train.model_dump(exclude={"storage_path", "max_failures", "reshard_after_forward", "keep_train_states",
                                     "overlap_exports"})


def group_hash(jobs: list[Job]) -> str:
    """The identity of a group of jobs trained in one fit: its checkpoints are resumed only by the same group."""
    return config_hash({"jobs": [job.job_hash for job in jobs]})


def check_ray_run(storage: str, run_name: str, job_hash: str, folder: Path) -> None:
    reusable(latest_run_state(storage, run_name), {"job_hash": job_hash}, f"{storage}/{run_name}",
             f"Ray checkpoints of a different config/data (delete them and {folder} to start over)", "refuse")


def _shared_setup(job: Job) -> tuple:
    """What a worker group sets up once for all its jobs: the start weights (model.target only says where they came
    from: a run's config may name the target model that another run found in its own folder), the model settings and
    the training config."""
    return job.model_path, job.model.model_copy(update={"target": None}), job.train


def fit(cfg: ExperimentConfig, paths: RunPaths, jobs: list[Job], run_name: str, keep_all: bool,
        loop: Callable[[dict[str, Any]], dict[str, Any]], data: dict[str, tuple[str, dict[str, Any]]] | None = None,
        skip: frozenset[str] = frozenset()) -> Any:
    """One TorchTrainer fit that trains `jobs` in order on one worker group (uipe/train/loop.py), leaving out those
    labelled in `skip` (finished before; they stay in the group so that its identity, and so its resume, does not
    depend on what is left). Rank 0 reports to a Board; this driver logs the reports to MLflow (the one writer of the
    tracking store, a run per job) and shows them as the fit's progress. `data`: per job label, (source, {split:
    records}) of its training data, logged as the run's MLflow datasets."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uipe.progress import Board, Follower

    # Ray Train's controller commits a checkpoint, and sees that a fit ended, on its next poll of the workers (every
    # 2 s by default): ~4 s of every tiny job. It passes this variable on to the controller; the user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    first = jobs[0]
    if len({job.label for job in jobs}) < len(jobs):  # labels name checkpoints, MLflow runs and results
        raise UipeError(f"jobs {[job.label for job in jobs]}: a fit trains each job once")
    for job in jobs[1:]:  # what the worker group sets up once must be the same for every job
        if _shared_setup(job) != _shared_setup(first):
            raise UipeError(f"{job.label}: a job of another model or training config cannot share a fit with "
                            f"{first.label}")
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.train.threads_per_worker),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    storage = storage_path(cfg, paths)
    aside = set_aside_unreadable_run(storage, run_name)
    if aside is not None:
        warn(f"{run_name}: Ray Train's checkpoint record ({RAY_TRAIN_SNAPSHOT}) is not whole (a full disk or a killed "
             f"write); the run folder is set aside in {aside} and the fit starts from the start model again")
    board = Board.remote()
    rt = dataclasses.replace(first.runtime, board=board, run_storage=f"{storage.rstrip('/')}/{run_name}")
    jobs = [dataclasses.replace(job, runtime=rt) for job in jobs]
    trainer = TorchTrainer(
        loop,
        train_loop_config={"jobs": tuple(jobs), "group_hash": group_hash(jobs), "skip": skip},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=rt.use_gpu),
        torch_config=TorchConfig(backend="nccl" if rt.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None if keep_all else 1),
            worker_runtime_env={"env_vars": env},
        ),
    )
    watcher = FitWatcher(cfg, paths, {job.label: job for job in jobs}, data or {})
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
    """Driver side of one fit: an MLflow run and a progress display per job, opened as its first report arrives
    (a job's run continues the unfinished one of its job hash: a restart or a re-run after a crash).

    A worker group restarted after a failure retrains from the newest committed checkpoint, so an epoch it had
    reported may come again, with the same figures (training is deterministic): steps already logged are not logged
    twice. A job that only reports it is done (it had finished before a restart) opens no new run."""

    def __init__(self, cfg: ExperimentConfig, paths: RunPaths, jobs: dict[str, Job],
                 data: dict[str, tuple[str, dict[str, Any]]]) -> None:
        from uipe.tracking import ensure_experiment

        self.cfg, self.jobs, self.data = cfg, jobs, data
        self.uri, self.experiment_id = ensure_experiment(cfg, paths)
        self.open: dict[str, tuple[Any, Any]] = {}  # label -> (TrainRunLog, Task)
        self.logged: dict[tuple[str, str], int] = {}  # (label, event kind) -> the newest optimizer step logged
        self.failed_events = 0

    def _new(self, label: str, kind: str, step: int) -> bool:
        """Whether `step` of this kind of event is past what was logged for the job (and now it is)."""
        if step <= self.logged.get((label, kind), 0):
            return False
        self.logged[label, kind] = step
        return True

    def _job(self, label: str, create: bool = True) -> tuple[Any, Any]:
        from uipe.console import Task
        from uipe.tracking import TrainRunLog

        if label not in self.open:
            job = self.jobs[label]
            name = label if job.objective == "finetune" else f"unlearn-{label}"
            params = {"method": job.objective, "lr": job.lr, "epochs": job.epochs, "schedule": job.schedule,
                      **(job.params.model_dump() if job.params else {}),
                      **{f"train.{k}": v for k, v in job.train.model_dump().items()}}
            run = TrainRunLog(self.uri, self.experiment_id, name, job.job_hash, job.objective, params,
                              self.data.get(label), self.cfg.tracking.parent_run_id, create)
            self.open[label] = (run, Task(label, job.epochs))
        return self.open[label]

    def handle(self, event: dict[str, Any]) -> None:
        try:
            label = event["job"]
            run, task = self._job(label, create=event["kind"] != "done")
            if event["kind"] == "steps":
                run.log([row for row in event["rows"] if self._new(label, "steps", row[0])])
            elif event["kind"] == "epoch":
                m, epochs = event["metrics"], self.jobs[label].epochs
                if self._new(label, "epoch", event["step"]):
                    run.log([(event["step"], {f"epoch_{k}": v for k, v in m.items()
                                              if k not in ("epoch", "total_steps")})])
                losses = " ".join(f"{k} {m[k]:.3f}" for k in ("loss", "forget_nll", "retain_nll") if k in m)
                task.update(event["epoch"], f"epoch {event['epoch']}/{epochs} step {event['step']}/"
                            f"{m['total_steps']} {losses} {m['seconds']:.1f} s/epoch",
                            eta_s=m["seconds"] * (epochs - event["epoch"]))
            elif event["kind"] == "final":
                run.log([(event["step"], event["metrics"])])
            elif event["kind"] == "done":
                self._close(label, "FINISHED")
        except Exception as e:  # noqa: BLE001 - a tracking hiccup must not kill the fit; say it once
            self.failed_events += 1
            if self.failed_events == 1:
                from uipe.console import warn

                warn(f"could not log training metrics to MLflow ({type(e).__name__}: {e}); training goes on")

    def _close(self, label: str, status: str) -> None:
        run, task = self.open.pop(label)
        task.finish()
        try:
            run.finish(status)
        except Exception:  # noqa: BLE001 - the fit's own outcome matters more than its run's status
            pass

    def close(self, status: str) -> None:
        """The end of the fit: a job still open finished with it (FINISHED) or was cut off by its failure."""
        for label in list(self.open):
            self._close(label, status)


def runtime(cfg: ExperimentConfig, paths: RunPaths) -> Runtime:
    return Runtime(use_gpu=use_gpu(cfg.train), faults=faults.from_env())


def epoch_row(history: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    keys = ("loss", "forget_loss", "retain_loss", "forget_nll", "retain_nll", "optimizer_steps", "seconds",
            "tokens_per_s", "peak_memory_bytes")
    row = next(h for h in history if h["epoch"] == epoch)
    return {k: row[k] for k in keys if k in row}


def restore_missing_epochs(result: Any, paths: RunPaths, method: str, epochs: int,
                           label: str) -> list[tuple[int, Path]]:
    """Every epoch folder present, copied back from its Ray checkpoint (named after the job's label) if it was
    deleted after a crash."""
    by_name = {Path(c.path).name: c for c, _ in (result.best_checkpoints or [])}
    out = []
    for e in range(1, epochs + 1):
        target = paths.epoch_dir(method, e)
        if not (target / "config.json").is_file():
            ckpt = by_name.get(checkpoint_name(label, e))
            if ckpt is None:
                raise UipeError(f"{target}: missing and no Ray checkpoint holds it; re-run with resume=False")
            with ckpt.as_directory() as d, atomic_dir(target, overwrite=True) as tmp:
                shutil.copytree(Path(d) / "hf", tmp, dirs_exist_ok=True)
        out.append((e, target))
    return out

