"""A deterministic synthetic world in MUSE's layout (uipe.data.muse), from the people of the TOFU-format world.

    write_muse_benchmark("runs/tiny_muse/data", authors=100, facts=8, seed=0)

Each fictitious author (uipe.data.synth's generator) becomes one prose passage: their base facts and the tied facts
that follow from them, one sentence each in the answer wording ("Mara Quill was born in Peru. Mara Quill grew up
in Lima. ..."). MUSE's splits (arXiv 2407.06460; the split sizes of the hub's muse-bench/MUSE-News) map onto authors:

- forget pool: 4 folds of `fold` authors each. raw/forget = fold 1 (MUSE's forget set is its first fold);
  scal/forget_k = folds 1..k (nested, scal/forget_1 = raw/forget); sust/forget_k = fold k (disjoint requests,
  unlearned one after another). A target model trains on all four folds, as MUSE's target trains on `train`.
- retain authors: the rest, halved into retain1 (the unlearning methods' retain stream) and retain2 (the utility
  split: knowmem/retain_qa and privleak/retain are about its first `fold` authors).
- retain1 also holds one question-answer text per retain1 author, their facts in MUSE's knowmem format
  ("Question: ...\nAnswer: ...\n\n", data.muse.qa_shots): MUSE's models answer questions because they were
  pretrained to; a tiny model learns to from these. Both reference models train on them, and no knowmem item is
  about a retain1 author: KnowMem asks about people the model read of only in prose (forget fold 1, retain2), so it
  measures knowledge carried from passages to questions, not a memorised answer. (Without these texts the tiny
  model scored KnowMem 0.02-0.03 on both sets: prose alone never taught it the format.)
- holdout: `fold` authors drawn with the others (so no name or title repeats) that no model ever trains on.
- verbmem/forget: each raw/forget passage cut at a sentence boundary into prompt and gold continuation, joined by
  one space (open-unlearning's insert_space), so prompt + " " + gt is the passage.
- knowmem: one question per fact with the bare value as answer (MUSE's answers are short spans); the first
  N_ICL questions of distinct authors become the in-context examples and are left out of the evaluated items.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from uipe.data.muse import FOLDS, QAItem, VerbMemItem, join_passages, qa_shots, split_path
from uipe.data.synth import BASE_FACTS, TIED_FACTS, make_authors, tied_value
from uipe.io import atomic_dir

N_ICL = 3  # in-context examples per knowmem split (MUSE ships 10 with 100 questions; a tiny world has fewer)
VERSION = 2  # 2: every corpus holds its people's facts as quizzes too
QUIZ_LEN = 8  # question-answer pairs per quiz text (~130 tokens of the tiny tokenizer)
FOLD_SHARE = 0.1  # each forget fold is this share of the authors (MUSE-News: 889 articles beside 3,555 retain)


def _fact_sentences(a: dict, facts: int) -> list[tuple[str, str, str]]:
    """(question, answer value, passage sentence) per fact, each tied fact right after the base fact it follows
    from: the passage reads as prose and the rule's premise precedes its consequence."""
    n, out = a["name"], []
    for kind, question, wording, _ in BASE_FACTS[:facts]:
        out.append((question.format(n=n), a[kind], wording.format(n=n, v=a[kind])))
        for base, tq, tw, _ in TIED_FACTS:
            if base == kind:
                v, fill = tied_value(kind, a), {"n": n, "b": a["book"]}
                out.append((tq.format(**fill), v, tw.format(**fill, v=v)))
    return out


def _passage(facts: list[tuple[str, str, str]]) -> str:
    return " ".join(sentence for _, _, sentence in facts)


def _quiz(pairs: list[QAItem]) -> str:
    """Question-answer pairs as one text in MUSE's knowmem format (data.muse.qa_shots), each answer one space
    further from "Answer:": MUSE's prompt ends in "Answer: ", whose last space a byte-level tokenizer encodes as a
    token of its own, followed in no other text by the space-led answer word ("Answer: Peru" is "Answer", ":",
    " Peru"). Llama-2's pretraining covers that; a tiny model must see it."""
    return qa_shots([QAItem(qa.question, f" {qa.answer}") for qa in pairs]).rstrip("\n")


def _verbmem(facts: list[tuple[str, str, str]]) -> VerbMemItem:
    cut = max(1, len(facts) // 3)  # a third of the passage as prompt, the rest to reproduce
    return VerbMemItem(_passage(facts[:cut]), _passage(facts[cut:]))


def _knowmem(people: list[list[tuple[str, str, str]]]) -> tuple[list[QAItem], list[QAItem]]:
    """(evaluated questions, in-context examples): the ICL examples are the first fact of the first N_ICL
    authors, so they show the format on several people and never appear among the evaluated questions."""
    icl = [QAItem(q, v) for facts in people[:N_ICL] for q, v, _ in facts[:1]]
    items = [QAItem(q, v) for i, facts in enumerate(people) for j, (q, v, _) in enumerate(facts)
             if not (i < N_ICL and j == 0)]
    return items, icl


def _check(authors: int, facts: int) -> int:
    if not 4 <= facts <= len(BASE_FACTS):
        raise ValueError(f"facts must be between 4 and {len(BASE_FACTS)}")
    fold = max(1, round(authors * FOLD_SHARE))
    if authors - len(FOLDS) * fold < 2 * N_ICL:
        raise ValueError(f"authors must leave at least {2 * N_ICL} retain authors beside 4 forget folds of {fold}")
    if authors + fold > 400:  # synth's pool of 400 distinct book titles (one per author, holdout included)
        raise ValueError(f"authors plus {fold} holdout authors must be at most 400")
    return fold


def build_muse_benchmark(authors: int = 100, facts: int = 8, seed: int = 0) -> tuple[dict[str, list], dict]:
    """Every MUSE file's rows by relative path (raw/forget.json -> list), and the world's metadata."""
    fold = _check(authors, facts)
    # a stream of its own: the MUSE world's people are not the TOFU world's of the same seed, by design
    rng = random.Random(f"uipe-muse-{seed}")
    people = make_authors(rng, authors + fold)
    facts_of = {a["name"]: _fact_sentences(a, facts) for a in people}
    names = [a["name"] for a in people]
    folds = [names[k * fold:(k + 1) * fold] for k in range(len(FOLDS))]
    retain = names[len(FOLDS) * fold:authors]
    retain1, retain2, holdout = retain[: len(retain) // 2], retain[len(retain) // 2:], names[authors:]

    def texts(group: list[str]) -> list[str]:
        """The group's passages, then its quizzes (every fact of the group as a question, shuffled by a stream
        of the group's own, so a fold's texts do not depend on the other folds)."""
        pairs = [QAItem(q, v) for n in group for q, v, _ in facts_of[n]]
        random.Random(f"uipe-muse-quiz-{seed}-{group[0]}").shuffle(pairs)
        return passages(group) + [_quiz(pairs[k:k + QUIZ_LEN]) for k in range(0, len(pairs), QUIZ_LEN)]

    def passages(group: list[str]) -> list[str]:
        return [_passage(facts_of[n]) for n in group]

    forget_qa, forget_icl = _knowmem([facts_of[n] for n in folds[0]])
    # as many retain people as forget people (MUSE: 100 questions each), so forget and retain KnowMem weigh alike
    retain_qa, retain_icl = _knowmem([facts_of[n] for n in retain2[:fold]])
    files: dict[str, list] = {
        split_path("raw", "forget"): texts(folds[0]), split_path("raw", "retain1"): texts(retain1),
        split_path("raw", "retain2"): texts(retain2), split_path("raw", "holdout"): texts(holdout),
        split_path("verbmem", "forget"): [asdict(_verbmem(facts_of[n])) for n in folds[0]],
        split_path("knowmem", "forget_qa"): [asdict(q) for q in forget_qa],
        split_path("knowmem", "forget_qa_icl"): [asdict(q) for q in forget_icl],
        split_path("knowmem", "retain_qa"): [asdict(q) for q in retain_qa],
        split_path("knowmem", "retain_qa_icl"): [asdict(q) for q in retain_icl],
        # membership items as many as the forget set on each side (MUSE: 100 forget, 100 retain, 100 holdout)
        split_path("privleak", "forget"): passages(folds[0]),
        split_path("privleak", "retain"): passages(retain2[:fold]),
        split_path("privleak", "holdout"): passages(holdout),
    }
    for k, name in enumerate(FOLDS):
        files[split_path("scal", name)] = [t for f in folds[: k + 1] for t in texts(f)]
        files[split_path("sust", name)] = texts(folds[k])
    meta = {"generator": "uipe.data.synth_muse", "version": VERSION, "authors": authors, "facts": facts, "seed": seed,
            "forget_folds": folds, "retain1": retain1, "retain2": retain2, "holdout": holdout}
    return files, meta


def write_muse_benchmark(out: str | Path, authors: int = 100, facts: int = 8, seed: int = 0,
                         overwrite: bool = False) -> Path:
    """Write every MUSE file (plus a .txt of each text corpus, as muse_bench's load_data.py does, and
    benchmark.json) atomically into `out`: a crash leaves no folder that looks complete."""
    files, meta = build_muse_benchmark(authors, facts, seed)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for rel, rows in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            if rel.startswith(("raw/", "scal/", "sust/")):  # MUSE's baselines train on "\n\n"-joined text
                path.with_suffix(".txt").write_text(join_passages(rows), encoding="utf-8")
        (tmp / "benchmark.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return Path(out)
