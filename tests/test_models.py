"""The tiny preset's tokenizer and model round-trip offline; prompts, answer masks and padding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from uipe.errors import UipeError
from uipe.models import load_model, load_tokenizer
from uipe.prompts import IGNORE, collate, encode_qa, format_prompt, prompt_token_ids


def test_tiny_model_and_tokenizer_round_trip_offline(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    model = load_model(tiny_base)
    assert (tiny_base / "model.safetensors").is_file() and not list(tiny_base.glob("*.bin"))
    text = "Teo Larkin was born in Cuba."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    again = load_model(tiny_base)
    ids = torch.tensor([encode_qa(tok, "Where was Teo Larkin born?", text)[0]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert model.config.tie_word_embeddings is False and 200_000 < model.num_parameters() < 1_000_000


def test_answer_tokens_carry_the_loss_and_the_prompt_does_not(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    ids, labels = encode_qa(tok, "Where was Teo Larkin born?", "Teo Larkin was born in Cuba.")
    n_prompt = len(prompt_token_ids(tok, "Where was Teo Larkin born?"))
    assert ids[:n_prompt] == prompt_token_ids(tok, "Where was Teo Larkin born?")
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    assert tok.decode(ids[n_prompt:-1]).strip() == "Teo Larkin was born in Cuba."
    assert format_prompt("Q?") == "[INST] Q? [/INST]"


def test_collate_pads_right_and_left() -> None:
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0, side="right")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    left = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_folder_without_safetensors_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_base, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(UipeError, match="no \\*.safetensors weights"):
        load_model(bad)
    with pytest.raises(UipeError, match="model folder not found"):
        load_model(tmp_path / "missing")
