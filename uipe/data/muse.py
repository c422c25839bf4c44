"""MUSE's data (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", arXiv
2407.06460): record types and a loader for a local folder in the benchmark's published layout.

The layout is the one swj0419/muse_bench's load_data.py writes from the hub datasets muse-bench/MUSE-News and
muse-bench/MUSE-Books, one JSON list per split:

    raw/{forget,retain1,retain2,holdout}.json       texts (raw corpora; the .txt beside them is ignored)
    verbmem/forget.json                             {"prompt", "gt"}: a forget excerpt and its gold continuation
    knowmem/{forget_qa,retain_qa}.json              {"question", "answer"}
    knowmem/{forget_qa_icl,retain_qa_icl}.json      {"question", "answer"}: the in-context examples
    privleak/{forget,retain,holdout}.json           texts: membership-inference items
    scal/forget_{1..4}.json, sust/forget_{1..4}.json texts (MUSE-News only): nested / sequential forget sets

A text is a string, or a row {"text": ...} as the hub's datasets (and open-unlearning's loaders) carry it. scal/ and
sust/ are optional as a whole (MUSE-Books has neither); a folder that has one must have all four folds. Anything
missing or malformed is a UipeError of one line naming the file and the record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from uipe.errors import UipeError

RAW_SPLITS = ("forget", "retain1", "retain2", "holdout")
KNOWMEM_SPLITS = ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl")
PRIVLEAK_SPLITS = ("forget", "retain", "holdout")
FOLDS = ("forget_1", "forget_2", "forget_3", "forget_4")
# The forget sets an unlearning run can take (data.forget_split): MUSE's forget corpus, each scalability set (folds
# 1..k) and each sustainability request (fold k).
FORGET_FILES = ("raw/forget", *(f"{family}/{fold}" for family in ("scal", "sust") for fold in FOLDS))
# (family, splits, required): every file the loader reads, in the order it reads them.
FAMILIES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("raw", RAW_SPLITS, True), ("verbmem", ("forget",), True), ("knowmem", KNOWMEM_SPLITS, True),
    ("privleak", PRIVLEAK_SPLITS, True), ("scal", FOLDS, False), ("sust", FOLDS, False),
)


def join_passages(texts: Sequence[str]) -> str:
    """A raw corpus as one text, passages separated by a blank line (muse_bench's raw/*.txt)."""
    return "\n\n".join(texts)


def qa_shots(items: Sequence[QAItem]) -> str:
    """Question-answer pairs as MUSE's knowmem prompt writes its in-context examples (muse_bench knowmem.py):
    "Question: {q}\nAnswer: {a}\n\n" each."""
    return "".join(f"Question: {qa.question}\nAnswer: {qa.answer}\n\n" for qa in items)


def split_path(family: str, split: str) -> str:
    """The file of one split, relative to the folder: raw/forget.json."""
    return f"{family}/{split}.json"


@dataclass(frozen=True)
class VerbMemItem:
    """A verbatim-memorisation probe: an excerpt of the forget corpus and the text that follows it there."""

    prompt: str
    gt: str


@dataclass(frozen=True)
class QAItem:
    """A knowledge-memorisation question about the corpus and its (short) answer."""

    question: str
    answer: str


def _frozen(mapping: Mapping[str, tuple]) -> Mapping[str, tuple]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class MuseData:
    """Every split of a MUSE folder; scal and sust are empty mappings when the corpus has none."""

    root: str
    raw: Mapping[str, tuple[str, ...]]
    verbmem: tuple[VerbMemItem, ...]
    knowmem: Mapping[str, tuple[QAItem, ...]]
    privleak: Mapping[str, tuple[str, ...]]
    scal: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sust: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # read-only views: a frozen record whose dicts could still be edited would not be frozen
        for name in ("raw", "knowmem", "privleak", "scal", "sust"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def training_parts(self, role: Literal["target", "retrained"]) -> dict[str, tuple[str, ...]]:
        """A reference model's raw-text corpus by file. target: every forget fold (scal/forget_4, MUSE's `train`
        config; raw/forget when the corpus has no folds) + retain1 + retain2; retrained: retain1 + retain2 only."""
        if role not in ("target", "retrained"):
            raise ValueError(f"role must be 'target' or 'retrained', not {role!r}")
        retain = {"raw/retain1": self.raw["retain1"], "raw/retain2": self.raw["retain2"]}
        if role == "retrained":
            return retain
        forget = ("scal/forget_4", self.scal["forget_4"]) if self.scal else ("raw/forget", self.raw["forget"])
        return dict([forget]) | retain

    def training_texts(self, role: Literal["target", "retrained"]) -> tuple[str, ...]:
        """training_parts' texts in order, as one corpus."""
        return tuple(t for part in self.training_parts(role).values() for t in part)


def _read_list(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UipeError(f"{path}: missing (a MUSE folder needs this split)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UipeError(f"{path}: cannot read ({type(e).__name__})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UipeError(f"{path}: not valid JSON ({e})") from None  # e names the line and column
    if not isinstance(rows, list):
        raise UipeError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    if not rows:
        raise UipeError(f"{path}: split is empty")
    return rows


def _field(row: object, key: str, where: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise UipeError(f"{where}: missing or empty field {key!r}")
    return value


def _texts(path: Path) -> tuple[str, ...]:
    out = []
    for i, row in enumerate(_read_list(path)):
        text = row if isinstance(row, str) else _field(row, "text", f"{path}: record {i}")
        if not text.strip():
            raise UipeError(f"{path}: record {i}: empty text")
        out.append(text)
    return tuple(out)


def _verbmem(path: Path) -> tuple[VerbMemItem, ...]:
    return tuple(VerbMemItem(_field(row, "prompt", f"{path}: record {i}"), _field(row, "gt", f"{path}: record {i}"))
                 for i, row in enumerate(_read_list(path)))


def _qa(path: Path) -> tuple[QAItem, ...]:
    return tuple(QAItem(_field(row, "question", f"{path}: record {i}"), _field(row, "answer", f"{path}: record {i}"))
                 for i, row in enumerate(_read_list(path)))


def _family(folder: Path, family: str, splits: tuple[str, ...], required: bool) -> dict[str, tuple]:
    if not required and not (folder / family).is_dir():
        return {}
    read = {"verbmem": _verbmem, "knowmem": _qa}.get(family, _texts)
    return {split: read(folder / split_path(family, split)) for split in splits}


def is_muse_folder(source: str | Path) -> bool:
    """A folder laid out as MUSE's (raw/ and verbmem/ present): how a data source says which benchmark it is."""
    folder = Path(source)
    return (folder / "raw").is_dir() and (folder / "verbmem").is_dir()


def load_muse(source: str | Path) -> MuseData:
    """Every split of a local MUSE folder; UipeError naming the file (and the record) on any problem."""
    folder = Path(source)
    if not folder.is_dir():
        raise UipeError(f"{folder}: not a folder of MUSE files (raw/, verbmem/, knowmem/, privleak/)")
    parts = {family: _family(folder, family, splits, required) for family, splits, required in FAMILIES}
    return MuseData(str(folder), parts["raw"], parts["verbmem"]["forget"], parts["knowmem"], parts["privleak"],
                    parts["scal"], parts["sust"])
