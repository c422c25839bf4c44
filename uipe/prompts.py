"""Prompts and the token-label convention: the prompt template per model family, and how a (question, answer)
pair becomes input_ids and labels. Labels are IGNORE on the prompt and on padding, so every loss and every
score counts answer tokens only (TOFU); training, evaluation and the objectives all read IGNORE from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from uipe.errors import UipeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of tokens that carry no loss (prompt, padding): torch's cross_entropy ignore_index default
TEMPLATES = {
    "llama2": "[INST] {question} [/INST]",  # TOFU's Llama-2 chat form
    "plain": "Question: {question}\nAnswer:",
}


def format_prompt(question: str, template: str = "llama2") -> str:
    if template not in TEMPLATES:
        raise UipeError(f"model.prompt_template: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(question=question)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, question: str, template: str = "llama2") -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(format_prompt(question, template), add_special_tokens=False)["input_ids"]


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
