"""Per-rank training batches: each stream sharded with DistributedSampler, forget and retain micro-batches paired.
A stream's examples are its records encoded by uipe.prompts.encode_record: a QA record (TOFU) is one example, a
raw text (MUSE) its max_length windows, so the samplers count windows."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from uipe.methods import Batch
from uipe.prompts import Example, collate, encode_qa, encode_record
from uipe.train.job import Job


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

        def examples(records: tuple) -> list[Example]:  # a QA record is one example, a raw text its windows
            return [ex for r in records for ex in encode_record(tokenizer, r, t, m)]

        self.forget = examples(job.forget)
        self.retain = examples(job.retain) if needs_retain else []
        pick = random.Random(job.train.seed)  # IdkDPO: QA only (the driver refuses it on raw text)
        self.idk = [encode_qa(tokenizer, r.question, job.idk[pick.randrange(len(job.idk))], t, m)
                    for r in job.forget] if needs_idk else []
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
