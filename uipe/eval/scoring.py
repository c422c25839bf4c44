"""Batched model scoring (mean answer-token NLL) and batched greedy generation for TOFU's evaluation.

Sequences are sorted by length so a batch carries little padding; results come back in the caller's order.
Scoring pads on the right (positions then count from 0 without position ids); generation pads on the LEFT so
every prompt ends at the same column and the KV cache appends in step. bf16 autocast on CUDA only: CPU bf16
matmuls are slow here and fp32 keeps CPU results bit-stable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from uipe.errors import UipeError
from uipe.eval import metrics
from uipe.prompts import IGNORE, collate

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Example = tuple[list[int], list[int]]  # (input_ids, labels), labels IGNORE on prompt tokens


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, longest first (an out-of-memory batch fails at once, not at the end).

    The sort is stable, so the batching, and with it every float, is the same on every call.
    """
    if batch_size < 1:
        raise UipeError(f"eval.batch_size: must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _forward_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    # logits_to_keep: only the last `keep` positions go through the LM head (the answer part): the vocabulary
    # projection of prompt positions is wasted work and, for a 32k vocabulary, most of the activation memory.
    try:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    except TypeError:  # an architecture without logits_to_keep
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -keep:]


def answer_nll(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, batch_size: int) -> np.ndarray:
    """Per sequence: sum of answer-token NLLs / number of answer tokens (TOFU's avg_gt_loss), float64."""
    return score_answers(model, examples, pad_id, batch_size)[0]


def _answer_token_nll(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, batch_size: int,
                      ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per length batch: (the examples' indices, logits of the answer columns, their targets (IGNORE off the
    answer), each target's NLL (0 where IGNORE)), from one right-padded forward pass."""
    device = model_device(model)
    for idx in length_batches([len(ids) for ids, _ in examples], batch_size):
        batch = collate([examples[i] for i in idx], pad_id, side="right")
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        width = ids.shape[1]
        answer_cols = (labels != IGNORE).any(dim=0).nonzero()
        if answer_cols.numel() == 0:
            raise UipeError("answer_nll: a batch has no answer tokens (answers truncated away by max_length?)")
        # Position p predicts token p+1: answer tokens from column `first` need logits from column first-1 on.
        first = max(int(answer_cols[0]), 1)
        keep = width - first + 1
        with _autocast(device):
            logits = _forward_logits(model, ids, mask, keep)
        logits = logits[:, :-1].float()
        targets = labels[:, first:]
        tok_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  ignore_index=IGNORE, reduction="none").view(targets.shape)
        if bool(((targets != IGNORE).sum(dim=1) == 0).any()):
            raise UipeError("answer_nll: a sequence has no answer tokens (answer truncated away by max_length?)")
        yield idx, logits, targets, tok_nll


@torch.inference_mode()
def score_answers(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, batch_size: int,
                  min_k: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(answer NLL per sequence, as answer_nll; with `min_k`, also each sequence's Min-K%++ score from the same
    forward pass: metrics.min_k_plus_plus over its answer tokens' z-scores, min_k_token_z)."""
    out = np.full(len(examples), np.nan, dtype=np.float64)
    mink = np.full(len(examples), np.nan, dtype=np.float64) if min_k is not None else None
    for idx, logits, targets, tok_nll in _answer_token_nll(model, examples, pad_id, batch_size):
        counts = (targets != IGNORE).sum(dim=1)
        mean = tok_nll.double().sum(dim=1) / counts.double()
        out[idx] = mean.cpu().numpy()
        if mink is not None:
            z = min_k_token_z(logits, targets).cpu().numpy()
            answer = (targets != IGNORE).cpu().numpy()
            mink[idx] = [metrics.min_k_plus_plus(z[row][answer[row]], min_k) for row in range(len(idx))]
    return out, mink


@torch.inference_mode()
def answer_token_logprobs(model: PreTrainedModel, examples: Sequence[Example], pad_id: int,
                          batch_size: int) -> list[np.ndarray]:
    """Per sequence, log p(x_t | x_<t) of each answer token in order (float64), from the same batched pass as
    score_answers: the per-token values a Min-K% attack ranks (uipe.eval.muse.min_k_percent)."""
    out: list[np.ndarray] = [np.empty(0)] * len(examples)
    for idx, _, targets, tok_nll in _answer_token_nll(model, examples, pad_id, batch_size):
        answer = (targets != IGNORE).cpu()
        for row, i in enumerate(idx):
            out[i] = -tok_nll[row].cpu()[answer[row]].double().numpy()
    return out


def min_k_token_z(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Min-K%++'s per-token z-score (Zhang et al. 2024, arXiv 2404.02936, eq. 3): (log p(x_t) - mu_t) / sigma_t, with
    mu_t = E_{z~p}[log p(z)] and sigma_t^2 = E_{z~p}[(log p(z) - mu_t)^2] under the model's own next-token
    distribution p at position t. Positions whose target is IGNORE get 0 (the caller drops them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    # two-pass variance, E_p[(log p - mu)^2]: E[log p^2] - mu^2 cancels badly in float32
    sigma = (p * (logp - mu.unsqueeze(-1)).square()).sum(-1).clamp_min(1e-12).sqrt()
    target_logp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE, (target_logp - mu) / sigma, torch.zeros_like(mu))


@torch.inference_mode()
def greedy_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                    batch_size: int, max_new_tokens: int, strip: bool = True,
                    stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy continuations of prompt token ids (KV cache, left padding), decoded without special tokens; `strip`
    False keeps leading and trailing whitespace (MUSE cuts a knowmem answer at "\\n\\n" before stripping).
    `stop_strings`: a row stops once its text holds one (the text up to and including it is kept), so a caller that
    cuts at those strings reads what the full budget would have given, without generating past them."""
    from transformers import GenerationConfig

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise UipeError("tokenizer: generation needs a pad token and an EOS token")
    # A fresh config: a chat model's saved generation_config (temperature, top_p, do_sample) must not leak in.
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               pad_token_id=pad_id, eos_token_id=eos_id, stop_strings=list(stop_strings) or None)
    device = model_device(model)
    texts: list[str] = [""] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], batch_size):
        batch = collate([(list(prompts[i]), list(prompts[i])) for i in idx], pad_id, side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with _autocast(device):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 tokenizer=tokenizer if stop_strings else None)
        for row, i in enumerate(idx):
            new = out[row, ids.shape[1]:].tolist()
            if eos_id in new:  # finished rows are padded after their EOS
                new = new[: new.index(eos_id)]
            text = tokenizer.decode(new, skip_special_tokens=True)
            texts[i] = text.strip() if strip else text
    return texts


@lru_cache(maxsize=1)
def rouge_scorer() -> RougeScorer:
    """Built once per process: loading the Porter stemmer costs ~0.7 s."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(references: Sequence[str], generations: Sequence[str]) -> list[float]:
    """TOFU's rougeL_recall: RougeScorer(['rougeL'], use_stemmer=True).score(ground_truth, generation).recall."""
    if len(references) != len(generations):
        raise UipeError(f"rouge: {len(references)} references but {len(generations)} generations")
    scorer = rouge_scorer()
    return [float(scorer.score(ref, gen)["rougeL"].recall) for ref, gen in zip(references, generations, strict=True)]
