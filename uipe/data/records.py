"""TOFU's record type, split names and validation.

A record is one question with its answer, a paraphrased answer and perturbed (wrong) answers. TOFU's real-authors
and world-facts sets carry no paraphrase: there the answer itself plays the paraphrase (paraphrased_answer=None).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from uipe.errors import UipeError
from uipe.io import sha256_bytes

FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_FOR = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# Authors of the same kind that no model ever trains on, as many as the matching forget split (TOFU's names): what a
# deployer without a retain model compares forgetting against (uipe/eval reference-free signals).
HOLDOUT_FOR = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
HOLDOUT_SPLITS = tuple(HOLDOUT_FOR.values()) + tuple(f"{s}_perturbed" for s in HOLDOUT_FOR.values())
TRAIN_SPLITS = FORGET_SPLITS + tuple(RETAIN_FOR.values())
UTILITY_EVAL_SPLITS = ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")
EVAL_SPLITS = tuple(f"{s}_perturbed" for s in FORGET_SPLITS) + UTILITY_EVAL_SPLITS
# The related-knowledge split (paper, mechanism 1): facts tied to forget facts, trained by the target model, in
# neither the forget nor the retain split.
RELATED_SPLITS = ("related", "related_perturbed")
# Training sets in the role of real_authors / world_facts, seen by both reference models (synthetic benchmark).
UTILITY_TRAIN_SPLITS = ("real_authors", "world_facts")
ALL_SPLITS = TRAIN_SPLITS + EVAL_SPLITS + RELATED_SPLITS + UTILITY_TRAIN_SPLITS + HOLDOUT_SPLITS


def eval_split_for(forget_split: str) -> str:
    check_forget_split(forget_split)
    return f"{forget_split}_perturbed"


def holdout_eval_split_for(forget_split: str) -> str:
    return f"{HOLDOUT_FOR[check_forget_split(forget_split)]}_perturbed"


def check_forget_split(forget_split: str) -> str:
    if forget_split not in FORGET_SPLITS:
        raise UipeError(f"unknown forget split {forget_split!r}; choose one of {', '.join(FORGET_SPLITS)}")
    return forget_split


@dataclass(frozen=True)
class TofuRecord:
    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answer: tuple[str, ...] = field(default_factory=tuple)
    author: str | None = None

    def to_json(self) -> dict:
        out: dict = {"question": self.question, "answer": self.answer}
        if self.paraphrased_answer is not None:
            out["paraphrased_answer"] = self.paraphrased_answer
        if self.perturbed_answer:
            out["perturbed_answer"] = list(self.perturbed_answer)
        if self.author is not None:
            out["author"] = self.author
        return out


def record_from_row(row: dict, where: str) -> TofuRecord:
    """Build a record from a JSON/parquet row; `where` names file and row for the error message."""
    for key in ("question", "answer"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UipeError(f"{where}: missing or empty field {key!r}")
    pert = row.get("perturbed_answer", ())
    if isinstance(pert, str):
        pert = (pert,)
    if not all(isinstance(p, str) for p in pert):
        raise UipeError(f"{where}: field 'perturbed_answer' must be a list of strings")
    para = row.get("paraphrased_answer")
    if para is not None and not isinstance(para, str):
        raise UipeError(f"{where}: field 'paraphrased_answer' must be a string")
    author = row.get("author")
    return TofuRecord(row["question"], row["answer"], para, tuple(pert), author if isinstance(author, str) else None)


def validate_split(records: list[TofuRecord], where: str, perturbed: bool) -> None:
    """An empty split, or perturbed lists of unequal length in an evaluation split, is an error naming the row."""
    if not records:
        raise UipeError(f"{where}: split is empty")
    if not perturbed:
        return
    n = len(records[0].perturbed_answer)
    if n == 0:
        raise UipeError(f"{where}: row 0: evaluation split needs 'perturbed_answer'")
    for i, r in enumerate(records):
        if len(r.perturbed_answer) != n:
            raise UipeError(
                f"{where}: row {i}: {len(r.perturbed_answer)} perturbed answers, expected {n} like row 0"
            )


def check_disjoint(forget: list[TofuRecord], retain: list[TofuRecord], where: str) -> None:
    """The same question in forget and retain would make forget quality meaningless."""
    retain_q = {r.question: i for i, r in enumerate(retain)}
    for i, r in enumerate(forget):
        if r.question in retain_q:
            raise UipeError(
                f"{where}: forget row {i} and retain row {retain_q[r.question]} share the question {r.question!r}"
            )


def records_hash(*splits: list[TofuRecord] | tuple[TofuRecord, ...] | list[str] | tuple[str, ...]) -> str:
    """sha256 of the training data as the loop sees it (format-independent: JSON of the records, in order)."""
    rows = [[r.to_json() if isinstance(r, TofuRecord) else r for r in split] for split in splits]
    return sha256_bytes(json.dumps(rows, sort_keys=True).encode())


TOFU_ITEMS_PER_AUTHOR = 20  # TOFU's files carry no author field: 20 questions per author, in author order


def author_folds(records: list[TofuRecord] | tuple[TofuRecord, ...]) -> tuple[list[int], list[int]]:
    """Item indices of the selection fold and the report fold: whole authors, alternating in order of first
    appearance (the 1st, 3rd, ... author selects; the 2nd, 4th, ... reports), so no author's facts are in both and
    the folds differ in size by at most one author. Records without an author (TOFU's own files) are grouped in
    TOFU's blocks of 20 consecutive questions."""
    order: dict[str, int] = {}
    select, report = [], []
    for i, r in enumerate(records):
        author = r.author if r.author is not None else f"block-{i // TOFU_ITEMS_PER_AUTHOR}"
        rank = order.setdefault(author, len(order))
        (select if rank % 2 == 0 else report).append(i)
    if not select or not report:
        raise UipeError(f"forget split: {len(order)} author(s); the selection and report folds need at least two")
    return select, report
