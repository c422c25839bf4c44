"""The parts uipe/train.py's loop is made of: the job a worker receives, its data streams, the learning-rate
schedule, FSDP2 sharding, and MLflow step logging from rank 0.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DistributedSampler

from uipe.config import ModelConfig, TrainConfig
from uipe.data import TofuRecord
from uipe.methods import Batch
from uipe.models import collate, encode_qa


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, pickled to every rank by Ray (records included: a TOFU split is ~1 MB)."""

    label: str  # progress-line tag and MLflow run name: "npo", "prepare-target"
    objective: str  # "finetune" or an unlearning method
    params: BaseModel | None
    model_path: str  # theta_ini: the start weights, and the frozen reference where the method needs one
    forget: tuple[TofuRecord, ...]  # the forget split (finetune: the fine-tuning data)
    retain: tuple[TofuRecord, ...]
    idk: tuple[str, ...]
    epochs: int
    lr: float
    train: TrainConfig
    model: ModelConfig
    job_hash: str  # identity of (data, config, theta_ini): a checkpoint of another job is never resumed
    export: str  # unlearn: the method folder (epoch_XX inside); prepare: the final model folder
    export_every_epoch: bool
    checkpoint_every: int
    meta: dict[str, Any]
    tracking_uri: str
    experiment: str
    use_gpu: bool
    gate_items: int = 0  # prepare: greedy ROUGE-L recall on this many training items (0: no gate)
    min_rouge: float = 0.0
    max_new_tokens: int = 32
    fault: str = ""  # tests only: "epoch=E,rank=R,marker=PATH" raises once in epoch E on rank R


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then linear decay towards 0 at `total` (as TOFU's trainer).

    `step` counts optimizer steps already taken. Unlike HF's schedule the first step is not taken at lr 0 and the
    last one not at exactly 0: step s of warm-up uses (s+1)/warmup, decay uses (total-s)/(total-warmup).
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def accumulation_groups(micro_batches: int, accum: int) -> list[int]:
    """Micro-batches per optimizer step; a last, shorter group still steps (its loss is scaled by its own size)."""
    full, rest = divmod(micro_batches, accum)
    return [accum] * full + ([rest] if rest else [])


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


class Streams:
    """This rank's shard of each stream: DistributedSampler (seeded, set_epoch) over pre-tokenised examples.

    A forget micro-batch is paired with a retain micro-batch (the retain shard cycles when shorter or longer) and,
    for IdkDPO, the same forget questions answered with an "I don't know" drawn deterministically per item.
    Everything depends only on (seed, epoch), so a resumed epoch sees exactly the batches it would have.
    """

    def __init__(self, job: Job, tokenizer: Any, rank: int, world: int, needs_retain: bool, needs_idk: bool) -> None:
        t, m = job.model.prompt_template, job.model.max_length

        def enc(question: str, answer: str) -> tuple[list[int], list[int]]:
            return encode_qa(tokenizer, question, answer, t, m)

        self.forget = [enc(r.question, r.answer) for r in job.forget]
        self.retain = [enc(r.question, r.answer) for r in job.retain] if needs_retain else []
        pick = random.Random(job.train.seed)
        self.idk = [enc(r.question, job.idk[pick.randrange(len(job.idk))]) for r in job.forget] if needs_idk else []
        self.pad_id = tokenizer.pad_token_id
        self.micro, self.seed, self.rank, self.world = job.train.micro_batch_size, job.train.seed, rank, world
        self.forget_sampler = self._sampler(len(self.forget))

    def _sampler(self, n: int) -> DistributedSampler:
        return DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.seed)

    def micro_batches_per_epoch(self) -> int:
        # DistributedSampler pads every rank to the same count, so all ranks run the same number of collectives.
        return math.ceil(len(self.forget_sampler) / self.micro)

    def _retain_indices(self, epoch: int) -> Iterator[int]:
        sampler, cycle = self._sampler(len(self.retain)), 0
        while True:
            sampler.set_epoch(epoch * 100_003 + cycle)
            yield from sampler
            cycle += 1

    def epoch(self, epoch: int, device: torch.device) -> Iterator[tuple[Batch, int]]:
        """(batch, tokens) pairs; tokens = non-padding tokens fed through the trained model."""
        self.forget_sampler.set_epoch(epoch)
        retain_idx = self._retain_indices(epoch) if self.retain else None
        for idx in _chunks(list(self.forget_sampler), self.micro):
            parts = {"forget": self._collate(self.forget, idx, device)}
            if retain_idx is not None:
                parts["retain"] = self._collate(self.retain, [next(retain_idx) for _ in idx], device)
            if self.idk:
                parts["idk"] = self._collate(self.idk, idx, device)
            tokens = sum(int(p["attention_mask"].sum()) for p in parts.values())
            yield Batch(**parts), tokens

    def _collate(self, examples: list, idx: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        batch = collate([examples[i] for i in idx], self.pad_id, side="right")
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def shard_model(model: nn.Module, mesh: Any, bf16: bool) -> nn.Module:
    """FSDP2: fully_shard each decoder block (HF's _no_split_modules names them), then the root.

    bf16 compute with fp32 gradient reduction on GPU (MixedPrecisionPolicy); fp32 on CPU, where bf16 matmuls are slow.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@dataclass
class StepLog:
    """MLflow logging from rank 0, batched (one sqlite transaction per flush, not per metric)."""

    job: Job
    run_id: str | None = None
    buffer: list[Any] = field(default_factory=list)

    def start(self) -> str:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.job.tracking_uri)
        self.client = MlflowClient()
        if self.run_id is None:  # a resumed attempt continues the same MLflow run
            exp = self.client.get_experiment_by_name(self.job.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.job.experiment)
            name = self.job.label if self.job.objective == "finetune" else f"unlearn-{self.job.label}"
            run = self.client.create_run(exp_id, run_name=name,
                                         tags={"uipe.job_hash": self.job.job_hash, "uipe.stage": self.job.objective})
            self.run_id = run.info.run_id
            params = {"method": self.job.objective, "lr": self.job.lr, "epochs": self.job.epochs,
                      **(self.job.params.model_dump() if self.job.params else {}),
                      **{f"train.{k}": v for k, v in self.job.train.model_dump().items()}}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return self.run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.buffer) >= 500:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer[:1000])
            self.buffer = self.buffer[1000:]

    def finish(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)
