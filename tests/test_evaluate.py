"""The Evaluator on the synthetic benchmark with small random-init Llama folders (real safetensors, real tokenizer)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from uipe.config import EvalConfig, TinyModelConfig
from uipe.errors import UipeError
from uipe.evaluation import evaluate_model, retain_reference
from uipe.eval import Evaluator, compute_reference, load_or_compute_reference, load_reference
from uipe.eval import reference as ref_mod
from uipe.eval.evaluate import SCORED_ONLY, eval_records
from uipe.eval.tofu_logs import tofu_report
from uipe.eval.tofu_logs import shipped_logs_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TINY = TinyModelConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256)
FAST = EvalConfig(batch_size=16, max_new_tokens=6, subset=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from uipe.data.synth import write_benchmark
    from uipe.models import load_model, load_tokenizer
    from uipe.tiny_model import build_tiny, corpus_from_data

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    data = write_benchmark(root / "data", authors=20, facts=8, seed=0)
    corpus = corpus_from_data(data)
    a, b = build_tiny(root / "model_a", corpus, TINY, seed=0), build_tiny(root / "model_b", corpus, TINY, seed=1)
    tok = load_tokenizer(a)
    return {"root": root, "data": str(data), "dir_a": a, "dir_b": b, "tok": tok,
            "a": load_model(a), "b": load_model(b)}


def _evaluator(world: dict, cfg: EvalConfig = FAST, template: str = "llama2") -> Evaluator:
    return Evaluator.from_source(world["data"], "forget05", world["tok"], template, cfg)


def test_each_distinct_pair_is_tokenised_once(world: dict):
    ev = _evaluator(world, EvalConfig(subset=None))
    pairs = {(r.question, a) for recs in ev.splits.values() for r in recs
             for a in (r.answer, r.paraphrased_answer or r.answer, *r.perturbed_answer)}
    assert len(ev._tables.pairs) == len(pairs)
    # every question is generated once, except the holdout split's: it is only scored (reference-free signals)
    assert "holdout" in ev.splits
    assert len(ev._tables.prompts) == len({r.question for role, recs in ev.splits.items() for r in recs
                                           if role not in SCORED_ONLY})
    plan = ev._plans["real_authors"]  # no paraphrase there: the answer plays it, scored once
    assert plan.answer == plan.para


def test_answer_nll_matches_an_unbatched_forward(world: dict):
    from uipe.prompts import encode_qa

    ev = _evaluator(world)
    res = ev.evaluate(world["a"], generate=False)
    rec = ev.splits["retain"][2]
    ids, labels = encode_qa(world["tok"], rec.question, rec.perturbed_answer[1])
    with torch.no_grad():
        logits = world["a"](torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != -100
    # mean over answer tokens of -log softmax(logits)[target], one sequence, no padding
    direct = torch.nn.functional.cross_entropy(logits[keep], target[keep]).item()
    assert res.per_item["retain"]["perturbed_nll"][2][1] == pytest.approx(direct, abs=1e-5)


def test_batch_size_does_not_change_scores_or_generations(world: dict):
    one = _evaluator(world, FAST.model_copy(update={"batch_size": 1})).evaluate(world["a"])
    many = _evaluator(world, FAST.model_copy(update={"batch_size": 16})).evaluate(world["a"])
    for role in one.per_item:
        np.testing.assert_allclose(one.per_item[role]["answer_nll"], many.per_item[role]["answer_nll"], atol=1e-5)
        # left padding + attention mask: padded prompts continue exactly as alone
        if role not in SCORED_ONLY:
            assert one.per_item[role]["generation"] == many.per_item[role]["generation"]


def test_evaluation_is_deterministic_and_restores_train_mode(world: dict):
    ev = _evaluator(world)
    world["a"].train()
    first = ev.evaluate(world["a"])
    assert world["a"].training
    world["a"].eval()
    second = ev.evaluate(world["a"])
    assert first.aggregates == second.aggregates
    assert first.per_item == second.per_item


def test_subset_is_the_first_items_and_reported_as_lower_fidelity(world: dict):
    sub = _evaluator(world, EvalConfig(subset=4, max_new_tokens=2)).evaluate(world["a"], generate=False)
    full = _evaluator(world, EvalConfig(subset=None, max_new_tokens=2)).evaluate(world["a"], generate=False)
    assert sub.fidelity == "subset:4" and full.fidelity == "full"
    for role in sub.per_item:
        assert len(sub.per_item[role]["answer_nll"]) == 4
        np.testing.assert_allclose(sub.per_item[role]["answer_nll"], full.per_item[role]["answer_nll"][:4], atol=1e-5)


def test_forget_quality_against_own_and_shifted_reference(world: dict):
    ev = _evaluator(world, FAST.model_copy(update={"subset": 8}))
    ref = compute_reference(ev, world["a"], "hash-a")
    ev.set_reference(ref)
    res = ev.evaluate(world["a"], generate=False)
    # the retain model against itself (up to batch-composition float noise, see the CLI test)
    assert res.aggregates["forget_quality"] == pytest.approx(1.0, abs=1e-12)
    assert res.aggregates["related_forget_quality"] == pytest.approx(1.0, abs=1e-12)
    r = np.asarray(res.per_item["forget"]["truth_ratio"])
    assert len(r) == 8 and r.max() < 100 * r.min()
    # Every reference ratio above every model ratio: D = 1 with n = m = 8; exact p = 2 / C(16, 8) = 2/12870.
    shifted = ref_mod.RetainReference("forget05", tuple((r * 100).tolist()), None, None, ev.data_hash, "test")
    ev.set_reference(shifted)
    fq = ev.evaluate(world["a"], generate=False).aggregates["forget_quality"]
    assert fq == pytest.approx(2 / math.comb(16, 8), rel=1e-9)


def test_full_reference_serves_a_subset_evaluation(world: dict):
    full_ev = _evaluator(world, EvalConfig(subset=None))
    sub_ev = _evaluator(world, EvalConfig(subset=3))
    assert sub_ev.data_hash == full_ev.data_hash  # the hash covers all items, whatever the subset
    ref = compute_reference(sub_ev, world["a"])  # always computed over every item
    assert len(ref.forget_truth_ratios) == full_ev.n_items("forget") == 8
    sub_ev.set_reference(ref)
    assert sub_ev.reference is not None and sub_ev.reference.forget_truth_ratios == ref.forget_truth_ratios[:3]
    short = ref_mod.RetainReference("forget05", ref.forget_truth_ratios[:2], None, None, None, "test")
    with pytest.raises(UipeError, match="set eval.subset=2"):
        sub_ev.set_reference(short)


def test_reference_errors_name_the_problem(world: dict, tmp_path: Path):
    ev = _evaluator(world)
    with pytest.raises(UipeError, match="uipe reference"):
        load_reference(tmp_path / "missing.json")
    tofu = load_reference(shipped_logs_dir("llama2-7b_retain90"))  # TOFU logs: 300 forget items -> forget10
    assert tofu.forget_split == "forget10" and len(tofu.forget_truth_ratios) == 300
    with pytest.raises(UipeError, match="made for forget10"):
        ev.set_reference(tofu)
    other = compute_reference(_evaluator(world, template="plain"), world["a"])
    with pytest.raises(UipeError, match="other evaluation data"):
        ev.set_reference(other)


def test_reference_cache_is_keyed_by_model(world: dict, tmp_path: Path):
    ev = _evaluator(world)
    path = tmp_path / "ref.json"
    first = load_or_compute_reference(path, ev, world["dir_a"])
    stamp = path.stat().st_mtime_ns
    again = load_or_compute_reference(path, ev, world["dir_a"])
    assert again == first and path.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert load_reference(path) == first  # JSON round trip
    other = load_or_compute_reference(path, ev, world["dir_b"])
    assert other.model_hash != first.model_hash and other.forget_truth_ratios != first.forget_truth_ratios


def test_cli_entry_points_write_metrics(world: dict, tmp_path: Path):
    ref_path, out = tmp_path / "retain_reference.json", tmp_path / "metrics.json"
    summary = retain_reference(world["dir_b"], world["data"], "forget05", ref_path, "llama2", FAST, "float32")
    assert summary["forget_items"] == 8 and ref_path.is_file()
    result = evaluate_model(world["dir_b"], world["data"], "forget05", ref_path, out, "llama2", FAST, "float32")
    written = json.loads(out.read_text())
    assert written["forget_quality"] == result["forget_quality"]
    # model b is its own retain model. Not exactly 1.0: the reference was scored over all 8 items and the subset
    # evaluation in other batches, so R differs in the last float bits; KS then sees D = 1/6, p = 1 - 2e-16.
    assert result["forget_quality"] == pytest.approx(1.0, abs=1e-12)
    assert written["model_utility"] == result["model_utility"]
    assert written["fidelity"] == "subset:6" and len(written["per_item"]["forget"]["answer_nll"]) == 6
    with pytest.raises(UipeError, match="retain reference not found"):
        evaluate_model(world["dir_b"], world["data"], "forget05", tmp_path / "nope.json", out, "llama2", FAST, "auto")
    report = tofu_report(shipped_logs_dir("llama2-7b_full"), shipped_logs_dir("llama2-7b_retain90"))
    assert {"forget_quality", "model_utility", "world_facts_truth_ratio"} <= set(report)


def test_eval_records_roles(world: dict):
    roles = eval_records(world["data"], "forget05")
    assert set(roles) == {"forget", "retain", "real_authors", "world_facts", "related", "holdout"}
    forget_authors = {r.author for r in roles["forget"]}
    assert {r.author for r in roles["related"]} <= forget_authors  # related facts of the forget authors only
    # as many never-trained authors as the forget split, none of them a forget author
    holdout_authors = {r.author for r in roles["holdout"]}
    assert len(holdout_authors) == len(forget_authors) and not holdout_authors & forget_authors


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_benchmark_separates_target_from_retain(prepared_run, tiny_cfg):
    """Issue 4's bar on the trained tiny world (forget05): target vs retain forget quality < 0.01, the retain model
    ~1.0 against its own reference, and the two models' utilities within 10% of each other."""
    from uipe.models import load_model, load_tokenizer

    assert tiny_cfg.data.forget_split == "forget05"
    ev = Evaluator.from_source(str(prepared_run.data), "forget05", load_tokenizer(prepared_run.retain_model),
                               tiny_cfg.model.prompt_template, tiny_cfg.eval, tiny_cfg.model.max_length)
    ev.set_reference(load_reference(prepared_run.retain_reference))
    target = ev.evaluate(load_model(prepared_run.target_model)).aggregates
    retain = ev.evaluate(load_model(prepared_run.retain_model)).aggregates
    assert target["forget_quality"] < 0.01
    assert retain["forget_quality"] == pytest.approx(1.0, abs=1e-9)
    assert abs(target["model_utility"] - retain["model_utility"]) < 0.1 * retain["model_utility"]
    # the target trained the forget facts: it finds their answers more probable than the retain model does
    assert target["forget_prob"] > retain["forget_prob"]


def test_forget_quality_on_each_author_fold(world: dict):
    # forget10 of 20 authors: 2 authors x 8 facts; the first author is the selection fold, the second the report fold
    full = FAST.model_copy(update={"subset": None})
    ev = Evaluator.from_source(world["data"], "forget10", world["tok"], "llama2", full)
    select, report = ev.folds
    assert len(select) == len(report) == 8 and not set(select) & set(report)
    ref = compute_reference(ev, world["a"], "hash-a")
    r = np.asarray(ref.forget_truth_ratios)
    r[report] *= 100  # the reference moves on the report fold only
    ev.set_reference(ref_mod.RetainReference("forget10", tuple(r.tolist()), None, None, ev.data_hash, "test"))
    agg = ev.evaluate(world["a"], generate=False).aggregates
    # selection fold: the model against itself, p = 1; report fold: every reference ratio above every model ratio,
    # D = 1 with n = m = 8, exact p = 2 / C(16, 8); the whole split lies between
    assert agg["forget_quality_select"] == pytest.approx(1.0, abs=1e-12)
    assert agg["forget_quality_report"] == pytest.approx(2 / math.comb(16, 8), rel=1e-9)
    assert agg["forget_quality_report"] < agg["forget_quality"] < agg["forget_quality_select"]


def test_min_k_plus_plus_scores_match_an_unbatched_forward(world: dict):
    from uipe.eval.evaluate import MIN_K
    from uipe.prompts import encode_qa

    ev = _evaluator(world)
    res = ev.evaluate(world["a"], generate=False)
    assert set(res.per_item) >= {"forget", "holdout"} and "min_k_pp" not in res.per_item["retain"]
    rec = ev.splits["holdout"][3]
    ids, labels = encode_qa(world["tok"], rec.question, rec.answer)
    with torch.no_grad():
        logp = torch.log_softmax(world["a"](torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    target = torch.tensor(labels[1:])
    keep = target != -100
    # Min-K%++ by its definition, in float64: per answer token (log p(x_t) - E_p[log p]) / sd_p[log p], then the
    # mean of the lowest 40%
    p = logp.exp()
    mu, var = (p * logp).sum(-1), (p * logp.square()).sum(-1) - (p * logp).sum(-1).square()
    z = ((logp.gather(-1, target.clamp_min(0)[:, None])[:, 0] - mu) / var.sqrt())[keep].sort().values
    direct = z[: max(1, int(len(z) * MIN_K))].mean().item()
    assert res.per_item["holdout"]["min_k_pp"][3] == pytest.approx(direct, abs=1e-4)
    assert 0.0 <= res.aggregates["mia_min_k_pp_auc"] <= 1.0 and "mia_min_k_pp_closeness" in res.aggregates


def test_a_screening_pass_scores_exactly_what_the_full_evaluation_scores(world: dict):
    # search.screening relies on it: a screened trial's forget quality, probabilities and truth ratios are the full
    # trial's, bit for bit; only ROUGE-L and model utility (which needs it) are missing
    ev = _evaluator(world)
    ev.set_reference(compute_reference(ev, world["b"], "hash-b"))
    screened = ev.evaluate(world["a"], generate=False)
    screen, full = screened.aggregates, ev.evaluate(world["a"]).aggregates
    # a full pass that starts from the screening pass's scores (the search's promoted trial) is the full evaluation
    assert ev.evaluate(world["a"], scores=screened.scores).aggregates == full
    assert set(full) - set(screen) == {"model_utility"} | {k for k in full if k.endswith("_rougeL")}
    assert {k: screen[k] for k in screen} == {k: full[k] for k in screen}
    assert screen["forget_quality"] == full["forget_quality"] and 0 < screen["scored_utility"] <= 1
