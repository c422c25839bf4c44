"""TOFU's metrics as pure functions on numbers (no model, no torch).

Every input is a per-item answer NLL: L(a) = mean token negative log-likelihood of answer a given the prompt
(sum over answer tokens / number of answer tokens), so exp(-L) is TOFU's length-normalised probability.
The formulas follow locuslab/tofu aggregate_eval_stat.py (get_model_utility, get_forget_quality).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from scipy.stats import hmean, ks_2samp

from uipe.errors import UipeError

SplitKind = Literal["forget", "retain", "factual"]

# The nine numbers TOFU's model utility is the harmonic mean of: {prob, ROUGE-L, truth ratio} x {retain, real
# authors, world facts}. Forget-split numbers are never part of it.
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("prob", "rougeL", "truth_ratio")
UTILITY_KEYS = tuple(f"{s}_{m}" for s in UTILITY_SPLITS for m in UTILITY_METRICS)


def _vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise UipeError(f"{name}: expected a non-empty list of numbers, got shape {arr.shape}")
    return arr


def mean_perturbed_nll(perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per item, the mean over its perturbed answers of L(pert_j).

    TOFU averages the *losses* (average_perturb_loss.mean(axis=-1)), i.e. the geometric mean of the
    perturbed probabilities, not their arithmetic mean. Items may have different numbers of perturbations.
    """
    if len(perturbed_nll) == 0:
        raise UipeError("perturbed_nll: expected at least one item")
    out = np.empty(len(perturbed_nll), dtype=np.float64)
    for i, row in enumerate(perturbed_nll):
        if len(row) == 0:
            raise UipeError(f"perturbed_nll[{i}]: item has no perturbed answers")
        out[i] = float(np.mean(np.asarray(row, dtype=np.float64)))
    return out


def mean_probability(answer_nll: Sequence[float] | np.ndarray) -> float:
    """Forget/retain 'Prob.': mean over items of exp(-L(answer))."""
    return float(np.mean(np.exp(-_vector(answer_nll, "answer_nll"))))


def normalized_probability(answer_nll: Sequence[float] | np.ndarray,
                           perturbed_nll: Sequence[Sequence[float]]) -> float:
    """Real authors / world facts 'Prob.': mean of p_true / (p_true + sum_j p_pert_j), p = exp(-L).

    Computed as 1 / (1 + sum_j exp(L_true - L_pert_j)), the same number without underflow of exp(-L) to 0/0.
    """
    true = _vector(answer_nll, "answer_nll")
    if len(perturbed_nll) != true.size:
        raise UipeError(f"perturbed_nll: {len(perturbed_nll)} items, answer_nll has {true.size}")
    ratios = [1.0 / (1.0 + float(np.sum(np.exp(t - np.asarray(row, dtype=np.float64)))))
              for t, row in zip(true, perturbed_nll, strict=True)]
    return float(np.mean(ratios))


def truth_ratios(paraphrase_nll: Sequence[float] | np.ndarray,
                 perturbed_nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-item truth ratio R = exp(-mean_j L(pert_j)) / exp(-L(para)) = exp(L(para) - mean_j L(pert_j)).

    This is the value TOFU logs as `truth_ratio`; its aggregate script uses 1/R (exp(pert - para)) and
    reports max(0, 1 - 1/(1/R)), the same numbers. R < 1: the model prefers the paraphrased true answer.
    """
    para = _vector(paraphrase_nll, "paraphrase_nll")
    pert = mean_perturbed_nll(perturbed_nll)
    if pert.size != para.size:
        raise UipeError(f"perturbed_nll: {pert.size} items, paraphrase_nll has {para.size}")
    return np.exp(para - pert)


def forget_truth_ratio(ratios: Sequence[float] | np.ndarray) -> float:
    """Forget split: mean of min(R, 1/R) (1 = indifferent between true and false answers)."""
    r = _vector(ratios, "truth_ratios")
    return float(np.mean(np.minimum(r, 1.0 / r)))


def utility_truth_ratio(ratios: Sequence[float] | np.ndarray) -> float:
    """Retain / real authors / world facts: mean of max(0, 1 - R) (1 = always prefers the truth)."""
    r = _vector(ratios, "truth_ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def mean_rouge(recalls: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(_vector(recalls, "rougeL_recall")))


def forget_quality(model_ratios: Sequence[float] | np.ndarray, retain_ratios: Sequence[float] | np.ndarray) -> float:
    """KS-test p-value between the model's and the retain model's per-item truth ratios on the forget split.

    Both sides must use the raw per-item R (TOFU's get_forget_quality feeds raw ratios, not min(R, 1/R)).
    The KS statistic only depends on ranks, so R and TOFU's 1/R give the same p-value.
    """
    a = _vector(model_ratios, "model truth ratios")
    b = _vector(retain_ratios, "retain truth ratios")
    return float(ks_2samp(a, b).pvalue)


def holdout_ks(forget_ratios: Sequence[float] | np.ndarray, holdout_ratios: Sequence[float] | np.ndarray) -> float:
    """Reference-free forgetting: the KS-test p-value between the model's own raw truth ratios on the forget items
    and on holdout items (same kind of facts, never trained). A model that never learned the forget facts treats
    them as never-seen facts, so the two samples match (p near 1); one that still knows them does not (p near 0).
    Forget quality's test (TOFU, arXiv 2401.06121) with the holdout split in the retain model's place, in the spirit
    of open-unlearning's reference-free MIA comparisons against holdout data."""
    return float(ks_2samp(_vector(forget_ratios, "forget truth ratios"),
                          _vector(holdout_ratios, "holdout truth ratios")).pvalue)


def mia_auc(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of a membership-inference attack that calls an item a member when its score is higher: the
    probability that a random member (forget item) outscores a random non-member (holdout item), ties counting half
    (Mann-Whitney U / (n_m n_n)). 0.5: the attack cannot tell them apart. The loss attack's score is -NLL
    (Yeom et al. 2018; open-unlearning's mia_loss)."""
    m, n = _vector(member_scores, "member scores"), _vector(nonmember_scores, "non-member scores")
    greater = (m[:, None] > n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()
    return float(greater / (m.size * n.size))


def min_k_plus_plus(token_z: Sequence[float] | np.ndarray, k: float) -> float:
    """Min-K%++ membership score of one answer (Zhang et al. 2024, arXiv 2404.02936; open-unlearning's
    mia_min_k_plus_plus): the mean of the lowest fraction k of its tokens' z-scores (scoring.min_k_token_z), at
    least one token. Higher: more likely a training member."""
    z = np.sort(_vector(token_z, "token z-scores"))
    return float(np.mean(z[: max(1, int(len(z) * k))]))


def relative_to_start(aggregates: Mapping[str, float], start: Mapping[str, float]) -> dict[str, float]:
    """Forgetting measured against theta_ini's own numbers (no retain model needed):
    - forget_prob_rel, forget_rougeL_rel: the model's forget probability / ROUGE-L over theta_ini's (1: unchanged);
    - privleak_<attack>: MUSE's PrivLeak (Shi et al. 2024, arXiv 2407.06460), (AUC - AUC_ref) / AUC_ref x 100, with
      theta_ini in the retrained model's place: 0 is theta_ini's leak, (0.5 - AUC_ini) / AUC_ini x 100 is chance.
    Keys whose inputs are missing (or zero at theta_ini) are left out."""
    out = {}
    pairs = {"forget_prob_rel": "forget_prob", "forget_rougeL_rel": "forget_rougeL"}
    pairs |= {f"privleak_{a}": f"mia_{a}_auc" for a in ("loss", "min_k_pp")}
    for name, key in pairs.items():
        if key not in aggregates or not start.get(key):
            continue
        ratio = aggregates[key] / start[key]
        out[name] = 100.0 * (ratio - 1.0) if name.startswith("privleak") else ratio
    return out


def model_utility(components: Mapping[str, float]) -> float:
    """Harmonic mean of the nine utility numbers; 0 if any of them is 0 (the hmean limit, as scipy gives)."""
    missing = [k for k in UTILITY_KEYS if k not in components]
    if missing:
        raise UipeError(f"model utility: missing component(s) {', '.join(missing)}")
    values = np.array([components[k] for k in UTILITY_KEYS], dtype=np.float64)
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise UipeError(f"model utility: components must be finite and >= 0, got {values.tolist()}")
    if np.any(values == 0):
        return 0.0
    return float(hmean(values))


def scored_utility(components: Mapping[str, float]) -> float:
    """Harmonic mean of the six model-utility numbers a scoring pass gives (probability and truth ratio of each
    utility split; no ROUGE-L): what a screening trial, which generates nothing, knows of model utility. It ranks
    screened points against fully evaluated ones and is never reported as model utility."""
    values = np.array([components[k] for k in UTILITY_KEYS if not k.endswith("_rougeL")], dtype=np.float64)
    if np.any(values <= 0):
        return 0.0
    return float(hmean(values))


def split_summary(kind: SplitKind, answer_nll: Sequence[float], paraphrase_nll: Sequence[float],
                  perturbed_nll: Sequence[Sequence[float]], rouge: Sequence[float] | None) -> dict[str, float]:
    """One split's prob / rougeL / truth_ratio, as TOFU reports them for that kind of split.

    kind: "forget" (forget-like: prob = mean exp(-L), truth ratio = mean min(R, 1/R)), "retain" (prob = mean
    exp(-L), truth ratio = mean max(0, 1-R)), "factual" (real authors / world facts: normalised prob).
    """
    ratios = truth_ratios(paraphrase_nll, perturbed_nll)
    if kind == "factual":
        prob = normalized_probability(answer_nll, perturbed_nll)
    else:
        prob = mean_probability(answer_nll)
    tr = forget_truth_ratio(ratios) if kind == "forget" else utility_truth_ratio(ratios)
    out = {"prob": prob, "truth_ratio": tr}
    if rouge is not None:
        out["rougeL"] = mean_rouge(rouge)
    return out
