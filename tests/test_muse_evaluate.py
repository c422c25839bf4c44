"""MUSE's evaluator and benchmark on the embedded MUSE world with a small random-init Llama (real safetensors, a real
locally trained tokenizer): every number checked against a computation done here, one item at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from uipe import metrics
from uipe.config import EvalConfig, TinyModelConfig, load_config
from uipe.data.muse import MuseData, QAItem, VerbMemItem, load_muse
from uipe.data.synth_muse import write_muse_benchmark
from uipe.benchmarks.muse import MUSE  # registers its catalogue entries
from uipe.errors import UipeError
from uipe.eval import muse
from uipe.eval.muse_evaluate import MuseEvaluator, load_reference_auc
from uipe.models import load_model, load_tokenizer
from uipe.tiny_model import build_tiny

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TINY = TinyModelConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256)
CFG = EvalConfig(batch_size=8)


def _corpus(data: MuseData) -> list[str]:
    """The tokenizer's training text: the target model's corpus and each knowmem question with its answer."""
    qa = [q for split in data.knowmem.values() for q in split]
    return [*data.training_texts("target"), *(muse.knowmem_prompt(q.question, ()) + q.answer for q in qa)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("muse_eval")
    data = load_muse(write_muse_benchmark(root / "data", authors=20, facts=4, seed=0))
    model_dir = build_tiny(root / "model", _corpus(data), TINY, seed=0)
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    ev = MuseEvaluator(data, tok, CFG)
    return {"source": data.root, "data": data, "tok": tok, "model": model, "ev": ev, "full": ev.evaluate(model),
            "model_dir": model_dir}


def _ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


def _generate(world: dict, text: str, max_new_tokens: int) -> str:
    tok = world["tok"]
    ids = torch.tensor([_ids(tok, text)])
    with torch.no_grad():
        out = world["model"].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_min_k_of_a_text_matches_an_unbatched_forward(world: dict):
    text = world["data"].privleak["holdout"][1]
    ids = _ids(world["tok"], text)
    with torch.no_grad():
        logp = torch.log_softmax(world["model"](torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    # muse_bench's compute_ppl: log p of every token after the first (BOS), then Min-40%
    token_logprobs = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).numpy()
    want = muse.min_k_percent(token_logprobs, 0.4)
    assert world["full"].per_item["privleak_holdout"]["min_k"][1] == pytest.approx(want, abs=1e-5)


def test_greedy_continuations_match_model_generate_one_prompt_at_a_time(world: dict):
    full, data = world["full"], world["data"]
    verbmem = _generate(world, data.verbmem[0].prompt, muse.VERBMEM_MAX_NEW_TOKENS)
    assert full.per_item["verbmem"]["generation"][0] == verbmem.strip()
    question = data.knowmem["retain_qa"][2].question
    raw = _generate(world, muse.knowmem_prompt(question, data.knowmem["retain_qa_icl"]), muse.KNOWMEM_MAX_NEW_TOKENS)
    assert full.per_item["knowmem_retain"]["generation"][2] == raw  # unstripped: MUSE cuts before it strips
    assert full.per_item["knowmem_retain"]["prediction"][2] == muse.cut_at_stopwords(raw)


def test_aggregates_are_muse_formulas_of_the_per_item_values(world: dict):
    full, data, tok = world["full"], world["data"], world["tok"]
    items = full.per_item
    budget = muse.VERBMEM_MAX_NEW_TOKENS  # muse_bench cuts the gold continuation to the generation's budget
    gold = [tok.decode(tok(v.gt)["input_ids"][:budget], skip_special_tokens=True) for v in data.verbmem]
    assert items["verbmem"]["gold"] == gold
    assert full.aggregates["verbmem_rougeL"] == pytest.approx(muse.verbmem(gold, items["verbmem"]["generation"]))
    for role, split in (("knowmem_forget", "forget_qa"), ("knowmem_retain", "retain_qa")):
        answers = [q.answer for q in data.knowmem[split]]
        assert full.aggregates[f"{role}_rougeL"] == pytest.approx(muse.knowmem(answers, items[role]["generation"]))
        assert full.aggregates[f"{role}_prob"] == pytest.approx(np.mean(np.exp(-np.array(items[role]["answer_nll"]))))
    auc = muse.privleak_auc(items["privleak_forget"]["min_k"], items["privleak_holdout"]["min_k"])
    assert full.aggregates["min_k_auc"] == auc and "privleak" not in full.aggregates  # no reference given
    assert {role: len(v["min_k"]) for role, v in items.items() if "min_k" in v} == {
        "privleak_forget": len(data.privleak["forget"]), "privleak_holdout": len(data.privleak["holdout"])}


def test_the_models_own_answers_as_gold_score_one(world: dict):
    """Gold answers set to what the model answers: KnowMem through the real path (prompt, greedy, stopword cut,
    ROUGE-L F1) is exactly 1."""
    data, full = world["data"], world["full"]
    # only answers with a word in them: ROUGE-L of two empty token lists is 0, not 1
    scored = [(q, a) for q, a in zip(data.knowmem["forget_qa"], full.per_item["knowmem_forget"]["prediction"],
                                      strict=True) if any(c.isalnum() for c in a)]
    assert len(scored) >= 3
    knowmem = dict(data.knowmem) | {"forget_qa": tuple(QAItem(q.question, a) for q, a in scored)}
    mine = MuseData(data.root, data.raw, data.verbmem, knowmem, data.privleak)
    res = MuseEvaluator(mine, world["tok"], CFG).evaluate(world["model"])
    assert res.aggregates["knowmem_forget_rougeL"] == 1.0


def test_a_continuation_that_fits_the_budget_as_gold_scores_one(world: dict):
    """VerbMem's gold is cut to VERBMEM_MAX_NEW_TOKENS tokens after re-tokenisation, so a random model's garbled
    bytes (more tokens once re-encoded) cannot be their own gold. A model whose head always says " the" (or another
    word that is one token with and without its space) can: its 128 generated tokens re-encode to the same 128
    ("the" + 127 x " the"), and the score through the real path is 1."""
    import copy

    tok, data = world["tok"], world["data"]

    def tokens(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # a word that is one token with and without its leading space (which words are depends on the trained tokenizer)
    w = next(w for w in ("the", "was", "of", "in", "a") if len(tokens(f" {w}")) == 1 and len(tokens(f"{w} {w}")) == 2)
    (word,) = tokens(f" {w}")
    parrot = copy.deepcopy(world["model"])
    head = torch.nn.Linear(parrot.lm_head.in_features, parrot.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[word] = 1.0
    parrot.lm_head = head
    gold = " ".join([w] * muse.VERBMEM_MAX_NEW_TOKENS)
    # the gold text goes on past the budget: the cut brings it back to what 128 tokens can say
    mine = MuseData(data.root, data.raw, tuple(VerbMemItem(v.prompt, f"{gold} {w} end") for v in data.verbmem),
                    data.knowmem, data.privleak)
    res = MuseEvaluator(mine, tok, CFG).evaluate(parrot)
    assert res.per_item["verbmem"]["gold"] == res.per_item["verbmem"]["generation"] == [gold] * len(data.verbmem)
    assert res.aggregates["verbmem_rougeL"] == 1.0


def test_generation_stopped_at_a_stop_string_cuts_to_what_the_full_budget_gives(world: dict):
    from uipe.eval import scoring

    ev, tok, model = world["ev"], world["tok"], world["model"]
    prompts = ev._knowmem_prompts
    full = scoring.greedy_generate(model, tok, prompts, 8, 32, strip=False)
    longest = max(full, key=len)
    assert len(longest) >= 6
    # three characters this random model does generate (mid-way through its longest text, so the stop cuts it short),
    # wherever its tokens split them
    stop = longest[len(longest) // 2:len(longest) // 2 + 3]
    stopped = scoring.greedy_generate(model, tok, prompts, 8, 32, strip=False, stop_strings=[stop])
    assert all(f.startswith(s) and f.split(stop)[0] == s.split(stop)[0] for f, s in zip(full, stopped))
    assert sum(len(s) < len(f) for f, s in zip(full, stopped)) >= 1  # stopped early somewhere, not a no-op


def test_batch_size_changes_no_value(world: dict):
    one = MuseEvaluator(world["data"], world["tok"], CFG.model_copy(update={"batch_size": 1})).evaluate(world["model"])
    many = world["full"]
    for role, items in many.per_item.items():
        for key, values in items.items():
            if isinstance(values[0], str):  # left padding + attention mask: padded prompts continue as alone
                assert one.per_item[role][key] == values, (role, key)
            else:
                np.testing.assert_allclose(one.per_item[role][key], values, atol=1e-5, err_msg=f"{role}.{key}")
    assert one.aggregates == pytest.approx(many.aggregates, abs=1e-5)


def test_scoring_pass_then_generation_reuses_scores_deterministically_and_restores_train_mode(world: dict):
    ev, model = world["ev"], world["model"]
    model.train()
    screen = ev.evaluate(model, generate=False)
    assert model.training
    assert not any(k.endswith("rougeL") for k in screen.aggregates)
    assert {"knowmem_forget_prob", "knowmem_retain_prob", "min_k_auc"} <= set(screen.aggregates)
    model.eval()
    full = ev.evaluate(model, scores=screen.scores)
    assert not model.training
    assert full.aggregates == world["full"].aggregates and full.per_item == world["full"].per_item


def test_privleak_against_a_retrained_models_auc(world: dict, tmp_path: Path):
    auc = world["full"].aggregates["min_k_auc"]
    ref = tmp_path / "retrained.json"
    ref.write_text(json.dumps({"min_k_auc": 0.4, "fidelity": "full"}))
    res = MuseEvaluator.from_source(world["source"], world["tok"], CFG, reference=ref).evaluate(world["model"],
                                                                                               generate=False)
    assert res.aggregates["privleak"] == pytest.approx((auc - 0.4) / 0.4 * 100)
    assert metrics.value_of("privleak_closeness", res.aggregates) == pytest.approx(1 - abs(auc - 0.4) / 0.4)
    ref.write_text(json.dumps({"forget_quality": 0.3}))
    with pytest.raises(UipeError, match="no 'min_k_auc' in \\[0, 1\\]") as e:
        load_reference_auc(ref)
    assert "\n" not in str(e.value)


def test_the_knowmem_proxy_scores_the_answer_a_decoder_would_emit_after_the_generation_prompt(world: dict):
    from uipe.eval.muse_evaluate import answer_example

    ev, tok = world["ev"], world["tok"]
    qa = world["data"].knowmem["retain_qa"][0]
    prompt = muse.knowmem_prompt(qa.question, world["data"].knowmem["retain_qa_icl"])
    ids, labels = answer_example(tok, prompt, qa.answer)
    n = labels.count(-100)
    assert ids[:n] == ev._knowmem_prompts[len(world["data"].knowmem["forget_qa"])]  # exactly what generation sees
    # the prompt's trailing space is a token of its own; the answer is the space-led word after it, which MUSE's
    # strip turns back into the gold answer
    assert tok.convert_ids_to_tokens(ids[n - 1:n]) == ["Ġ"] and labels[n:] == ids[n:]
    assert tok.decode(ids[n:]) == f" {qa.answer}"


def test_the_retrained_models_reference_is_computed_once_and_cut_to_a_subset(world: dict, tmp_path: Path):
    out = tmp_path / "retain_reference.json"
    summary = MUSE.reference(world["model_dir"], str(world["source"]), "forget10", out, "plain", CFG.model_copy(
        update={"subset": 1}), "auto", 128)  # a subset config still gets a reference over every text
    doc, full = json.loads(out.read_text()), world["full"]
    assert summary["min_k_auc"] == pytest.approx(full.aggregates["min_k_auc"], abs=1e-6)
    for role in ("privleak_forget", "privleak_holdout"):
        assert doc["min_k_scores"][role] == pytest.approx(full.per_item[role]["min_k"], abs=1e-5)
    stamp = out.stat().st_mtime_ns
    MUSE.reference(world["model_dir"], str(world["source"]), "forget10", out, "plain", CFG, "auto", 128)
    assert out.stat().st_mtime_ns == stamp  # same model files and texts: reused, not recomputed
    # a subset's reference is the AUC of the same first texts (by hand: P(forget score > holdout score), ties half)
    forget, holdout = (doc["min_k_scores"][r] for r in ("privleak_forget", "privleak_holdout"))

    def auc(f: list, h: list) -> float:
        return sum((a > b) + 0.5 * (a == b) for a in f for b in h) / (len(f) * len(h))

    for n in range(1, len(forget) + 1):
        assert load_reference_auc(out, subset=n) == pytest.approx(auc(forget[:n], holdout[:n]))
    # A hand-made retrained model (this random model's own AUC is 0, against which PrivLeak is undefined): forget
    # scores (2, 0), holdout (1, 3). Over both texts 1 of 4 pairs has forget > holdout: AUC 1/4; over the first
    # text of each side, 2 > 1: AUC 1. A 1-text subset's PrivLeak is relative to 1, the full evaluation's to 1/4.
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"min_k_auc": 0.25, "min_k_scores": {"privleak_forget": [2.0, 0.0],
                                                                    "privleak_holdout": [1.0, 3.0]}}))
    assert len(forget) == 2 and load_reference_auc(hand) == 0.25 and load_reference_auc(hand, subset=1) == 1.0
    for subset, ref in ((None, 0.25), (1, 1.0)):
        mine = auc(forget[:subset], holdout[:subset])
        ev = MuseEvaluator.from_source(world["source"], world["tok"], CFG.model_copy(update={"subset": subset}),
                                       reference=hand)
        got = ev.evaluate(world["model"], generate=False).aggregates
        assert got["min_k_auc"] == pytest.approx(mine)
        assert got["privleak"] == pytest.approx((mine - ref) / ref * 100)


def test_a_subset_is_the_first_items_and_reported_as_lower_fidelity(world: dict):
    sub = MuseEvaluator(world["data"], world["tok"], CFG.model_copy(update={"subset": 1})).evaluate(
        world["model"], generate=False)
    assert sub.fidelity == "subset:1" and world["full"].fidelity == "full"
    for role, items in sub.per_item.items():
        key = "min_k" if "min_k" in items else "answer_nll"
        assert items[key] == pytest.approx(world["full"].per_item[role][key][:1], abs=1e-5)


# ---- the benchmark --------------------------------------------------------------------------------------------------
def test_muse_is_registered_with_its_catalogue_entries():
    from uipe.benchmarks import BENCHMARKS, get_benchmark

    bench = get_benchmark("muse")
    assert bench is MUSE and set(BENCHMARKS) == {"tofu", "muse"}
    assert all(m.benchmark == "muse" for m in bench.metrics) and len({m.name for m in bench.metrics}) == 9
    direction = {name: metrics.get(name).direction for name in ("verbmem_rougeL", "knowmem_forget_rougeL",
                                                               "knowmem_retain_rougeL", "min_k_auc")}
    assert direction == {"verbmem_rougeL": "min", "knowmem_forget_rougeL": "min", "knowmem_retain_rougeL": "max",
                         "min_k_auc": "max"}
    utility = metrics.get(bench.utility)
    assert bench.utility == "knowmem_retain_rougeL" and utility.utility and utility.needs_generation
    assert not metrics.get(bench.screening_utility).needs_generation
    assert not metrics.get(bench.forgetting).needs_generation
    assert metrics.get("privleak").needs_reference and metrics.get("privleak_closeness").needs_reference
    # by hand: PrivLeak -86 (NPO on MUSE-News) -> 0.14; +20 -> 0.8; AUC 0.3 -> 1 - 2 x 0.2 = 0.6
    assert metrics.value_of("privleak_closeness", {"privleak": -86.0}) == pytest.approx(0.14)
    assert metrics.value_of("privleak_closeness", {"privleak": 20.0}) == pytest.approx(0.8)
    assert metrics.value_of("min_k_closeness", {"min_k_auc": 0.3}) == pytest.approx(0.6)


def test_objective_words_map_to_muse_names_and_anything_else_is_refused_in_one_line():

    assert MUSE.objective_metric(None, None, "all") == "privleak_closeness"
    assert MUSE.objective_metric("pareto", None, "all") == "privleak_closeness"
    assert MUSE.objective_metric("verbmem_rougeL", None, "all") == "verbmem_rougeL"
    assert MUSE.objective_metric("reference_free", None, "all") == "min_k_closeness"
    for objective, signal, words in (
            ("forget_quality", None, "objective: 'forget_quality' is not an objective of the muse benchmark"),
            ("reference_free", "privleak_closeness", "signal: 'privleak_closeness' is not a reference-free"),
            ("privleak_closenes", None, "'privleak_closenes' is not an objective")):
        with pytest.raises(UipeError, match=words) as e:
            MUSE.objective_metric(objective, signal, "all")
        assert "\n" not in str(e.value)
    with pytest.raises(UipeError, match="selection_fold needs a fold variant"):
        MUSE.objective_metric("min_k_closeness", None, "selection_fold")


def test_muse_data_splits_hash_and_training_refusal(world: dict, tmp_path: Path):
    from uipe.paths import RunPaths

    splits = MUSE.eval_splits(world["source"], "forget05")
    assert set(splits) == {"verbmem/forget", "knowmem/forget_qa", "knowmem/retain_qa", "privleak/forget",
                           "privleak/holdout"}
    assert splits["knowmem/forget_qa"][0] == {"question": world["data"].knowmem["forget_qa"][0].question,
                                              "answer": world["data"].knowmem["forget_qa"][0].answer}
    records = MUSE.evaluation_records(world["source"], "forget05")
    assert MUSE.records_hash(records["verbmem"]) == MUSE.records_hash(splits["verbmem/forget"])
    assert MUSE.records_hash(records["verbmem"]) != MUSE.records_hash(records["knowmem_forget"])
    MUSE.check_reference_free(world["source"], "forget05")
    with pytest.raises(UipeError, match=r"^muse: MUSE's forget set is raw text, with no questions[^\n]*IdkDPO"):
        MUSE.unlearning_records(world["source"], "raw/forget", True)
    cfg = load_config(None, ["data.benchmark=muse", "data.forget_split=raw/forget", "data.synth.authors=20",
                                "data.synth.facts=4"])
    paths = RunPaths.of(tmp_path / "run")
    source = MUSE.ensure_data(cfg, paths)
    assert load_muse(source).privleak == world["data"].privleak  # same seed and size: the same world
    stamp = (paths.data / "benchmark.json").stat().st_mtime_ns
    assert MUSE.ensure_data(cfg, paths) == source and (paths.data / "benchmark.json").stat().st_mtime_ns == stamp
    ev = MUSE.evaluator(source, "forget05", world["tok"], "llama2", CFG, 128, None)
    assert isinstance(ev, MuseEvaluator) and ev.reference_auc is None and ev.fidelity == "full"

