"""KL minimisation (TOFU, arXiv 2401.06121, sec. 4): -NLL_theta(forget) + retain_weight * KL(p_ref || p_theta)
on the retain batch.

Averaging, exactly: for every answer token position t of the retain batch (label != -100 after the shift),
KL_t = sum_v p_ref(v|x,y<t) * (log p_ref(v|x,y<t) - log p_theta(v|x,y<t)); the retain term is the mean of KL_t over
all answer tokens of the micro-batch (token-weighted, like mean_nll). open-unlearning averages over every position
including prompt and padding; scoring answers only keeps the term about what TOFU measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import IGNORE, Batch, Metrics, Objective, logits_of, mean_nll, nll_of, require
from uipe.schema import Strict


class Params(Strict):
    retain_weight: float = Field(1.0, ge=0)


def kl_divergence(logits_ref: Tensor, logits_theta: Tensor, labels: Tensor) -> Tensor:
    """Token-mean KL(p_ref || p_theta) over answer tokens; logits [B, T, V], labels [B, T]."""
    mask = labels[:, 1:] != IGNORE
    if int(mask.sum()) == 0:
        raise ValueError("batch has no answer tokens (every label is -100)")
    log_ref = F.log_softmax(logits_ref[:, :-1].float(), dim=-1)[mask]
    log_theta = F.log_softmax(logits_theta[:, :-1].float(), dim=-1)[mask]
    per_token = (log_ref.exp() * (log_ref - log_theta)).sum(-1)
    return per_token.mean()


def kl_loss(nll_forget: Tensor, kl_retain: Tensor, retain_weight: float) -> Tensor:
    return -nll_forget + retain_weight * kl_retain


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    if ref_model is None:
        raise ValueError("kl needs the reference model")
    retain = require(batch.retain, "retain", "kl")
    nll_f = nll_of(model, batch.forget)
    logits_r = logits_of(model, retain)
    with torch.no_grad():
        logits_ref = logits_of(ref_model, retain)
    kl = kl_divergence(logits_ref, logits_r, retain["labels"])
    loss = kl_loss(nll_f, kl, params.retain_weight)
    return loss, {
        "loss": loss.detach(), "forget_loss": -nll_f.detach(), "retain_loss": kl.detach(),
        "forget_nll": nll_f.detach(), "retain_nll": mean_nll(logits_r.detach(), retain["labels"]),
    }


OBJECTIVE = Objective("kl", compute, Params, needs_ref=True)
