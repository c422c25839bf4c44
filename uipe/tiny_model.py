"""The embedded `tiny` preset's model: a byte-level BPE tokenizer trained locally on the benchmark's text and a
small random-init Llama, saved with save_pretrained so every later stage treats it as an ordinary HF model folder
(tiny is a config, not a code path: only this module knows how it is made).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from uipe.io import sha256_bytes
from uipe.prompts import format_prompt
from uipe.stages import reuse_or_build

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from uipe.config import ExperimentConfig, TinyModelConfig
    from uipe.paths import RunPaths


def corpus_from_data(source: str | Path, template: str = "llama2") -> list[str]:
    """Every prompt and answer string of a local TOFU-format folder (a MUSE folder: muse_corpus): the tokenizer's
    training text."""
    from uipe.data.muse import is_muse_folder

    if is_muse_folder(source):
        return muse_corpus(source)
    texts = []
    for path in sorted(Path(source).glob("*.json")):
        if path.name == "benchmark.json" or path.name.startswith("holdout"):  # holdout: never seen, not even here
            continue
        for row in json.loads(path.read_text(encoding="utf-8")):
            texts.append(format_prompt(row["question"], template))
            texts += [row["answer"], row.get("paraphrased_answer") or "", *row.get("perturbed_answer", [])]
    return [t for t in texts if t]


def muse_corpus(source: str | Path) -> list[str]:
    """A MUSE folder's trained texts (the target's corpus) and its knowmem questions and answers in MUSE's prompt
    wording (arXiv 2407.06460); never the holdout texts, which no model may have seen, not even here."""
    from uipe.data.muse import load_muse, qa_shots

    data = load_muse(source)
    qa = [qa_shots([q]).rstrip("\n") for split in data.knowmem.values() for q in split]
    return [*data.training_texts("target"), *qa]


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `corpus` (0.1 s here), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def build_tiny(out: str | Path, corpus: list[str], cfg: TinyModelConfig, seed: int = 0) -> Path:
    """theta_0 of the embedded world: a locally trained tokenizer and a random-init LlamaForCausalLM, built once per
    (corpus, config, seed): the folder is reused while its record names the same."""
    want = {"kind": "tiny-base", "seed": seed, **cfg.model_dump(),
            "corpus": sha256_bytes(json.dumps(corpus).encode())}
    return reuse_or_build(Path(out), want, lambda tmp: _write_tiny(tmp, corpus, cfg, seed))


def _write_tiny(tmp: Path, corpus: list[str], cfg: TinyModelConfig, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        # Untied: FSDP2's full state dict returns tied embeddings as two keys, which would not round-trip.
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def prepare_base_model(cfg: ExperimentConfig, paths: RunPaths, data_source: str) -> str:
    """The model unlearning and fine-tuning start from: the embedded tiny model is built once under the run folder;
    any other `model.base` (a local folder or a hub id) is used as it is."""
    if cfg.model.base != "tiny":
        return cfg.model.base
    corpus = corpus_from_data(data_source, cfg.model.prompt_template)
    return str(build_tiny(paths.base_model, corpus, cfg.model.tiny, cfg.train.seed))
