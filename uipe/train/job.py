"""The job a training worker receives: everything it needs as plain values, pickled to every rank by Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from uipe.config import EvalConfig, ModelConfig, TrainConfig
from uipe.data import TofuRecord
from uipe.faults import NONE, Faults

# A training record: a QA pair (TOFU) or a raw text (MUSE); uipe.prompts.encode_record encodes either.
Record = TofuRecord | str


@dataclass(frozen=True)
class Runtime:
    """Where a job runs and where it reports, as the driver resolved it."""

    use_gpu: bool
    board: Any = None  # uipe.progress.Board: rank 0 posts metrics and progress there; the driver logs them
    faults: Faults = NONE  # tests only: see uipe/faults.py
    run_storage: str = ""  # <storage>/<run name>: where Ray keeps this fit's checkpoints (a path or a URI)


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, pickled to every rank by Ray (records included: a TOFU split is ~1 MB)."""

    label: str  # progress-line tag and MLflow run name: "npo", "prepare-target"
    objective: str  # "finetune" or an unlearning method
    params: BaseModel | None
    model_path: str  # theta_ini: the start weights, and the frozen reference where the method needs one
    forget: tuple[Record, ...]  # the forget split (finetune: the fine-tuning data)
    retain: tuple[Record, ...]
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
    gate: dict[str, tuple[Record, ...]] = field(default_factory=dict)
    eval_splits: dict[str, tuple[TofuRecord, ...]] = field(default_factory=dict)
    forget_split: str = ""
    eval: EvalConfig | None = None
    min_rouge: float = 0.0
