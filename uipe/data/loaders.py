"""Load TOFU-format splits from a local folder (JSON, JSONL or parquet, one file per split) or a Hugging Face
dataset id such as locuslab/TOFU (one config per split, as TOFU publishes it).

Offline, a hub id fails fast with a clear message instead of hanging on the network.
"""

from __future__ import annotations

import json
import os
import socket
from functools import lru_cache
from importlib import resources
from pathlib import Path

from uipe.data.records import (
    EVAL_SPLITS,
    RELATED_SPLITS,
    RETAIN_FOR,
    UTILITY_TRAIN_SPLITS,
    TofuRecord,
    check_disjoint,
    check_forget_split,
    record_from_row,
    validate_split,
)
from uipe.errors import UipeError

SUFFIXES = (".json", ".jsonl", ".parquet")
# Files TOFU ships in its code repository; a copy lives in the package (MIT, see tofu_files/LICENSE).
PACKAGED = ("real_authors_perturbed", "world_facts_perturbed")


def packaged_tofu_dir() -> Path:
    return Path(str(resources.files("uipe") / "data" / "tofu_files"))


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        # TOFU's own .json files are JSON lines; accept both forms whatever the suffix.
        if path.suffix == ".jsonl" or not text.lstrip().startswith(("[", "{\"data\"")):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except (OSError, ValueError) as e:
        raise UipeError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if isinstance(rows, dict):  # {"data": [...]} or a single record
        rows = rows.get("data", [rows])
    if not isinstance(rows, list):
        raise UipeError(f"{path}: expected a list of records")
    return rows


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in SUFFIXES:
        p = folder / f"{split}{suffix}"
        if p.is_file():
            return p
    return None


def _is_hub_id(source: str) -> bool:
    return not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub_rows(source: str, split: str) -> list[dict]:
    import datasets

    try:  # the local cache first: works offline when the dataset was downloaded before
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return list(datasets.load_dataset(source, split, split="train"))
    except Exception:  # noqa: BLE001 - any cache miss falls through to the network attempt
        os.environ.pop("HF_DATASETS_OFFLINE", None)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UipeError(
            f"data.source {source!r}: the Hugging Face hub is not reachable and {split!r} is not cached; "
            "download it where the hub is reachable, or point data.source at a local folder of TOFU files"
        )
    try:
        return list(datasets.load_dataset(source, split, split="train"))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; name the split and move on
        raise UipeError(f"data.source {source!r}: cannot load split {split!r} ({str(e).splitlines()[0]})") from None


@lru_cache(maxsize=64)
def _load_split_cached(source: str, split: str) -> tuple[TofuRecord, ...]:
    folder = Path(source)
    if folder.is_dir():
        path = _split_file(folder, split)
        if path is None and split in PACKAGED:
            path = _split_file(packaged_tofu_dir(), split)
        if path is None:
            raise UipeError(f"{folder}: no file for split {split!r} ({'/'.join(split + s for s in SUFFIXES)})")
        rows, where = _read_rows(path), str(path)
    elif _is_hub_id(source):
        rows, where = _load_hub_rows(source, split), f"{source}:{split}"
    else:
        raise UipeError(f"data.source {source!r}: not a folder, and not a Hugging Face dataset id")
    records = [record_from_row(row, f"{where}: row {i}") for i, row in enumerate(rows)]
    validate_split(records, where, perturbed=split in EVAL_SPLITS or split == "related_perturbed")
    return tuple(records)


def load_split(source: str | Path, split: str) -> list[TofuRecord]:
    """One split as records; UipeError naming the file and row on any problem."""
    return list(_load_split_cached(str(source), split))


def has_split(source: str | Path, split: str) -> bool:
    folder = Path(source)
    if folder.is_dir():
        return _split_file(folder, split) is not None or (
            split in PACKAGED and _split_file(packaged_tofu_dir(), split) is not None
        )
    return split not in RELATED_SPLITS + UTILITY_TRAIN_SPLITS  # TOFU on the hub has no synthetic extras


def load_idk(source: str | Path | None = None) -> list[str]:
    """ "I don't know" answers for IdkDPO: the data folder's idontknow.jsonl, else TOFU's packaged one."""
    folder = Path(source) if source is not None else None
    path = folder / "idontknow.jsonl" if folder is not None and folder.is_dir() else None
    if path is None or not path.is_file():
        path = packaged_tofu_dir() / "idontknow.jsonl"
    answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise UipeError(f"{path}: no 'I don't know' answers")
    return answers


def unlearning_records(source: str | Path, forget_split: str, with_idk: bool,
                       ) -> tuple[list[TofuRecord], list[TofuRecord], tuple[str, ...]]:
    """What an unlearning run trains on: the forget split, its retain complement, and (IdkDPO) the "I don't know"
    answers; `records_hash` of the three is the run's data identity, which the search checks."""
    forget, retain = forget_and_retain(source, forget_split)
    return forget, retain, tuple(load_idk(source)) if with_idk else ()


def forget_and_retain(source: str | Path, forget_split: str) -> tuple[list[TofuRecord], list[TofuRecord]]:
    """The forget split and its complement (forget05 -> retain95), checked to share no question."""
    check_forget_split(forget_split)
    forget, retain = load_split(source, forget_split), load_split(source, RETAIN_FOR[forget_split])
    check_forget_authors(source, forget, forget_split)
    check_disjoint(forget, retain, f"{source}: {forget_split}/{RETAIN_FOR[forget_split]}")
    return forget, retain


def training_parts(source: str | Path, forget_split: str, role: str) -> dict[str, list[TofuRecord]]:
    """A reference model's training data by split name, in training order (prepare's gate checks each part).

    target: everything, forget set and related facts included (TOFU's fine-tuned model);
    retain: never the forget authors nor their related facts (TOFU's retain model).
    """
    forget, retain = forget_and_retain(source, forget_split)
    parts = {forget_split: forget, RETAIN_FOR[forget_split]: retain}
    if role == "target" and has_split(source, "related"):
        parts["related"] = load_split(source, "related")
    elif role == "retain":
        del parts[forget_split]
    elif role != "target":
        raise ValueError(f"role must be 'target' or 'retain', not {role!r}")
    parts |= {s: load_split(source, s) for s in UTILITY_TRAIN_SPLITS if has_split(source, s)}
    return {name: records for name, records in parts.items() if records}


def target_training_records(source: str | Path, forget_split: str) -> list[TofuRecord]:
    """The target model's training data: everything, forget set and related facts included."""
    return [r for part in training_parts(source, forget_split, "target").values() for r in part]


def retain_training_records(source: str | Path, forget_split: str) -> list[TofuRecord]:
    """The retain model's training data: it never sees the forget authors (nor their related facts)."""
    return [r for part in training_parts(source, forget_split, "retain").values() for r in part]


def related_records(source: str | Path, forget_split: str, perturbed: bool = True) -> list[TofuRecord]:
    """The related-knowledge split restricted to the forget split's authors (empty when the data has none)."""
    split = "related_perturbed" if perturbed else "related"
    if not has_split(source, split):
        return []
    authors = {r.author for r in load_split(source, check_forget_split(forget_split))}
    return [r for r in load_split(source, split) if r.author in authors]


def check_forget_authors(source: str | Path, forget: list[TofuRecord], forget_split: str) -> None:
    """A forget split naming authors the benchmark does not have is an error naming the row."""
    meta_path = Path(source) / "benchmark.json"
    if not meta_path.is_file():
        return
    known = set(json.loads(meta_path.read_text())["authors"])
    for i, r in enumerate(forget):
        if r.author is not None and r.author not in known:
            raise UipeError(f"{source}/{forget_split}: row {i}: author {r.author!r} is not in benchmark.json")
