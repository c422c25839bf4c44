"""Prepare's quality gate for a benchmark's two reference models (target and retain; MUSE: target and retrained).

Every forget quality of a benchmark is measured against the retain model, so a reference model that half-learned a
split silently changes the benchmark. The gate checks what the protocol relies on:

- greedy ROUGE-L recall (TOFU's metric) on every split the model was trained on, each at least `prepare.min_rouge`:
  retain, real authors and world facts (the rules related knowledge is inferred by), and for the target also the
  forget and related splits; for MUSE's raw text, the continuation of each sampled passage's first third (`probe`);
- (TOFU) the two models' model utility within `prepare.max_utility_gap` (relative to the retain model's): TOFU's
  target and retain models differ only in the forget data, so their utilities must agree.

The measuring runs where the model is (rank 0 of the training job, on its device); the checks are pure functions the
driver applies, so a reused folder is checked by the same code as a freshly trained one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from uipe.config import EvalConfig
    from uipe.data import TofuRecord


def gate_sample(parts: Mapping[str, Sequence[TofuRecord]], items: int, seed: int) -> dict[str, tuple[TofuRecord, ...]]:
    """Up to `items` questions of each training split, drawn deterministically (the same on every machine)."""
    out = {}
    for name, records in parts.items():
        pick = random.Random(f"{seed}:{name}")  # a seed per split: adding a split does not change the others
        out[name] = tuple(pick.sample(list(records), min(items, len(records))))
    return out


def probe(tokenizer: PreTrainedTokenizerBase, record: Any, template: str, budget: int) -> tuple[list[int], str]:
    """What the gate asks of one trained record: (prompt ids, the reference its greedy continuation is scored
    against). A QA record: its prompt and answer (TOFU). A raw text (MUSE, arXiv 2407.06460, as its VerbMem asks):
    [BOS] + its first third of tokens, and the next `budget` tokens (the generation budget) decoded, so a passage
    longer than the budget can still be recalled in full."""
    from uipe.prompts import prompt_token_ids, text_ids, with_bos

    if not isinstance(record, str):
        return prompt_token_ids(tokenizer, record.question, template), record.answer
    ids = text_ids(tokenizer, record)
    cut = max(1, len(ids) // 3)
    return with_bos(tokenizer, ids[:cut]), tokenizer.decode(ids[cut:cut + budget])


def split_rouge(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                splits: Mapping[str, Sequence[TofuRecord]], template: str, batch_size: int,
                max_new_tokens: int) -> dict[str, float]:
    """Mean greedy ROUGE-L recall per split; every split's prompts generated in one batched pass."""
    from uipe.eval.scoring import greedy_generate, rouge_l_recall

    flat = [(name, r) for name, records in splits.items() for r in records]
    probes = [probe(tokenizer, r, template, max_new_tokens) for _, r in flat]
    texts = greedy_generate(model, tokenizer, [p for p, _ in probes], batch_size, max_new_tokens)
    recall = rouge_l_recall([ref for _, ref in probes], texts)
    out: dict[str, list[float]] = {}
    for (name, _), value in zip(flat, recall, strict=True):
        out.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in out.items()}


def model_utility(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  eval_splits: Mapping[str, Sequence[TofuRecord]], forget_split: str, template: str,
                  eval_cfg: EvalConfig, max_length: int) -> float:
    """TOFU's model utility on the evaluation splits, as every later stage measures it."""
    from uipe.eval.evaluate import Evaluator

    evaluator = Evaluator(eval_splits, tokenizer, forget_split, template, eval_cfg, max_length)
    return float(evaluator.evaluate(model).aggregates["model_utility"])


def rouge_failure(role: str, rouge: Mapping[str, float], min_rouge: float, counts: Mapping[str, int]) -> str | None:
    """One line naming the worst split below `min_rouge`, or None when every split passes."""
    below = {name: value for name, value in rouge.items() if value < min_rouge}
    if not below:
        return None
    name = min(below, key=below.__getitem__)
    others = f" (also {', '.join(sorted(set(below) - {name}))})" if len(below) > 1 else ""
    return (f"prepare {role}: greedy ROUGE-L recall {below[name]:.3f} on {name} ({counts.get(name, '?')} questions) "
            f"< prepare.min_rouge {min_rouge}{others}; train longer (prepare.epochs) or check prepare.lr")


def utility_gap(target: float, retain: float) -> float:
    """|MU_target - MU_retain| / MU_retain: how far the target's utility is from the retain model's."""
    return abs(target - retain) / retain if retain > 0 else float("inf")


def utility_failure(target: float, retain: float, max_gap: float | None) -> str | None:
    if max_gap is None or utility_gap(target, retain) <= max_gap:
        return None
    return (f"prepare: model utility of the target {target:.3f} and of the retain model {retain:.3f} differ by "
            f"{utility_gap(target, retain):.1%} > prepare.max_utility_gap {max_gap:.0%}; one of them is under-trained "
            "(train longer: prepare.epochs)")


def gate_figures(meta: Mapping[str, Any]) -> tuple[dict[str, float], float | None]:
    """(per-split ROUGE-L, model utility) as a model folder's uipe_meta.json records them."""
    return dict(meta.get("gate_rouge_l", {})), meta.get("model_utility")


def summary_line(models: Mapping[str, Mapping[str, Any]]) -> str:
    """One line for the console: each model's worst split and its utility, and the gap between them. A role prepare
    did not return has no model: the retain model with prepare.retain false (a run with a reference-free objective)."""
    parts = []
    for role in ("target", "retain"):
        rouge, mu = gate_figures(models.get(role, {}))
        if role not in models:
            parts.append("retain: no retain model (prepare.retain: false)" if role == "retain" else f"{role}: none")
        elif rouge:
            worst = min(rouge, key=rouge.__getitem__)
            parts.append(f"{role}: ROUGE-L >= {rouge[worst]:.2f} on {len(rouge)} splits (lowest {worst}), "
                         f"utility {mu:.3f}" if mu is not None else f"{role}: ROUGE-L >= {rouge[worst]:.2f}")
        else:
            parts.append(f"{role}: given, not gated")
    mu = [gate_figures(models.get(r, {}))[1] for r in ("target", "retain")]
    if None not in mu:
        parts.append(f"utility gap {utility_gap(mu[0], mu[1]):.1%}")
    return "prepare gate passed: " + "; ".join(parts)
