"""The parts uipe/train.py's loop is made of: the job a worker receives, its data streams, the learning-rate
schedule, FSDP2 sharding and loading, exporting HF folders, and measuring prepare's gate on rank 0.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DistributedSampler

from uipe.checkpoint import gather_full_state, write_hf_folder
from uipe.config import EvalConfig, ModelConfig, TrainConfig
from uipe.data import TofuRecord
from uipe.io import atomic_dir
from uipe.methods import Batch
from uipe.models import collate, encode_qa


@dataclass(frozen=True)
class Runtime:
    """Where a job runs and where it reports, as the driver resolved it."""

    use_gpu: bool
    board: Any = None  # uipe.progress.Board: rank 0 posts metrics and progress there; the driver logs them
    fault: str = ""  # tests only: "epoch=E,rank=R,marker=PATH" raises once in epoch E on rank R


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
    runtime: Runtime
    schedule: str = "linear"  # the learning-rate decay after warm-up: "linear" (TOFU's) or "cosine"
    # prepare's gate (uipe.gate), measured on rank 0 after the last epoch: greedy ROUGE-L on a sample of each
    # training split, model utility on the evaluation splits (empty: not measured, e.g. benchmarks).
    gate: dict[str, tuple[TofuRecord, ...]] = field(default_factory=dict)
    eval_splits: dict[str, tuple[TofuRecord, ...]] = field(default_factory=dict)
    forget_split: str = ""
    eval: EvalConfig | None = None
    min_rouge: float = 0.0


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


def shard_model(model: nn.Module, mesh: Any, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: fully_shard each decoder block (HF's _no_split_modules names them), then the root.

    bf16 compute with fp32 gradient reduction on GPU (MixedPrecisionPolicy); fp32 on CPU, where bf16 matmuls are slow.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def load_sharded(job: Job, device: torch.device, mesh: Any, trainable: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # fp32 master weights; on GPU the bf16 MixedPrecisionPolicy computes in bf16 unless dtype says float32.
    bf16 = device.type == "cuda" and job.model.dtype != "float32"
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=job.model.trust_remote_code).to(device)
    model = shard_model(model, mesh, bf16, job.train.reshard_after_forward)
    if trainable:
        return model.train()
    model.requires_grad_(False)
    return model.eval()


def full_value(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def mean_over_ranks(sums: dict[str, torch.Tensor], n_micro: int, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
                         + [torch.tensor(float(n_micro), dtype=torch.float64, device=device)])
    dist.all_reduce(packed)
    return {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}


def save_dtype(job: Job, device: torch.device) -> torch.dtype:
    from uipe.models import resolve_dtype

    return resolve_dtype(job.model.dtype, device)


def export_epoch(job: Job, model: torch.nn.Module, out: Path, device: torch.device, rank: int,
                 meta: dict[str, Any]) -> Path | None:
    """Gather the full weights (every rank), rank 0 writes the folder atomically; returns it on rank 0."""
    full = gather_full_state(model)
    if rank != 0:
        return None
    with atomic_dir(out, overwrite=True) as tmp:
        write_hf_folder(tmp, full, job.model_path, save_dtype(job, device), meta)
    return out


def finish_prepare(job: Job, model: torch.nn.Module, device: torch.device, rank: int,
                   state: dict[str, Any]) -> dict[str, Any]:
    """Gather the trained model, measure prepare's gate on rank 0 (uipe.gate) and publish the folder only if every
    split reaches job.min_rouge; the driver checks the figures returned (and the two models' utility gap)."""
    from uipe import gate

    full = gather_full_state(model)
    if rank != 0:
        return {}
    figures: dict[str, Any] = {"gate_rouge_l": {}, "model_utility": None}
    if job.gate or job.eval_splits:  # nothing to measure: benchmarks
        plain, tok = _unsharded(job, full, device)
        if job.gate:
            figures["gate_rouge_l"] = gate.split_rouge(plain, tok, job.gate, job.model.prompt_template,
                                                       job.eval.batch_size, job.eval.max_new_tokens)
        if job.eval_splits:
            figures["model_utility"] = gate.model_utility(plain, tok, job.eval_splits, job.forget_split,
                                                          job.model.prompt_template, job.eval, job.model.max_length)
    rouge = figures["gate_rouge_l"]
    figures["rouge_l_recall"] = min(rouge.values()) if rouge else float("nan")  # the worst split
    meta = {**job.meta, **figures, "optimizer_steps": state["step"], "history": state["history"]}
    if not figures["rouge_l_recall"] < job.min_rouge:  # below the gate nothing is published; the driver raises
        with atomic_dir(job.export, overwrite=True) as tmp:
            write_hf_folder(tmp, full, job.model_path, save_dtype(job, device), meta)
    return figures


def _unsharded(job: Job, full: dict[str, torch.Tensor], device: torch.device) -> tuple[Any, Any]:
    """A plain (unsharded) copy of the gathered weights in eval mode, and the tokenizer, for rank 0's gate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from uipe.models import load_tokenizer

    config = AutoConfig.from_pretrained(job.model_path, trust_remote_code=job.model.trust_remote_code)
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=job.model.trust_remote_code)
    plain.load_state_dict(full)
    return plain.to(device).eval(), load_tokenizer(job.model_path)


def maybe_fail(fault: str, epoch: int, rank: int) -> None:
    """Tests only: raise once (a marker file remembers) in the given epoch on the given rank."""
    if not fault:
        return
    spec = dict(item.split("=", 1) for item in fault.split(","))
    marker = Path(spec["marker"])
    if int(spec["epoch"]) == epoch and int(spec["rank"]) == rank and not marker.exists():
        marker.write_text(f"failed once in epoch {epoch} on rank {rank}\n")
        raise RuntimeError(f"injected test fault in epoch {epoch} on rank {rank}")
