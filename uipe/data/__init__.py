"""TOFU-format data: the record type, loaders (local folder or HF dataset id) and the synthetic benchmark."""

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
)
from uipe.data.records import (
    EVAL_SPLITS,
    FORGET_SPLITS,
    RETAIN_FOR,
    UTILITY_EVAL_SPLITS,
    TofuRecord,
    check_forget_split,
    eval_split_for,
)

__all__ = [
    "EVAL_SPLITS", "FORGET_SPLITS", "RETAIN_FOR", "UTILITY_EVAL_SPLITS", "TofuRecord", "check_forget_split",
    "eval_split_for", "forget_and_retain", "has_split", "load_idk", "load_split", "packaged_tofu_dir",
    "related_records", "retain_training_records", "target_training_records", "training_parts",
]


def ensure_data(cfg: "ExperimentConfig", paths: "RunPaths") -> str:  # noqa: F821 - types only
    """The data source of a run: the synthetic benchmark is written under the run folder once (same params ->
    same bytes), anything else is used where it is."""
    import json

    from uipe.data.synth import write_benchmark

    if cfg.data.source != "synth":
        return cfg.data.source
    meta = paths.data / "benchmark.json"
    want = cfg.data.synth
    if meta.is_file():
        have = json.loads(meta.read_text())
        if (have["facts"], have["seed"], len(have["authors"])) == (want.facts, want.seed, want.authors):
            return str(paths.data)
    write_benchmark(paths.data, want.authors, want.facts, want.seed, overwrite=True)
    return str(paths.data)
