"""Prompts and the token-label convention: the prompt template per model family, and how a training record becomes
input_ids and labels. A (question, answer) record: labels are IGNORE on the prompt and on padding, so every loss and
every score counts answer tokens only (TOFU). A raw text (MUSE, arXiv 2407.06460): BOS-led windows in which every
token is a label (plain causal LM). Training, evaluation and the objectives all read IGNORE from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from uipe.errors import UipeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Example = tuple[list[int], list[int]]  # (input_ids, labels)
IGNORE = -100  # label of tokens that carry no loss (prompt, padding): torch's cross_entropy ignore_index default
TEMPLATES = {
    "llama2": "[INST] {question} [/INST]",  # TOFU's Llama-2 chat form
    "plain": "Question: {question}\nAnswer:",
}


def format_prompt(question: str, template: str = "llama2") -> str:
    if template not in TEMPLATES:
        raise UipeError(f"model.prompt_template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(question=question)


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A text's token ids without special tokens (uipe adds BOS itself: with_bos)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """[BOS] + ids, or ids alone for a tokenizer without a BOS token."""
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, question: str, template: str = "llama2") -> list[int]:
    return with_bos(tokenizer, text_ids(tokenizer, format_prompt(question, template)))


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


def chunk_token_ids(ids: Sequence[int], length: int, bos_id: int | None) -> list[list[int]]:
    """A raw text's token ids (no special tokens) as training windows of `length` ids, as MUSE's baselines train
    (muse_bench baselines/dataset.py, DefaultDataset on a .txt): with `bos_id`, consecutive runs of length-1 ids
    each led by BOS; without, runs of `length`. A last window that falls short is filled from the start of the
    first one (MUSE's "rotate"), so every window has exactly `length` ids; muse_bench fills it once, this cycles,
    which differs only for a text shorter than half a window."""
    step = length - (bos_id is not None)
    if step < 1:
        raise UipeError(f"chunking: window length {length} leaves no room for text")
    if len(ids) == 0:
        raise UipeError("chunking: the corpus has no tokens")
    lead = [] if bos_id is None else [bos_id]
    chunks = [lead + list(ids[i:i + step]) for i in range(0, len(ids), step)]
    if len(chunks[-1]) < length:
        first = chunks[0]
        need = length - len(chunks[-1])
        chunks[-1] = chunks[-1] + (first * (need // len(first) + 1))[:need]
    return chunks


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[Example]:
    """A raw text as BOS-led windows of `max_length` tokens, every token a label (MUSE's causal-LM training)."""
    return [(window, list(window))
            for window in chunk_token_ids(text_ids(tokenizer, text), max_length, tokenizer.bos_token_id)]


def encode_record(tokenizer: PreTrainedTokenizerBase, record: Any, template: str = "llama2",
                  max_length: int = 128) -> list[Example]:
    """Any training record as examples: a string is raw text (encode_text: one or more windows), anything else a
    (question, answer) record (encode_qa: one example, unchanged). The one place training tells the two apart."""
    if isinstance(record, str):
        return encode_text(tokenizer, record, max_length)
    return [encode_qa(tokenizer, record.question, record.answer, template, max_length)]


def collate(examples: list[Example], pad_id: int,
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
