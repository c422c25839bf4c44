"""TOFU-format data: the record type, loaders (local folder or HF dataset id) and the synthetic benchmark."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uipe.data.loaders import (
    forget_and_retain,
    has_split,
    load_idk,
    load_split,
    packaged_tofu_dir,
    related_records,
    retain_training_records,
    target_training_records,
    training_parts,
    unlearning_records,
)
from uipe.data.records import (
    EVAL_SPLITS,
    FORGET_SPLITS,
    RETAIN_FOR,
    UTILITY_EVAL_SPLITS,
    TofuRecord,
    check_forget_split,
    eval_split_for,
    records_hash,
)

if TYPE_CHECKING:
    from uipe.config import ExperimentConfig
    from uipe.paths import RunPaths

__all__ = [
    "EVAL_SPLITS", "FORGET_SPLITS", "RETAIN_FOR", "UTILITY_EVAL_SPLITS", "TofuRecord", "check_forget_split",
    "eval_split_for", "forget_and_retain", "has_split", "load_idk", "load_split", "packaged_tofu_dir",
    "records_hash", "related_records", "retain_training_records", "target_training_records", "training_parts",
    "unlearning_records",
]


def ensure_data(cfg: ExperimentConfig, paths: RunPaths) -> str:
    """The data source of a run: the synthetic benchmark is written under the run folder once (same params ->
    same bytes; its benchmark.json is the record), anything else is used where it is."""
    from uipe.data.synth import TIED_FACTS, write_benchmark
    from uipe.stages import recorded, reusable

    if cfg.data.source != "synth":
        return cfg.data.source
    want = cfg.data.synth
    have = recorded(paths.data / "benchmark.json")
    if have is not None:  # benchmark.json lists the authors; the identity is their number
        # a world recorded without the knobs was made with their defaults
        have = {"tied": len(TIED_FACTS), "ties": "logical", **have, "authors": len(have["authors"])}
        if not (paths.data / "holdout10.json").is_file():  # made before holdout splits: rewrite (the rest is same)
            have = None
    if not reusable(have, want.model_dump(), paths.data):
        write_benchmark(paths.data, want.authors, want.facts, want.seed, overwrite=True, tied=want.tied,
                        ties=want.ties)
    return str(paths.data)
