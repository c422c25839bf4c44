"""Models and tokenizers: any Hugging Face causal LM from a local folder (or a hub id when online), safetensors only,
trust_remote_code off unless asked; the prompt template per model family; and the embedded `tiny` preset (a BPE
tokenizer trained locally on the benchmark's text and a small random-init Llama), saved with save_pretrained so
every later stage treats it as an ordinary HF model folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from uipe.errors import UipeError
from uipe.io import sha256_bytes
from uipe.stages import reuse_or_build

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from uipe.config import ExperimentConfig, TinyModelConfig
    from uipe.paths import RunPaths

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
TEMPLATES = {
    "llama2": "[INST] {question} [/INST]",  # TOFU's Llama-2 chat form
    "plain": "Question: {question}\nAnswer:",
}


def format_prompt(question: str, template: str = "llama2") -> str:
    if template not in TEMPLATES:
        raise UipeError(f"model.prompt_template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(question=question)


def _check_local_weights(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UipeError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise UipeError(f"{path}: no *.safetensors weights (uipe loads safetensors only, never pickle)")


def _is_local(path: str | Path) -> bool:
    return Path(path).exists() or str(path).startswith((".", "/", "~"))


def default_device() -> str:
    """Where a single-process stage (evaluation, a search trial) puts its model: the GPU Ray gave it, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak window on CUDA (the CPU figure, ru_maxrss, cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: str | torch.device) -> float:
    """Peak memory of this process: on CUDA the device's allocated peak since the last reset_peak_memory, else the
    peak resident set (ru_maxrss: the whole process's high-water mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM in eval mode; UipeError naming the folder when it has no config or no safetensors."""
    from transformers import AutoModelForCausalLM

    if _is_local(path):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UipeError(f"{path}: model folder not found")
        _check_local_weights(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype, device), use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UipeError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UipeError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:  # Llama-2 has none; padding is always masked, so EOS serves
        tok.pad_token = tok.eos_token
    return tok


def encode_qa(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, template: str = "llama2",
              max_length: int = 128) -> tuple[list[int], list[int]]:
    """input_ids = [BOS] prompt, answer, [EOS]; labels mask the prompt, so losses count answer tokens only (TOFU).

    Prompt and answer are tokenised apart so the prompt ids are exactly those generation starts from.
    """
    prompt_ids = prompt_token_ids(tokenizer, question, template)
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, question: str, template: str = "llama2") -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(format_prompt(question, template), add_special_tokens=False)["input_ids"]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int,
            side: Literal["right", "left"] = "right") -> dict[str, torch.Tensor]:
    """Pad (input_ids, labels) pairs into a batch; padding gets attention 0 and label IGNORE."""
    width = max(len(ids) for ids, _ in examples)
    out_ids, out_mask, out_labels = [], [], []
    for ids, labels in examples:
        pad = width - len(ids)
        fill_ids, fill_mask, fill_labels = [pad_id] * pad, [0] * pad, [IGNORE] * pad
        if side == "right":
            out_ids.append(ids + fill_ids)
            out_mask.append([1] * len(ids) + fill_mask)
            out_labels.append(labels + fill_labels)
        else:
            out_ids.append(fill_ids + ids)
            out_mask.append(fill_mask + [1] * len(ids))
            out_labels.append(fill_labels + labels)
    return {"input_ids": torch.tensor(out_ids), "attention_mask": torch.tensor(out_mask),
            "labels": torch.tensor(out_labels)}


def corpus_from_data(source: str | Path, template: str = "llama2") -> list[str]:
    """Every prompt and answer string of a local TOFU-format folder: the tokenizer's training text."""
    texts = []
    for path in sorted(Path(source).glob("*.json")):
        if path.name == "benchmark.json" or path.name.startswith("holdout"):  # holdout: never seen, not even here
            continue
        for row in json.loads(path.read_text(encoding="utf-8")):
            texts.append(format_prompt(row["question"], template))
            texts += [row["answer"], row.get("paraphrased_answer") or "", *row.get("perturbed_answer", [])]
    return [t for t in texts if t]


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
