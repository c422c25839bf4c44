"""MUSE's raw-text training (arXiv 2407.06460): a text record becomes BOS-led windows with every token a label, a QA
record stays exactly TOFU's encoding, IdkDPO is refused in one line, and prepare + GA run on a small MUSE world.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SMALL_MODEL
from uipe.config import load_config
from uipe.errors import UipeError

torch.set_num_threads(1)

# A small world (20 authors x 4 facts: 8 forget-fold passages, 6 + 6 retain) and a 2-layer model: about a minute.
SMALL = [
    "data.benchmark=muse", "data.forget_split=raw/forget", "data.synth.authors=20", "data.synth.facts=4", *SMALL_MODEL,
    "model.max_length=64",
    "eval.max_new_tokens=24", "train.num_workers=2", "train.micro_batch_size=4", "train.effective_batch_size=8",
    "prepare.epochs=12", "prepare.lr=1e-2", "prepare.min_rouge=0", "prepare.max_utility_gap=null",
    "unlearn.epochs=2", "unlearn.lr=2e-3", "unlearn.methods=[ga]",
]


class CharTokenizer:
    """One id per character (its code point), BOS 1, EOS 2: encodings worked by hand."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_a_text_record_becomes_bos_led_windows_every_token_a_label() -> None:
    from uipe.prompts import encode_record

    # "abcde" = 97..101; windows of 4 = BOS + 3 ids; the short last one is filled from the first ([1, 97, ...]).
    examples = encode_record(CharTokenizer(), "abcde", max_length=4)
    assert examples == [([1, 97, 98, 99], [1, 97, 98, 99]), ([1, 100, 101, 1], [1, 100, 101, 1])]
    # exactly one window when the text fills it: BOS + 3 ids, nothing rotated in
    assert encode_record(CharTokenizer(), "xyz", max_length=4) == [([1, 120, 121, 122], [1, 120, 121, 122])]


def test_a_qa_record_is_encoded_as_before() -> None:
    from uipe.data import TofuRecord
    from uipe.prompts import IGNORE, encode_qa, encode_record

    tok, record = CharTokenizer(), TofuRecord("Hi?", "Yo")
    assert encode_record(tok, record, "plain", 64) == [encode_qa(tok, "Hi?", "Yo", "plain", 64)]
    ids, labels = encode_record(tok, record, "plain", 64)[0]
    prompt = 1 + len("Question: Hi?\nAnswer:")  # BOS + the plain template: 22 ids, none a label
    assert ids[prompt:] == [32, 89, 111, 2] == labels[prompt:]  # " Yo" + EOS
    assert labels[:prompt] == [IGNORE] * prompt


def test_the_gate_probes_a_passage_by_its_first_third() -> None:
    from uipe.data import TofuRecord
    from uipe.gate import probe

    # 9 ids: the first 3 after BOS are the prompt; the reference is the next `budget` (4) decoded.
    assert probe(CharTokenizer(), "abcdefghi", "plain", 4) == ([1, 97, 98, 99], "defg")
    ids, reference = probe(CharTokenizer(), TofuRecord("Hi?", "Yo"), "plain", 4)
    assert reference == "Yo" and ids[0] == 1 and len(ids) == 22  # TOFU's prompt and answer, unchanged


def test_muse_training_records(tmp_path: Path) -> None:
    from uipe.benchmarks import MUSE
    from uipe.data.muse import load_muse
    from uipe.data.synth_muse import write_muse_benchmark

    source = str(write_muse_benchmark(tmp_path / "data", authors=20, facts=4, seed=0))
    data = load_muse(source)
    target = MUSE.training_parts(source, "forget05", "target")
    assert list(target) == ["scal/forget_4", "raw/retain1", "raw/retain2"]
    assert tuple(t for part in target.values() for t in part) == data.training_texts("target")
    retain = MUSE.training_parts(source, "forget05", "retain")
    assert tuple(t for part in retain.values() for t in part) == data.training_texts("retrained")
    assert MUSE.unlearning_records(source, "raw/forget", False) == (data.raw["forget"], data.raw["retain1"], ())
    # the scalability and sustainability experiments' forget sets, each with the same retain stream
    assert MUSE.unlearning_records(source, "scal/forget_3", False)[0] == data.scal["forget_3"]
    assert MUSE.unlearning_records(source, "sust/forget_2", False)[:2] == (data.sust["forget_2"], data.raw["retain1"])
    assert MUSE.unlearning_split_names("sust/forget_2") == ("sust/forget_2", "raw/retain1")


def test_a_forget_split_of_the_other_benchmark_is_refused_in_one_line() -> None:
    for overrides, words in ((["data.benchmark=muse"], "'forget05' is not a forget split of muse"),
                             (["data.forget_split=scal/forget_2"], "'scal/forget_2' is not a forget split of tofu")):
        with pytest.raises(UipeError, match=words) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)


def test_idkdpo_is_refused_on_muse_in_one_line(tmp_path: Path) -> None:
    from uipe.train.recipe import unlearn

    cfg = load_config(None, ["data.benchmark=muse", "data.forget_split=raw/forget"])
    with pytest.raises(UipeError, match=r"^unlearn idkdpo: needs forget questions .* muse's forget set is raw text"
                                        r"[^\n]*$"):
        unlearn(cfg, tmp_path / "run", "idkdpo")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _text_nll(folder: Path, texts: tuple[str, ...], max_length: int) -> float:
    """Mean NLL of every token of the texts' training windows under a saved model."""
    from uipe.methods.common import nll_of
    from uipe.models import load_model, load_tokenizer
    from uipe.prompts import collate, encode_record

    model, tok = load_model(folder), load_tokenizer(folder)
    batch = collate([ex for t in texts for ex in encode_record(tok, t, max_length=max_length)], tok.pad_token_id)
    with torch.no_grad():
        return float(nll_of(model, batch))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_prepare_and_ga_on_a_small_muse_world(ray_session: object, tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM

    from uipe.data.muse import load_muse
    from uipe.paths import RunPaths
    from uipe.train.recipe import prepare, unlearn

    cfg, run = load_config(None, SMALL), tmp_path / "run"
    out = prepare(cfg, run)
    paths = RunPaths.of(run)
    forget = load_muse(paths.data).raw["forget"]
    assert set(out["target"]["gate_rouge_l"]) == {"scal/forget_4", "raw/retain1", "raw/retain2"}
    assert set(out["retain"]["gate_rouge_l"]) == {"raw/retain1", "raw/retain2"}
    # the target read the forget passages, the retrained model never did
    assert _text_nll(paths.target_model, forget, 64) < _text_nll(paths.retain_model, forget, 64)
    manifest = json.loads(unlearn(cfg, run, "ga").read_text())
    nlls = [_text_nll(paths.target_model, forget, 64)]
    for epoch in manifest["epochs"]:
        AutoModelForCausalLM.from_pretrained(epoch["path"], use_safetensors=True)  # a complete HF folder
        nlls.append(_text_nll(Path(epoch["path"]), forget, 64))
    assert [e["epoch"] for e in manifest["epochs"]] == [1, 2]
    assert all(b > a for a, b in zip(nlls, nlls[1:])), nlls


def test_a_request_row_reads_the_spaces_floor_and_a_sust_request_starts_from_the_chosen_model(tmp_path: Path) -> None:
    from uipe.study.muse_requests import _row, markdown, plot, request_config

    point = {"alpha": 1.5, "epoch": 3, "objective": 0.9, "knowmem_retain_rougeL": 0.28, "verbmem_rougeL": 0.45,
             "knowmem_forget_rougeL": 0.2, "privleak": -10.0}
    # theta_ini's KnowMem retain 0.30 and a threshold of 0.27: the space's floor is 0.9, not 0.95 or 0.85
    outcome = {"method": "npo", "utility_metric": "knowmem_retain_rougeL", "utility_threshold": 0.27,
               "theta_ini": {"knowmem_retain_rougeL": 0.30}, "chosen_model": "/r/search/npo/chosen",
               "floors": {"0.95": {"base": None, "uipe": None}, "0.9": {"base": {**point, "alpha": 0.0}, "uipe": point},
                          "0.85": {"base": None, "uipe": None}}}
    row = _row("sust/forget_2", outcome)
    assert row["floor"] == "0.9" and row["uipe"]["privleak"] == -10.0 and row["base"]["alpha"] == 0.0
    table = markdown([row], "sust", "uipe experiment muse-sust")
    assert plot([row, {**row, "request": "sust/forget_3", "uipe": None}], "sust", tmp_path / "p.png").stat().st_size
    assert "| sust/forget_2 | npo | 0.9 | UIPE | 1.500 | 3 | 0.280 | 0.450 | 0.200 | -10.0 |" in table
    base = load_config(Path(__file__).resolve().parent.parent / "uipe" / "presets" / "tiny_muse.yaml")
    cfg = request_config(base, "sust/forget_2", ["npo"], "/r/search/npo/chosen", "sust-npo-2")
    assert (cfg.data.forget_split, cfg.unlearn.methods, cfg.model.target) == ("sust/forget_2", ["npo"],
                                                                              "/r/search/npo/chosen")
    assert cfg.name == "tiny_muse-sust-npo-2"


def test_a_muse_experiment_on_a_tofu_config_exits_2_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "uipe.cli", "experiment", "muse-sust", "--run-dir",
                           str(tmp_path / "req")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "data.benchmark is tofu, not muse" in proc.stderr and not (tmp_path / "req").exists()
