"""MUSE's metrics on numbers worked by hand (uipe.eval.muse): ROUGE-L F1, the in-context prompt, Min-K%, AUC with
ties, PrivLeak, and the chunking of raw text into training windows."""

from __future__ import annotations

import pytest

from uipe.data.muse import QAItem, join_passages
from uipe.errors import UipeError
from uipe.eval import muse
from uipe.prompts import chunk_token_ids


def test_rouge_l_f1_on_short_strings() -> None:
    # ref: the cat sat on the mat (6 tokens); gen: the cat on a mat (5). LCS = the cat on mat = 4.
    # P = 4/5, R = 4/6, F1 = 2·LCS/(6+5) = 8/11 (recall alone, TOFU's number, would be 2/3).
    assert muse.rouge_l_f1(["the cat sat on the mat"], ["the cat on a mat"]) == [pytest.approx(8 / 11)]
    # nothing in common, and an empty generation: 0
    assert muse.rouge_l_f1(["Lima", "Lima"], ["Oslo", ""]) == [0.0, 0.0]


def test_rouge_stems_as_open_unlearning_does() -> None:
    # with the Porter stemmer running -> run, dogs -> dog: identical (muse_bench, unstemmed, would give 0)
    assert muse.rouge_l_f1(["running dogs"], ["run dog"]) == [pytest.approx(1.0)]


def test_verbmem_is_the_mean_f1_of_continuations() -> None:
    gold = ["the cat sat on the mat", "a b c d"]
    gen = ["the cat on a mat", "a b x y"]  # 8/11, and LCS a b = 2 of 4+4 -> 2·2/8 = 1/2
    assert muse.verbmem(gold, gen) == pytest.approx((8 / 11 + 0.5) / 2)
    with pytest.raises(UipeError, match="2 references but 1 generations"):
        muse.verbmem(gold, gen[:1])


def test_the_in_context_prompt_is_exactly_muses() -> None:
    icl = [QAItem("Who wrote The Paper Door?", "Mara Quill"), QAItem("Where was Mara Quill born?", "Peru")]
    assert muse.knowmem_prompt("Which city did Mara Quill grow up in?", icl) == (
        "Question: Who wrote The Paper Door?\nAnswer: Mara Quill\n\n"
        "Question: Where was Mara Quill born?\nAnswer: Peru\n\n"
        "Question: Which city did Mara Quill grow up in?\nAnswer: "
    )
    assert muse.knowmem_prompt("Q?", []) == "Question: Q?\nAnswer: "


def test_knowmem_cuts_the_answer_at_the_next_question() -> None:
    assert muse.cut_at_stopwords(" Lima\n\nQuestion: Where ...") == "Lima"
    assert muse.cut_at_stopwords("Lima\nQuestion: x") == "Lima"
    assert muse.cut_at_stopwords("Lima, Peru Question: x\n\ny") == "Lima, Peru"
    # cut: "Lima" vs "Lima" = 1; uncut the F1 would be 2·1/(1+4) = 0.4. Second item: "a doctor" vs "doctor" = 2/3.
    gens = ["Lima\n\nQuestion: Where was", "doctor"]
    assert muse.knowmem(["Lima", "a doctor"], gens) == pytest.approx((1 + 2 / 3) / 2)


def test_min_k_percent_on_a_small_log_prob_list() -> None:
    lp = [-0.1, -2.0, -0.5, -3.0, -1.0]
    assert muse.min_k_percent(lp) == pytest.approx(2.5)  # k = 0.4: int(5·0.4) = 2 lowest, -3 and -2 -> 2.5
    assert muse.min_k_percent(lp, k=0.6) == pytest.approx(2.0)  # 3 lowest: -3, -2, -1
    assert muse.min_k_percent(lp, k=0.1) == pytest.approx(3.0)  # int(0.5) = 0 -> at least one token
    assert muse.min_k_percent(lp, k=1.0) == pytest.approx(6.6 / 5)
    with pytest.raises(UipeError, match="at least one scored token"):
        muse.min_k_percent([])
    with pytest.raises(UipeError, match="k must be in"):
        muse.min_k_percent(lp, k=0)


def test_auc_on_a_hand_made_table_with_ties() -> None:
    # Min-K% scores; AUC = P(forget > holdout) + 1/2 P(tie) over the 3 x 2 pairs:
    # (1,2) 0, (1,4) 0, (2,2) tie 1/2, (2,4) 0, (3,2) 1, (3,4) 0 -> 1.5 / 6
    forget, holdout = [1.0, 2.0, 3.0], [2.0, 4.0]
    assert muse.privleak_auc(forget, holdout) == pytest.approx(0.25)
    assert muse.privleak_auc(holdout, forget) == pytest.approx(0.75)
    assert muse.privleak_auc([5.0, 5.0], [5.0]) == pytest.approx(0.5)  # all tied
    # a memorised forget set has LOW Min-K% (likely tokens): AUC near 0 in MUSE's convention
    assert muse.privleak_auc([0.1, 0.2], [3.0, 4.0]) == 0.0


def test_privleak_is_the_relative_auc_gap_in_percent() -> None:
    assert muse.privleak(0.25, 0.5) == pytest.approx(-50.0)  # under-unlearned
    assert muse.privleak(0.75, 0.5) == pytest.approx(50.0)  # over-unlearned
    assert muse.privleak(0.4772, 0.4772) == 0.0
    # the published News reference: a chance-level model, (0.5 - 0.4772) / 0.4772 x 100
    assert muse.privleak(0.5, muse.PUBLISHED_RETRAINED_AUC["news"]) == pytest.approx(4.7779, abs=1e-4)
    with pytest.raises(UipeError, match="AUC is 0"):
        muse.privleak(0.3, 0.0)
    with pytest.raises(UipeError, match="must be in"):
        muse.privleak(1.5, 0.5)


def test_chunking_with_bos_rotates_the_last_window() -> None:
    ids = [10, 11, 12, 13, 14, 15, 16]
    # windows of 3 - 1 = 2 text ids, each led by BOS (1); the short last one [1, 16] is filled from [1, 10, 11]
    assert chunk_token_ids(ids, 3, bos_id=1) == [[1, 10, 11], [1, 12, 13], [1, 14, 15], [1, 16, 1]]
    assert chunk_token_ids(ids, 3, bos_id=None) == [[10, 11, 12], [13, 14, 15], [16, 10, 11]]
    assert chunk_token_ids(ids[:6], 3, bos_id=None) == [[10, 11, 12], [13, 14, 15]]  # exact: no fill
    # a corpus shorter than a window cycles until the window is full
    assert chunk_token_ids([10], 5, bos_id=1) == [[1, 10, 1, 10, 1]]


def test_chunking_refuses_what_it_cannot_cut() -> None:
    with pytest.raises(UipeError, match="no tokens"):
        chunk_token_ids([], 4, bos_id=1)
    with pytest.raises(UipeError, match="no room"):
        chunk_token_ids([1, 2], 1, bos_id=1)


def test_join_passages_is_muses_txt_form() -> None:
    assert join_passages(["A b.", "C d."]) == "A b.\n\nC d."
