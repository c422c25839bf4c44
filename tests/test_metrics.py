"""TOFU's metric formulas against numbers worked by hand (NLLs chosen as logs of simple fractions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uipe.errors import UipeError
from uipe.eval import metrics

LN2, LN4, LN8, LN16 = (math.log(x) for x in (2, 4, 8, 16))


def test_mean_probability():
    # exp(-ln2) = 1/2, exp(-ln4) = 1/4 -> mean 3/8
    assert metrics.mean_probability([LN2, LN4]) == pytest.approx(0.375, abs=1e-12)


def test_normalized_probability_sums_perturbed_probs_and_allows_ragged_items():
    # item 1: p_true 1/2, perturbed 1/4 + 1/4 -> 0.5 / (0.5 + 0.5) = 0.5
    # item 2: p_true 1 (L=0), one perturbed 1/4 -> 1 / 1.25 = 0.8;  mean = 0.65
    got = metrics.normalized_probability([LN2, 0.0], [[LN4, LN4], [LN4]])
    assert got == pytest.approx(0.65, abs=1e-12)


def test_normalized_probability_survives_huge_nll():
    # exp(-800) underflows to 0: the naive p_true/(p_true+sum) would be 0/0; the true value is
    # 1 / (1 + exp(800 - 801)) = 1 / (1 + e^-1) = 0.7310585786...
    assert metrics.normalized_probability([800.0], [[801.0]]) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)


def test_truth_ratio_averages_losses_not_probabilities():
    # item 1: p_para = 1/2; perturbed losses ln4, ln16 -> mean ln8 -> geometric-mean prob 1/8 -> R = (1/8)/(1/2) = 0.25
    #   (averaging probabilities instead would give ((1/4 + 1/16)/2) / (1/2) = 0.3125: TOFU averages the losses)
    # item 2: p_para = 1/8, perturbed 1/2 -> R = 4
    r = metrics.truth_ratios([LN2, LN8], [[LN4, LN16], [LN2]])
    np.testing.assert_allclose(r, [0.25, 4.0], rtol=1e-12)
    # forget split: mean min(R, 1/R) = mean(0.25, 0.25) = 0.25
    assert metrics.forget_truth_ratio(r) == pytest.approx(0.25, abs=1e-12)
    # retain / factual: mean max(0, 1 - R) = mean(0.75, 0) = 0.375
    assert metrics.utility_truth_ratio(r) == pytest.approx(0.375, abs=1e-12)


def test_forget_quality_ks_exact_small_samples():
    # n = m = 2, X = {1, 2} entirely below Y = {3, 4}: D = 1. Under H0 each of C(4,2) = 6 orderings is equally
    # likely; D = 1 only for XXYY and YYXX -> p = 2/6 = 1/3.
    assert metrics.forget_quality([1.0, 2.0], [3.0, 4.0]) == pytest.approx(1 / 3, abs=1e-12)
    # n = m = 3, X = {1, 2, 3}, Y = {1.5, 4, 5}: merged order x y x x y y; |F_X - F_Y| peaks at 2/3 (after 3).
    # p = P(D >= 2/3) = 1 - P(walk of 3 up/3 down steps stays within +-1) = 1 - 2^3/C(6,3) = 1 - 8/20 = 0.6
    assert metrics.forget_quality([1.0, 2.0, 3.0], [1.5, 4.0, 5.0]) == pytest.approx(0.6, abs=1e-12)
    # identical samples -> D = 0 -> p = 1
    assert metrics.forget_quality([0.3, 0.7, 1.2], [0.3, 0.7, 1.2]) == pytest.approx(1.0)


def test_forget_quality_same_for_r_and_inverse_r():
    # TOFU's script feeds exp(pert - para) = 1/R; KS depends on ranks only, so the p-value is unchanged.
    a, b = np.array([0.2, 0.5, 0.9, 1.3]), np.array([0.8, 1.1, 1.6, 2.0, 0.7])
    assert metrics.forget_quality(a, b) == metrics.forget_quality(1 / a, 1 / b)


def _components(values: list[float]) -> dict[str, float]:
    return dict(zip(metrics.UTILITY_KEYS, values, strict=True))


def test_model_utility_harmonic_mean():
    # 9 / (1/1 + 1/0.5 + 1/0.25 + 6 * 1/1) = 9 / 13 = 0.692307...
    got = metrics.model_utility(_components([1.0, 0.5, 0.25, 1, 1, 1, 1, 1, 1]))
    assert got == pytest.approx(9 / 13, abs=1e-12)


def test_model_utility_zero_component_gives_zero():
    assert metrics.model_utility(_components([0.9, 0.0, 0.8, 1, 1, 1, 1, 1, 1])) == 0.0


def test_model_utility_missing_component_is_an_error():
    comps = _components([1.0] * 9)
    del comps["world_facts_rougeL"]
    with pytest.raises(UipeError, match="world_facts_rougeL"):
        metrics.model_utility(comps)


def test_split_summary_kinds():
    # Same numbers as above: answer NLLs ln2, 0; paraphrase NLLs ln2, ln8; perturbed [[ln4, ln16], [ln2]].
    ans, para, pert, rouge = [LN2, 0.0], [LN2, LN8], [[LN4, LN16], [LN2]], [1.0, 0.5]
    forget = metrics.split_summary("forget", ans, para, pert, rouge)
    # prob = mean(1/2, 1) = 0.75; truth ratio = 0.25 (see above); rougeL = 0.75
    assert forget == pytest.approx({"prob": 0.75, "truth_ratio": 0.25, "rougeL": 0.75})
    retain = metrics.split_summary("retain", ans, para, pert, None)
    assert retain == pytest.approx({"prob": 0.75, "truth_ratio": 0.375})
    # factual prob: item 1: 0.5 / (0.5 + 1/4 + 1/16) = 0.5 / 0.8125 = 0.615384...; item 2: 1 / (1 + 1/2) = 2/3
    factual = metrics.split_summary("factual", ans, para, pert, None)
    assert factual["prob"] == pytest.approx((0.5 / 0.8125 + 2 / 3) / 2, abs=1e-12)


def test_bad_inputs_name_the_thing():
    with pytest.raises(UipeError, match="answer_nll"):
        metrics.mean_probability([])
    with pytest.raises(UipeError, match=r"perturbed_nll\[1\]"):
        metrics.truth_ratios([0.1, 0.2], [[0.3], []])
    with pytest.raises(UipeError, match="perturbed_nll"):
        metrics.truth_ratios([0.1, 0.2], [[0.3]])


def test_mia_auc_by_hand():
    # members (forget) scores 3, 1; non-members (holdout) 2, 1. Pairs: (3>2) 1, (3>1) 1, (1<2) 0, (1=1) 0.5
    # -> 2.5 / 4 = 0.625. Perfectly separated -> 1; reversed -> 0; identical samples -> 0.5.
    assert metrics.mia_auc([3, 1], [2, 1]) == 0.625
    assert metrics.mia_auc([5, 6], [1, 2]) == 1.0 and metrics.mia_auc([1, 2], [5, 6]) == 0.0
    assert metrics.mia_auc([1, 2, 3], [1, 2, 3]) == 0.5


def test_reference_free_signals_by_hand():
    from uipe.eval.evaluate import reference_free_signals

    # loss attack: score = -NLL. forget NLL 0.1, 0.2 (well known) vs holdout NLL 2.0, 3.0 -> every member outscores
    # every non-member: AUC 1, closeness 1 - 2|1 - 0.5| = 0. Identical truth-ratio samples: KS p-value 1.
    forget = {"answer_nll": [0.1, 0.2], "truth_ratio": [0.5, 0.7]}
    holdout = {"answer_nll": [2.0, 3.0], "truth_ratio": [0.5, 0.7]}
    sig = reference_free_signals(forget, holdout)
    assert sig == {"holdout_ks": 1.0, "mia_loss_auc": 1.0, "mia_loss_closeness": 0.0}
    # with Min-K%++ scores: forget 0.5, -1.0 vs holdout 0.0, -2.0: pairs (0.5>0) (0.5>-2) (-1<0) (-1>-2) -> 3/4;
    # closeness 1 - 2 x 0.25 = 0.5
    sig = reference_free_signals({**forget, "min_k_pp": [0.5, -1.0]}, {**holdout, "min_k_pp": [0.0, -2.0]})
    assert (sig["mia_min_k_pp_auc"], sig["mia_min_k_pp_closeness"]) == (0.75, 0.5)
    # n = m = 3, disjoint samples: two-sided exact KS p-value 2 / C(6, 3) = 0.1, as forget quality's test
    assert metrics.holdout_ks([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_min_k_plus_plus_by_hand():
    import torch

    from uipe.eval.scoring import min_k_token_z

    # one position, vocabulary of 2 with p = (0.5, 0.5): log p = -ln 2 for both, mu = -ln 2, sigma = 0 -> z = 0
    # (sigma clamped). Vocabulary of 2 with logits (ln 3, 0): p = (3/4, 1/4), log p = (ln 3/4, ln 1/4);
    # mu = 3/4 ln(3/4) + 1/4 ln(1/4) = -0.562335; E[log p^2] = 3/4 (0.287682)^2 + 1/4 (1.386294)^2 = 0.542524;
    # sigma = sqrt(0.542524 - 0.316221) = 0.475713. Target 0: z = (-0.287682 + 0.562335) / 0.475713 = 0.577350
    # (= 1/sqrt(3)); target 1: z = (-1.386294 + 0.562335) / 0.475713 = -1.732051 (= -sqrt(3)).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [math.log(3), 0.0], [5.0, 1.0]]])
    z = min_k_token_z(logits, torch.tensor([[0, 0, 1, -100]]))[0]
    assert z[:3].tolist() == pytest.approx([0.0, 1 / math.sqrt(3), -math.sqrt(3)], abs=1e-5)
    assert z[3] == 0.0  # an ignored position
    # the lowest 40% of 5 token scores -> the lowest 2: mean(-2, -1) = -1.5; of 2 scores -> int(0.8) = 0 -> at least 1
    assert metrics.min_k_plus_plus([3, -1, 0, -2, 5], 0.4) == -1.5
    assert metrics.min_k_plus_plus([0.5, -0.5], 0.4) == -0.5


def test_forgetting_relative_to_theta_ini_by_hand():
    # forget prob 0.3 vs theta_ini's 0.6 -> 0.5; ROUGE-L 0.2 vs 0.8 -> 0.25; loss-attack AUC 0.6 vs theta_ini's 0.9:
    # MUSE's PrivLeak with theta_ini as the reference, (0.6 - 0.9) / 0.9 x 100 = -33.33; a key theta_ini lacks (or
    # has at 0) is left out
    rel = metrics.relative_to_start({"forget_prob": 0.3, "forget_rougeL": 0.2, "mia_loss_auc": 0.6,
                                     "mia_min_k_pp_auc": 0.7},
                                    {"forget_prob": 0.6, "forget_rougeL": 0.8, "mia_loss_auc": 0.9,
                                     "mia_min_k_pp_auc": 0.0})
    assert rel == pytest.approx({"forget_prob_rel": 0.5, "forget_rougeL_rel": 0.25, "privleak_loss": -100 / 3})
