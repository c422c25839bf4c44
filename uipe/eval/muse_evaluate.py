"""MUSE's evaluation of a model (Shi et al. 2024, arXiv 2407.06460): build a MuseEvaluator once per (data,
tokenizer), call evaluate() per model or trial.

    C1 VerbMem    greedy continuation of each verbmem/forget prompt (VERBMEM_MAX_NEW_TOKENS) vs its gold
                  continuation cut to the same token budget, ROUGE-L F1
    C2 KnowMem    greedy answer to each knowmem/forget_qa question behind MUSE's in-context prompt
                  (KNOWMEM_MAX_NEW_TOKENS), cut at the stopwords, ROUGE-L F1
    C3 PrivLeak   Min-40% scores of privleak/forget and privleak/holdout texts, their AUC, and its relative
                  difference from a retrained model's AUC (when one is given)
    C4 utility    KnowMem on knowmem/retain_qa

A scoring pass (generate=False) reports only what needs no generation: the Min-K% AUC, PrivLeak, and the
teacher-forced probability of each knowmem answer behind its prompt (a proxy of KnowMem a screening search can
afford). Every model input follows muse_bench: a text is [BOS] + its tokens (the tokenizer's add_special_tokens for a
Llama tokenizer); no chat template, since MUSE's models are base models prompted with raw text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uipe.config import EvalConfig
from uipe.data.muse import MuseData, QAItem, VerbMemItem, load_muse
from uipe.errors import UipeError
from uipe.io import sha256_bytes
from uipe.eval import muse, scoring
from uipe.eval.evaluate import EvalResult, eval_mode
from uipe.prompts import IGNORE, text_ids, with_bos

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The evaluator's roles, by the MUSE files they read (data.muse.split_path).
ROLES = {"verbmem": "verbmem/forget", "knowmem_forget": "knowmem/forget_qa", "knowmem_retain": "knowmem/retain_qa",
         "privleak_forget": "privleak/forget", "privleak_holdout": "privleak/holdout"}
KNOWMEM_ROLES = ("knowmem_forget", "knowmem_retain")
PRIVLEAK_ROLES = ("privleak_forget", "privleak_holdout")
# open-unlearning's MUSE_MIA datasets keep the first 2048 tokens of a text (muse_bench keeps all: MUSE's texts fit).
PRIVLEAK_MAX_TOKENS = 2048
REFERENCE_KEY = "min_k_auc"  # what a reference file (a retrained model's evaluation) must hold
REFERENCE_FORMAT = "uipe-muse-reference/1"


@dataclass(frozen=True)
class MuseItems:
    """The evaluated items by role, and the in-context examples each knowmem role is prompted with."""

    verbmem: tuple[VerbMemItem, ...]
    knowmem: dict[str, tuple[QAItem, ...]]
    icl: dict[str, tuple[QAItem, ...]]
    privleak: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, data: MuseData, subset: int | None = None) -> MuseItems:
        """Every evaluated split of `data`, or its first `subset` items per split (a cheaper, lower-fidelity pass);
        the in-context examples are never cut: they are the prompt, not items."""
        cut = slice(None, subset)
        return cls(data.verbmem[cut],
                   {r: data.knowmem[f"{r.split('_')[1]}_qa"][cut] for r in KNOWMEM_ROLES},
                   {r: data.knowmem[f"{r.split('_')[1]}_qa_icl"] for r in KNOWMEM_ROLES},
                   {r: data.privleak[r.split("_")[1]][cut] for r in PRIVLEAK_ROLES})

    def counts(self) -> dict[str, int]:
        return {"verbmem": len(self.verbmem), **{r: len(v) for r, v in (self.knowmem | self.privleak).items()}}

    def records(self) -> dict[str, tuple]:
        """Every item by role: what the evaluator scores (prepare's gate and MLflow's dataset inputs read it)."""
        return {"verbmem": self.verbmem, **self.knowmem, **self.privleak}


def muse_records(source: str | Path) -> dict[str, tuple]:
    """A MUSE folder's evaluated items by the evaluator's role."""
    return MuseItems.of(load_muse(source)).records()


def load_reference_auc(path: str | Path, subset: int | None = None) -> float:
    """PrivLeak's reference: the Min-K% AUC in a retrained model's evaluation (the file `uipe reference` writes,
    or any JSON object with a `min_k_auc` number); UipeError naming the file otherwise. With `subset`, and the
    retrained model's per-text scores in the file, the AUC of their first `subset` texts per side: the reference of a
    subset evaluation, which scores those very texts."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UipeError(f"{path}: missing (PrivLeak's reference, a retrained model's evaluation)") from None
    except (OSError, ValueError) as e:
        raise UipeError(f"{path}: cannot read PrivLeak's reference ({type(e).__name__})") from None
    value = doc.get(REFERENCE_KEY) if isinstance(doc, dict) else None
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UipeError(f"{path}: no {REFERENCE_KEY!r} in [0, 1] (PrivLeak's reference AUC), got {value!r}")
    scores = doc.get("min_k_scores")
    if subset is None or not isinstance(scores, dict):
        return float(value)
    try:
        return muse.privleak_auc(*(np.asarray(scores[r][:subset], dtype=np.float64) for r in PRIVLEAK_ROLES))
    except (KeyError, TypeError, ValueError) as e:
        raise UipeError(f"{path}: malformed min_k_scores ({type(e).__name__}: {e})") from None


def load_or_compute_reference(path: str | Path, evaluator: MuseEvaluator, model_dir: str | Path,
                              dtype: str = "auto") -> dict:
    """The retrained model's Min-K% AUC and per-text scores at `path`, reused while the model's files and the
    evaluated texts are unchanged, else computed (a scoring pass over every privleak text) and written atomically."""
    from uipe.eval.reference import model_hash
    from uipe.io import atomic_write_json
    from uipe.stages import recorded, reusable

    if evaluator.fidelity != "full":
        raise UipeError(f"{path}: PrivLeak's reference is computed over every text (eval.subset is "
                        f"{evaluator.cfg.subset})")
    want = {"format": REFERENCE_FORMAT, "model_hash": model_hash(model_dir), "data_hash": evaluator.data_hash}
    have = recorded(Path(path))
    if reusable(have, want, path):
        return have  # type: ignore[return-value]
    from uipe.models import default_device, load_model

    result = evaluator.evaluate(load_model(model_dir, dtype=dtype, device=default_device()), generate=False)
    doc = {**want, "model": str(model_dir), REFERENCE_KEY: result.aggregates[REFERENCE_KEY],
           "min_k_scores": {r: result.per_item[r]["min_k"] for r in PRIVLEAK_ROLES}}
    atomic_write_json(path, doc)
    return doc


def gold_continuation(tokenizer: PreTrainedTokenizerBase, gt: str, budget: int) -> str:
    """VerbMem's reference: the gold continuation cut to its first `budget` tokens, as muse_bench's verbmem.py
    cuts it (tokenised with the tokenizer's special tokens, so a Llama BOS counts in the budget, then decoded
    without them)."""
    return tokenizer.decode(tokenizer(gt, add_special_tokens=True)["input_ids"][:budget], skip_special_tokens=True)


def text_example(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> scoring.Example:
    """A privleak text as (input_ids, labels): [BOS] + its first `max_tokens` tokens, every token after the first
    scored (muse_bench's compute_ppl reads log-probs of input_ids[1:])."""
    ids = with_bos(tokenizer, text_ids(tokenizer, text)[:max_tokens])
    if len(ids) < 2:
        raise UipeError(f"privleak: text {text[:40]!r} has no token to score")
    return ids, [IGNORE, *ids[1:]]


def answer_example(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> scoring.Example:
    """A knowmem answer behind its prompt, only the answer's tokens scored (the screening proxy of KnowMem, uipe's
    own: MUSE scores generations only). The answer's tokens are those a greedy decoder would emit after exactly the
    prompt's tokens: MUSE's prompt ends in "Answer: ", whose space a byte-level or SentencePiece tokenizer encodes
    as a token of its own, so the answer is the space-led word that follows it (the tokens that extend the prompt's
    in the tokenization of prompt + " " + answer; MUSE strips the leading space of a generation). Where that
    tokenization does not extend the prompt's, the answer tokenized alone."""
    prompt_ids = with_bos(tokenizer, text_ids(tokenizer, prompt))
    joined = with_bos(tokenizer, text_ids(tokenizer, f"{prompt} {answer}"))
    extends = joined[:len(prompt_ids)] == prompt_ids and len(joined) > len(prompt_ids)
    answer_ids = joined[len(prompt_ids):] if extends else text_ids(tokenizer, answer)
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


class MuseEvaluator:
    """MUSE's C1-C4 on one tokenizer's view of a MuseData; `reference_auc`: a retrained model's Min-K% AUC on the
    same data, PrivLeak's reference (no PrivLeak without it)."""

    def __init__(self, data: MuseData, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig | None = None,
                 max_length: int = PRIVLEAK_MAX_TOKENS, reference_auc: float | None = None) -> None:
        self.cfg, self.tokenizer, self.reference_auc = cfg or EvalConfig(), tokenizer, reference_auc
        self.items = MuseItems.of(data, self.cfg.subset)
        full = MuseItems.of(data).counts()
        self.fidelity = "full" if self.items.counts() == full else f"subset:{self.cfg.subset}"
        self._verbmem_prompts = [with_bos(tokenizer, text_ids(tokenizer, v.prompt)) for v in self.items.verbmem]
        self._gold = [gold_continuation(tokenizer, v.gt, muse.VERBMEM_MAX_NEW_TOKENS) for v in self.items.verbmem]
        prompts = {r: [muse.knowmem_prompt(qa.question, self.items.icl[r]) for qa in self.items.knowmem[r]]
                   for r in KNOWMEM_ROLES}
        self._knowmem_prompts = [with_bos(tokenizer, text_ids(tokenizer, p)) for r in KNOWMEM_ROLES
                                 for p in prompts[r]]
        self._answers = [answer_example(tokenizer, p, qa.answer) for r in KNOWMEM_ROLES
                         for p, qa in zip(prompts[r], self.items.knowmem[r], strict=True)]
        self._texts = [text_example(tokenizer, t, max_length) for r in PRIVLEAK_ROLES for t in self.items.privleak[r]]
        # what PrivLeak's reference depends on: the scored token ids of every privleak text (texts, tokenizer, cut)
        self.data_hash = sha256_bytes(json.dumps(self._texts).encode())

    @classmethod
    def from_source(cls, source: str | Path, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig | None = None,
                    max_length: int = PRIVLEAK_MAX_TOKENS, reference: str | Path | None = None) -> MuseEvaluator:
        """An evaluator over a MUSE folder, PrivLeak's reference AUC read from `reference` when given."""
        auc = load_reference_auc(reference, (cfg or EvalConfig()).subset) if reference else None
        return cls(load_muse(source), tokenizer, cfg, max_length, auc)

    def _split(self, values: Sequence, roles: Sequence[str]) -> dict[str, list]:
        """A flat table over `roles`' items (in role order) as one list per role."""
        counts, out, start = self.items.counts(), {}, 0
        for role in roles:
            out[role], start = list(values[start:start + counts[role]]), start + counts[role]
        return out

    def score(self, model: PreTrainedModel) -> tuple[np.ndarray, np.ndarray]:
        """The scoring pass: (each knowmem answer's mean NLL behind its prompt, each privleak text's Min-K% score)."""
        pad, size = self.tokenizer.pad_token_id, self.cfg.batch_size
        with eval_mode(model):
            nll = scoring.answer_nll(model, self._answers, pad, size)
            logprobs = scoring.answer_token_logprobs(model, self._texts, pad, size)
        return nll, np.array([muse.min_k_percent(lp) for lp in logprobs], dtype=np.float64)

    def generate(self, model: PreTrainedModel) -> tuple[list[str], list[str]]:
        """(each verbmem prompt's greedy continuation, each knowmem prompt's raw greedy answer, forget then retain)."""
        size = self.cfg.batch_size
        with eval_mode(model):
            verbmem = scoring.greedy_generate(model, self.tokenizer, self._verbmem_prompts, size,
                                              muse.VERBMEM_MAX_NEW_TOKENS)
            # unstripped: MUSE cuts at "\n\n" first, so an answer that opens with a blank line is empty
            knowmem = scoring.greedy_generate(model, self.tokenizer, self._knowmem_prompts, size,
                                              muse.KNOWMEM_MAX_NEW_TOKENS, strip=False,
                                              stop_strings=muse.KNOWMEM_STOPWORDS)  # cut there anyway
        return verbmem, knowmem

    def evaluate(self, model: PreTrainedModel, generate: bool = True,
                 scores: tuple[np.ndarray, np.ndarray] | None = None) -> EvalResult:
        """Aggregates by catalogue name and per-item values; `scores`: an earlier scoring pass of these very weights,
        so only generation runs."""
        nll, mink = scores if scores is not None else self.score(model)
        per_item = self._scored_items(nll, mink)
        aggregates = {f"{r}_prob": float(np.mean(per_item[r]["prob"])) for r in KNOWMEM_ROLES}
        aggregates["min_k_auc"] = muse.privleak_auc(per_item["privleak_forget"]["min_k"],
                                                    per_item["privleak_holdout"]["min_k"])
        if self.reference_auc is not None:
            aggregates["privleak"] = muse.privleak(aggregates["min_k_auc"], self.reference_auc)
        if generate:
            verbmem, knowmem = self.generate(model)
            self._add_generated(per_item, verbmem, knowmem)
            aggregates |= {f"{r}_rougeL": float(np.mean(per_item[r]["rougeL"])) for r in ("verbmem", *KNOWMEM_ROLES)}
        return EvalResult(aggregates, per_item, self.fidelity, (nll, mink))

    def _scored_items(self, nll: np.ndarray, mink: np.ndarray) -> dict[str, dict[str, list]]:
        per_item: dict[str, dict[str, list]] = {r: {"min_k": v} for r, v in self._split(mink, PRIVLEAK_ROLES).items()}
        for role, values in self._split(nll, KNOWMEM_ROLES).items():
            per_item[role] = {"answer_nll": values, "prob": np.exp(-np.asarray(values)).tolist()}
        return per_item

    def _add_generated(self, per_item: dict[str, dict[str, list]], verbmem: list[str], knowmem: list[str]) -> None:
        per_item["verbmem"] = {"generation": verbmem, "gold": list(self._gold),
                               "rougeL": muse.rouge_l_f1(self._gold, verbmem)}
        for role, raw in self._split(knowmem, KNOWMEM_ROLES).items():
            answers = [muse.cut_at_stopwords(g) for g in raw]
            gold = [qa.answer for qa in self.items.knowmem[role]]
            per_item[role] |= {"generation": raw, "prediction": answers, "rougeL": muse.rouge_l_f1(gold, answers)}
