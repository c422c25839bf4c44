"""MUSE's metrics as pure functions on strings, numbers and token ids (no model, no tokenizer).

Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", arXiv 2407.06460; criteria C1
(no verbatim memorisation: VerbMem), C2 (no knowledge memorisation: KnowMem on the forget set), C3 (no privacy
leakage: PrivLeak) and C4 (utility preservation: KnowMem on the retain set). Each formula follows the benchmark's
own code (github.com/swj0419/muse_bench: metrics/{verbmem,knowmem,privleak}.py, eval.py, constants.py) and, where
the two differ, mostly open-unlearning's reproduction (github.com/locuslab/open-unlearning: src/evals/metrics/
{utils,privacy}.py, src/evals/metrics/mia/{min_k,utils}.py), which is the evaluator uipe's numbers are compared to
(scripts/parity_muse.py). One exception: Min-K% scores every token of a text after the first, as muse_bench's
compute_ppl does; open-unlearning's tokenwise_logprobs drops each text's last token, so its Min-K% scores, AUCs
and PrivLeak differ from uipe's (and MUSE's) by a few percent (docs/BENCHMARKS.md, "MUSE parity").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uipe.data.muse import QAItem, qa_shots
from uipe.errors import UipeError
from uipe.eval import metrics, scoring

# MUSE's defaults (muse_bench eval.py; open-unlearning configs/eval/muse_metrics/*.yaml).
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOPWORDS = ("\n\n", "\nQuestion", "Question:")
MIN_K = 0.4  # PrivLeak's attack: Min-40% (muse_bench's privleak_auc_key "forget_holdout_Min-40%")
# The retrained models' AUC of that attack on forget vs holdout (muse_bench constants.py AUC_RETRAIN,
# "forget_holdout_Min-40%"): PrivLeak's reference when no retrained model of one's own is at hand.
PUBLISHED_RETRAINED_AUC = {"news": 0.4772, "books": 0.5393}


def rouge_l_f1(references: Sequence[str], generations: Sequence[str]) -> list[float]:
    """Per item, ROUGE-L F1 of the generation against the reference: RougeScorer(['rougeL'], use_stemmer=True)
    .score(reference, generation).fmeasure, the scorer TOFU's ROUGE-L recall uses (scoring.rouge_scorer).

    open-unlearning's MUSE ROUGE (rougeL_f1) stems; muse_bench's RougeEvalLogger does not (use_stemmer=False), so
    the two differ where a word and its stem differ ("dogs" / "dog"). uipe takes open-unlearning's, its parity
    target."""
    if len(references) != len(generations):
        raise UipeError(f"rouge: {len(references)} references but {len(generations)} generations")
    scorer = scoring.rouge_scorer()
    return [float(scorer.score(ref, gen)["rougeL"].fmeasure) for ref, gen in zip(references, generations, strict=True)]


def verbmem(gold: Sequence[str], generations: Sequence[str]) -> float:
    """C1 VerbMem: mean ROUGE-L F1 of each verbmem prompt's greedy continuation (up to VERBMEM_MAX_NEW_TOKENS)
    against its gold continuation, in [0, 1] (muse_bench reports x 100). muse_bench cuts the gold text to its
    first VERBMEM_MAX_NEW_TOKENS tokens before scoring; that cut needs the tokenizer and is the caller's."""
    return _mean(rouge_l_f1(gold, generations), "verbmem")


def knowmem_prompt(question: str, icl: Sequence[QAItem]) -> str:
    """C2/C4's prompt, exactly as muse_bench's knowmem.py builds it (and open-unlearning's template for base
    Llama-2: "Question: " / "\\n" / "Answer: " / "\\n\\n"): each in-context example, then the question.

    Question: {icl question}\\nAnswer: {icl answer}\\n\\n ... Question: {question}\\nAnswer: """
    return f"{qa_shots(icl)}Question: {question}\nAnswer: "


def cut_at_stopwords(text: str, stopwords: Sequence[str] = KNOWMEM_STOPWORDS) -> str:
    """The answer part of a knowmem generation: the text before the first stopword (the model starting the next
    "Question:") (muse_bench's get_prefix_before_words_occur), then stripped as open-unlearning does (muse_bench
    does not strip; ROUGE-L's tokenizer ignores the surrounding whitespace either way)."""
    for word in stopwords:
        text = text.split(word)[0]
    return text.strip()


def knowmem(answers: Sequence[str], generations: Sequence[str]) -> float:
    """C2 (forget questions) / C4 (retain questions) KnowMem: mean ROUGE-L F1 of each greedy answer (up to
    KNOWMEM_MAX_NEW_TOKENS, to the knowmem_prompt), cut at the stopwords, against the gold answer, in [0, 1]."""
    return _mean(rouge_l_f1(answers, [cut_at_stopwords(g) for g in generations]), "knowmem")


def min_k_percent(token_logprobs: Sequence[float] | np.ndarray, k: float = MIN_K) -> float:
    """Min-K% Prob membership score of one text (Shi et al. 2023, arXiv 2310.16789; MUSE's PrivLeak attack):
    minus the mean of the lowest fraction k of its tokens' log-probabilities log p(x_t | x_<t), so LOWER means
    more likely a training member. int(n·k) tokens as muse_bench, at least one as open-unlearning (muse_bench
    gives NaN for a text under 1/k tokens). Which tokens count (all after the first, in muse_bench) is the
    caller's choice."""
    if not 0 < k <= 1:
        raise UipeError(f"min-k: k must be in (0, 1], got {k}")
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))
    if lp.ndim != 1 or lp.size == 0:
        raise UipeError("min-k: a text needs at least one scored token")
    return float(-np.mean(lp[: max(1, int(lp.size * k))]))


def privleak_auc(forget_scores: Sequence[float] | np.ndarray, holdout_scores: Sequence[float] | np.ndarray) -> float:
    """C3's AUC in MUSE's convention: holdout texts are the attack's "members", forget texts its "non-members",
    and a text is called a member when its Min-K% score is lower (muse_bench privleak.py: roc_curve(y, -score),
    key forget_holdout_*). So AUC = P(score_forget > score_holdout), ties counting half (the trapezoidal ROC
    area sklearn computes). A model that never saw either set: about 0.5; one that memorised the forget set: near
    0. open-unlearning computes 1 - this and its privleak flips it back, the same number."""
    return metrics.mia_auc(forget_scores, holdout_scores)


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """C3 PrivLeak, in percent: (AUC_unlearned - AUC_retrained) / AUC_retrained x 100 (MUSE's definition;
    muse_bench eval.py). 0: leaks like the retrained model; negative: under-unlearned (the target model is near
    -100); positive: over-unlearned, the forget set now looks *less* familiar than unseen text."""
    for name, value in (("unlearned", auc_unlearned), ("retrained", auc_retrained)):
        if not 0 <= value <= 1:  # NaN fails this too
            raise UipeError(f"privleak: the {name} model's AUC must be in [0, 1], got {value}")
    if auc_retrained == 0:
        raise UipeError("privleak: the retrained model's AUC is 0, so the relative difference is undefined")
    return (auc_unlearned - auc_retrained) / auc_retrained * 100.0


def _mean(values: list[float], name: str) -> float:
    if not values:
        raise UipeError(f"{name}: no items to score")
    return float(np.mean(values))
