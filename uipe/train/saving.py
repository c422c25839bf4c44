"""What a training rank does after each epoch: the Hugging Face export, the Ray checkpoint, pruning old training
states. Kept off the training thread where it can be (issue 27): at 826M parameters writing an epoch's export and
copying it and the sharded state into Ray's storage cost about as much as a method's epoch of training.

- The export is written by a thread on rank 0 while the next epoch trains; one at a time, so at most one gathered
  copy of the weights waits in memory.
- Its Ray checkpoint (the sharded training state, state.json, and the export linked in as `hf/`) is reported once
  that write has ended, so a committed checkpoint always holds a whole export: reports run one epoch behind
  training, and a restart after a failure retrains at most one more epoch than before. A job's last epoch is
  written and reported before the next job starts (its checkpoint holds no training state to redo it from).
- On local (or NFS) storage the checkpoint reaches Ray's storage as hard links from a staging folder beside it, not
  as a copy (Ray copies by default: ~13 GB per epoch at 826M).

train.overlap_exports: yes, no, or auto (yes when training runs on GPUs: on CPU the writer takes cores from training,
and a 204M model's fit on 2 cores took 11% longer with it). With no, each epoch is written and reported before the
next one trains (the same bytes).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uipe.checkpoint import (
    checkpoint_name, gather_full_state, group_order, link_tree, prune_train_states, save_train_state,
)
from uipe.train.export import write_export
from uipe.train.job import Job

STAGING = ".uipe-staging"  # beside a run's Ray storage: checkpoints before Ray takes them


@dataclass
class Unreported:
    """An epoch's checkpoint, saved to `folder` (a staging folder), waiting for its export to be written."""

    job: Job
    epoch: int
    metrics: dict[str, Any]
    folder: Path
    export: Path | None  # rank 0's export folder, linked into the checkpoint as hf/
    report: Any  # rank 0's Reporter: told the job is done once its last checkpoint is reported


class EpochSaver:
    """One rank's saving of every job of its group, in order (see the module docstring)."""

    def __init__(self, rank: int, order: dict[str, int], overlap: bool) -> None:
        self.rank, self.overlap = rank, overlap
        self.pruner = Pruner(order)
        self.writer: threading.Thread | None = None
        self.error: BaseException | None = None  # the writer's, raised on the training thread
        self.unreported: Unreported | None = None

    def save(self, job: Job, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], metrics: dict[str, Any], device: torch.device, report: Any) -> None:
        """After `epoch` of `job` trained: report the previous epoch's checkpoint, start this epoch's export, save
        this epoch's checkpoint (reported at the next call, or at `flush`)."""
        self.flush()
        export = None
        if job.export_every_epoch:
            export = Path(job.export) / f"epoch_{epoch:02d}"
            full = gather_full_state(model)  # a collective: every rank
            if self.overlap and epoch < job.epochs:  # only then does the writer read while training goes on
                full = private_copy(full, model)
            if self.rank == 0:
                self._start_writer(job, full, export, device, {**job.meta, **metrics})
        if not (job.export_every_epoch or epoch % job.checkpoint_every == 0 or epoch == job.epochs):
            return
        folder = staging_folder(job.runtime.run_storage, self.rank)
        # An unlearning job's last epoch keeps no training state: nothing resumes a finished job (its HF exports
        # are its results), and at 7B the model and AdamW shards are ~80 GB per checkpoint.
        finished = job.export_every_epoch and epoch == job.epochs
        save_train_state(folder, None if finished else (model, optimizer), state, self.rank)
        self.unreported = Unreported(job, epoch, metrics, folder, export if self.rank == 0 else None, report)
        if not (self.overlap and job.export_every_epoch and epoch < job.epochs):
            # A job's last checkpoint is committed before the next job trains: a failure in job k then resumes job
            # k and leaves the jobs before it untouched (a restart never goes back into a finished job).
            self.flush()

    def flush(self) -> None:
        """Report the waiting checkpoint, once its export is written (every rank: a report is a barrier)."""
        import ray.train
        from ray.train import Checkpoint

        if self.unreported is None:
            return
        u, self.unreported = self.unreported, None
        try:
            self._join_writer()
            if u.export is not None:
                link_tree(u.export, u.folder / "hf")
            upload = link_upload(u.job.runtime.run_storage)
            ray.train.report(u.metrics, checkpoint=Checkpoint.from_directory(str(u.folder)),
                             checkpoint_dir_name=checkpoint_name(u.job.label, u.epoch), checkpoint_upload_fn=upload)
        finally:
            shutil.rmtree(u.folder, ignore_errors=True)
        u.job.runtime.faults.point("train.report", job=u.job.label, epoch=u.epoch, rank=self.rank)  # tests only
        if self.rank == 0:
            self.pruner.after(u.job, u.epoch)
        if u.report is not None and u.export is not None and u.epoch == u.job.epochs:
            u.report.done()  # an unlearning job ends when its last export is in a committed checkpoint

    def _start_writer(self, job: Job, full: dict[str, torch.Tensor], out: Path, device: torch.device,
                      meta: dict[str, Any]) -> None:
        self._join_writer()

        def write() -> None:
            try:
                write_export(job, full, out, device, meta)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e

        self.writer = threading.Thread(target=write, name="uipe-export", daemon=True)
        self.writer.start()

    def _join_writer(self) -> None:
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def private_copy(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered weights with every tensor that shares memory with the live model cloned: on one rank the gathered
    "full" tensor can be the parameter itself, which the next optimizer step changes while the writer reads it."""
    if not full:
        return full
    live = set()
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        live.add(local.untyped_storage().data_ptr())
    return {k: v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in full.items()}


def staging_folder(run_storage: str, rank: int) -> Path:
    """A fresh folder for a checkpoint's files before Ray takes them: beside the run's storage when it is local (so
    they can be hard-linked there), else in the temp folder. Folders this rank's killed predecessor left are
    removed (a rank saves one checkpoint at a time)."""
    base = None
    prefix = f"{Path(run_storage).name}-rank{rank}-"
    if run_storage and "://" not in run_storage:
        base = Path(run_storage).parent / STAGING
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def link_upload(run_storage: str) -> Any:
    """Ray's checkpoint_upload_fn for local storage: hard links instead of copies (None: Ray's own upload)."""
    if not run_storage or "://" in run_storage:
        return None

    def upload(checkpoint: Any, dir_name: str) -> Any:
        from ray.train import Checkpoint

        dest = Path(run_storage) / dir_name
        link_tree(Path(checkpoint.path), dest)  # the ranks share the folder: each adds its own files
        return Checkpoint.from_directory(str(dest))

    return upload


class Pruner:
    """Rank 0 deletes the sharded training state of all but the newest train.keep_train_states committed checkpoints
    of the group, mostly off the training thread.

    Why ask Ray what it committed: `ray.train.report` returns once this rank's files are uploaded, not once every
    rank's are; the controller commits a checkpoint only when all ranks have reported. Pruning on rank 0's word alone
    lost a run (on-prem check, a worker killed mid-upload): epoch e stayed uncommitted, the restart went back to
    e-1, whose state rank 0 had already deleted. Why a thread: the answer waits for the controller's next poll of
    the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), which cost ~1.7 s per epoch on the tiny
    preset, more than its training. At a job's last epoch rank 0 waits for the commit on the training thread, so a
    restart never goes back into a finished job (if a rank dies meanwhile, the wait ends with the worker group).
    """

    def __init__(self, order: dict[str, int]) -> None:
        self.order = order  # job label -> its place in the group, to order checkpoints
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the thread's, raised on the training thread at the job's end

    def after(self, job: Job, epoch: int) -> None:
        args = (job.runtime.run_storage, job.train.keep_train_states)
        if epoch == job.epochs:
            if self.thread is not None:
                self.thread.join()
            if self.error is not None:
                raise self.error
            self.prune(*args, wait=True)
        elif epoch > job.train.keep_train_states and not (self.thread is not None and self.thread.is_alive()):
            self.thread = threading.Thread(target=self._prune_soon, args=args, name="uipe-prune", daemon=True)
            self.thread.start()  # one at a time: while one runs, the next epoch's prune catches up

    def _prune_soon(self, run_storage: str, keep: int) -> None:
        try:
            self.prune(run_storage, keep, wait=False)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self.error = e

    def prune(self, run_storage: str, keep: int, wait: bool) -> None:
        import ray.train

        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=None if wait else 0)
        prune_train_states(run_storage, group_order([Path(r.checkpoint.path).name for r in reported], self.order),
                           keep)
