"""TOFU evaluation of a model: build an Evaluator once per (data, forget split, tokenizer), call evaluate() per trial.

The Evaluator tokenises every evaluation split once and keeps one table of distinct (prompt, answer) pairs:
the answer of one item is often another item's paraphrase or a perturbed option (real authors / world facts use
the answer as the paraphrase), so each distinct pair is scored once per evaluate() call, and each distinct
question is generated once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from uipe.config import EvalConfig
from uipe.errors import UipeError
from uipe.eval import metrics, scoring

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from uipe.data import TofuRecord

# role -> split kind (metrics.split_summary). "related": facts tied to the forget facts (UIPE's related
# knowledge), scored like the forget split since the aim is to forget them too.
KINDS: dict[str, metrics.SplitKind] = {
    "forget": "forget", "retain": "retain", "real_authors": "factual", "world_facts": "factual", "related": "forget",
    "holdout": "forget",
}
# Scored, never generated: the holdout split feeds reference-free signals, which need only likelihoods, so it adds
# one scoring pass over its items and no greedy generation.
SCORED_ONLY = ("holdout",)
# Membership-inference attacks compare these roles' answers; Min-K%++ keeps the lowest 40% of token z-scores
# (open-unlearning's configured k for mia_min_k_plus_plus).
MIA_ROLES = ("forget", "holdout")
MIN_K = 0.4
REQUIRED_ROLES = ("forget", "retain", "real_authors", "world_facts")
# Forget quality on the selection and the report author fold (uipe study chooses on one, reports the other).
FOLD_KEYS = ("forget_quality_select", "forget_quality_report")


class ForgetReference(Protocol):
    """What forget quality reads of a retain reference (eval.reference.RetainReference). A Protocol, so imports
    flow one way: reference.py builds references with an Evaluator, and this module never imports it."""

    @property
    def forget_truth_ratios(self) -> Sequence[float]: ...

    @property
    def related_truth_ratios(self) -> Sequence[float] | None: ...

    def fitted_to(self, forget_split: str, data_hash: str, n_forget: int, n_related: int) -> ForgetReference:
        """The reference cut to an evaluation's items; UipeError when it does not fit them."""
        ...


@dataclass
class EvalResult:
    aggregates: dict[str, float]  # forget_quality, model_utility, <role>_prob/_rougeL/_truth_ratio, ...
    per_item: dict[str, dict[str, list]]  # role -> metric -> one value per item
    fidelity: str  # "full" or "subset:N" (lower fidelity: fewer items per split)
    # the scoring pass's raw (NLL, Min-K%++) tables: a full evaluation of the same weights may start from them
    scores: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {**self.aggregates, "fidelity": self.fidelity, "per_item": self.per_item}


@dataclass(frozen=True)
class _Plan:
    """One role's items as indices into the evaluator's distinct-pair and distinct-prompt tables."""

    ground_truth: tuple[str, ...]
    answer: tuple[int, ...]
    para: tuple[int, ...]
    pert: tuple[tuple[int, ...], ...]
    prompt: tuple[int, ...]


@dataclass
class _Tables:
    pairs: list[scoring.Example] = field(default_factory=list)
    pair_index: dict[tuple[str, str], int] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)
    prompt_index: dict[str, int] = field(default_factory=dict)


def eval_records(source: str | Path, forget_split: str) -> dict[str, list[TofuRecord]]:
    """The evaluation splits of a data source by role; 'related' and 'holdout' when the data has them."""
    from uipe.data import eval_split_for, has_split, load_split, related_records
    from uipe.data.records import holdout_eval_split_for

    out = {"forget": load_split(source, eval_split_for(forget_split)),
           "retain": load_split(source, "retain_perturbed"),
           "real_authors": load_split(source, "real_authors_perturbed"),
           "world_facts": load_split(source, "world_facts_perturbed")}
    related = related_records(source, forget_split, perturbed=True)
    if related:
        out["related"] = related
    if has_split(source, holdout_eval_split_for(forget_split)):
        out["holdout"] = load_split(source, holdout_eval_split_for(forget_split))
    return out


def data_hash(splits: Mapping[str, Sequence[TofuRecord]], template: str, max_length: int) -> str:
    """Identity of the evaluation data (all items, before any subset) and of how it is tokenised."""
    doc = {"template": template, "max_length": max_length,
           "splits": {role: [r.to_json() for r in recs] for role, recs in sorted(splits.items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Evaluator:
    def __init__(self, splits: Mapping[str, Sequence[TofuRecord]], tokenizer: PreTrainedTokenizerBase,
                 forget_split: str, template: str = "llama2", cfg: EvalConfig | None = None,
                 max_length: int = 128) -> None:
        missing = [r for r in REQUIRED_ROLES if not splits.get(r)]
        unknown = sorted(set(splits) - set(KINDS))
        if missing or unknown:
            raise UipeError(f"evaluation data: missing split(s) {missing}, unknown role(s) {unknown}")
        self.cfg = cfg or EvalConfig()
        self.tokenizer, self.forget_split, self.template, self.max_length = tokenizer, forget_split, template, max_length
        self.all_splits = {role: list(recs) for role, recs in splits.items() if recs}
        self.data_hash = data_hash(self.all_splits, template, max_length)
        n = self.cfg.subset
        self.splits = {role: recs[:n] if n else recs for role, recs in self.all_splits.items()}
        cut = any(len(self.splits[r]) < len(self.all_splits[r]) for r in self.splits)
        self.fidelity = f"subset:{n}" if cut else "full"
        self.reference: ForgetReference | None = None
        self._tables = _Tables()
        self._plans = {role: self._plan(role, recs) for role, recs in self.splits.items()}
        self.folds = _folds(self.splits["forget"])

    @classmethod
    def from_source(cls, source: str | Path, forget_split: str, tokenizer: PreTrainedTokenizerBase,
                    template: str = "llama2", cfg: EvalConfig | None = None, max_length: int = 128) -> Evaluator:
        return cls(eval_records(source, forget_split), tokenizer, forget_split, template, cfg, max_length)

    def full_fidelity(self) -> Evaluator:
        """The same evaluator over every item (a retain reference is always computed in full)."""
        if self.fidelity == "full":
            return self
        cfg = self.cfg.model_copy(update={"subset": None})
        return Evaluator(self.all_splits, self.tokenizer, self.forget_split, self.template, cfg, self.max_length)

    # -- pre-tokenisation --------------------------------------------------------------------------------------
    def _pair(self, role: str, row: int, question: str, answer: str) -> int:
        from uipe.prompts import encode_qa

        key = (question, answer)
        if key not in self._tables.pair_index:
            ids, labels = encode_qa(self.tokenizer, question, answer, self.template, self.max_length)
            if all(lab == scoring.IGNORE for lab in labels):
                raise UipeError(f"{role} row {row}: answer {answer[:40]!r} is cut away by max_length={self.max_length}")
            self._tables.pair_index[key] = len(self._tables.pairs)
            self._tables.pairs.append((ids, labels))
        return self._tables.pair_index[key]

    def _prompt(self, question: str) -> int:
        from uipe.prompts import prompt_token_ids

        if question not in self._tables.prompt_index:
            self._tables.prompt_index[question] = len(self._tables.prompts)
            self._tables.prompts.append(prompt_token_ids(self.tokenizer, question, self.template))
        return self._tables.prompt_index[question]

    def _plan(self, role: str, records: Sequence[TofuRecord]) -> _Plan:
        answer, para, pert, prompt = [], [], [], []
        for i, r in enumerate(records):
            if not r.perturbed_answer:
                raise UipeError(f"{role} row {i}: evaluation needs perturbed answers")
            answer.append(self._pair(role, i, r.question, r.answer))
            # TOFU: without a paraphrase (real authors, world facts) the answer itself plays the paraphrase.
            para.append(self._pair(role, i, r.question, r.paraphrased_answer or r.answer))
            pert.append(tuple(self._pair(role, i, r.question, p) for p in r.perturbed_answer))
            if role not in SCORED_ONLY:
                prompt.append(self._prompt(r.question))
        return _Plan(tuple(r.answer for r in records), tuple(answer), tuple(para), tuple(pert), tuple(prompt))

    def n_items(self, role: str) -> int:
        return len(self.splits.get(role, ()))

    # -- scoring -------------------------------------------------------------------------------------------------
    def _score(self, model: PreTrainedModel, roles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """NLL of each distinct pair the roles use (NaN for pairs no role here needs) and, where the data has a
        holdout split, the Min-K%++ score of the forget and holdout answers (NaN elsewhere): the attack reads no
        other pair's score, and its per-token mean and variance over the vocabulary cost more the larger the
        vocabulary (32k for Llama-2)."""
        plans = [self._plans[r] for r in roles]
        needed = sorted({i for p in plans for i in (*p.answer, *p.para, *(j for row in p.pert for j in row))})
        nll, mink = np.full(len(self._tables.pairs), np.nan), np.full(len(self._tables.pairs), np.nan)
        pad = self.tokenizer.pad_token_id
        attacked = sorted({i for r in MIA_ROLES if r in roles for i in self._plans[r].answer}) \
            if "holdout" in roles else []
        for group, k in ((sorted(set(needed) - set(attacked)), None), (attacked, MIN_K)):
            if not group:
                continue
            nll[group], scores = scoring.score_answers(model, [self._tables.pairs[i] for i in group], pad,
                                                       self.cfg.batch_size, k)
            if scores is not None:
                mink[group] = scores
        return nll, mink

    def truth_ratios(self, model: PreTrainedModel, roles: Sequence[str]) -> dict[str, np.ndarray]:
        """Raw per-item truth ratios R of the given roles (what a retain reference stores)."""
        roles = [r for r in roles if r in self._plans]
        with eval_mode(model):
            nll = self._score(model, roles)[0]
        return {r: metrics.truth_ratios(nll[list(self._plans[r].para)],
                                        [nll[list(row)] for row in self._plans[r].pert]) for r in roles}

    def set_reference(self, reference: ForgetReference) -> None:
        self.reference = reference.fitted_to(self.forget_split, self.data_hash, self.n_items("forget"),
                                             self.n_items("related"))

    def evaluate(self, model: PreTrainedModel, generate: bool = True,
                 scores: tuple[np.ndarray, np.ndarray] | None = None) -> EvalResult:
        """All aggregates and per-item values; forget quality only once a retain reference is set. `scores`: the
        `scores` of an earlier evaluation of these very weights (a screening pass), so only generation runs."""
        roles = list(self._plans)
        with eval_mode(model):
            nll, mink = scores if scores is not None else self._score(model, roles)
            texts: list[str] = []
            if generate:
                texts = scoring.greedy_generate(model, self.tokenizer, self._tables.prompts, self.cfg.batch_size,
                                                self.cfg.max_new_tokens)
        aggregates: dict[str, float] = {}
        per_item: dict[str, dict[str, list]] = {}
        for role in roles:
            plan = self._plans[role]
            items = {"answer_nll": nll[list(plan.answer)].tolist(), "paraphrase_nll": nll[list(plan.para)].tolist(),
                     "perturbed_nll": [nll[list(row)].tolist() for row in plan.pert]}
            rouge = None
            if generate and role not in SCORED_ONLY:
                items["generation"] = [texts[i] for i in plan.prompt]
                rouge = scoring.rouge_l_recall(plan.ground_truth, items["generation"])
                items["rougeL"] = rouge
            items["prob"] = np.exp(-np.asarray(items["answer_nll"])).tolist()
            if role in MIA_ROLES and "holdout" in roles:
                items["min_k_pp"] = mink[list(plan.answer)].tolist()
            items["truth_ratio"] = metrics.truth_ratios(items["paraphrase_nll"], items["perturbed_nll"]).tolist()
            summary = metrics.split_summary(KINDS[role], items["answer_nll"], items["paraphrase_nll"],
                                            items["perturbed_nll"], rouge)
            aggregates.update({f"{role}_{k}": v for k, v in summary.items()})
            per_item[role] = items
        aggregates["scored_utility"] = metrics.scored_utility(aggregates)
        if generate:
            aggregates["model_utility"] = metrics.model_utility(aggregates)
        if "holdout" in per_item:
            aggregates |= reference_free_signals(per_item["forget"], per_item["holdout"])
        if self.reference is not None:
            model_r, retain_r = np.asarray(per_item["forget"]["truth_ratio"]), self.reference.forget_truth_ratios
            aggregates["forget_quality"] = metrics.forget_quality(model_r, retain_r)
            # the same test on each author fold: a search that chooses on one fold is reported on the other
            for name, idx in zip(FOLD_KEYS, self.folds or ()):
                aggregates[name] = metrics.forget_quality(model_r[idx], np.asarray(retain_r)[idx])
            if "related" in per_item and self.reference.related_truth_ratios is not None:
                aggregates["related_forget_quality"] = metrics.forget_quality(
                    per_item["related"]["truth_ratio"], self.reference.related_truth_ratios)
        return EvalResult(aggregates, per_item, self.fidelity, (nll, mink))


def reference_free_signals(forget: Mapping[str, list], holdout: Mapping[str, list]) -> dict[str, float]:
    """What a deployer without a retain model can measure: the holdout KS p-value, and membership-inference AUCs
    between forget (members) and holdout (non-members) items, with their closeness to chance, 1 - 2|AUC - 0.5|
    (1: indistinguishable; what a reference-free search maximises): the loss attack (score -NLL) and Min-K%++
    (metrics.min_k_plus_plus at k = MIN_K) where the scores were computed."""
    out = {"holdout_ks": metrics.holdout_ks(forget["truth_ratio"], holdout["truth_ratio"])}
    attacks = {"loss": (-np.asarray(forget["answer_nll"]), -np.asarray(holdout["answer_nll"]))}
    if "min_k_pp" in forget and "min_k_pp" in holdout:
        attacks["min_k_pp"] = (np.asarray(forget["min_k_pp"]), np.asarray(holdout["min_k_pp"]))
    for attack, (members, nonmembers) in attacks.items():
        auc = metrics.mia_auc(members, nonmembers)
        out |= {f"mia_{attack}_auc": auc, f"mia_{attack}_closeness": 1.0 - 2.0 * abs(auc - 0.5)}
    return out


def _folds(forget: Sequence[TofuRecord]) -> tuple[list[int], list[int]] | None:
    """The forget split's author folds (data.records.author_folds); None when it holds a single author."""
    from uipe.data.records import author_folds

    try:
        return author_folds(forget)
    except UipeError:
        return None


class eval_mode:  # noqa: N801 - used as a context manager
    """model.eval() for the block, then the caller's train/eval mode back (a search trial may be training)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
