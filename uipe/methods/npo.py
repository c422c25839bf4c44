"""Negative preference optimisation (Zhang et al., arXiv 2404.05868, eq. 3), with open-unlearning's retain NLL term.

L = -(2/beta) * E_f[ log sigmoid(-beta * (log p_theta(y|x) - log p_ref(y|x))) ] + retain_weight * NLL_theta(retain),
log p(y|x) = the sum of answer-token log-probabilities of one sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, answer_logprobs, logits_of, sequence_logprobs
from uipe.methods.common import with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    beta: float = Field(0.1, gt=0)
    retain_weight: float = Field(1.0, ge=0)


def npo_loss(logp_theta_forget: Tensor, logp_ref_forget: Tensor, beta: float) -> Tensor:
    """Per-sequence log-probs [B] -> scalar; at theta == ref it equals (2/beta) * log 2."""
    log_ratio = logp_theta_forget - logp_ref_forget
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    if ref_model is None:
        raise ValueError("npo needs the reference model")
    logp_theta, count = answer_logprobs(logits_of(model, batch.forget), batch.forget["labels"])
    with torch.no_grad():
        logp_ref, _ = sequence_logprobs(ref_model, batch.forget)
    forget_nll = -logp_theta.detach().sum() / count.sum()
    return with_retain_nll(npo_loss(logp_theta, logp_ref, params.beta), forget_nll, model, batch,
                           params.retain_weight, "npo")


OBJECTIVE = Objective("npo", compute, Params, needs_ref=True)
