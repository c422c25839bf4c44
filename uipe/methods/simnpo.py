"""SimNPO (Fan et al., arXiv 2410.07163, eq. 4): reference-free NPO with length normalisation and a margin gamma.

L = -(2/beta) * E_f[ log sigmoid(-(beta/|y|) * log p_theta(y|x) - gamma) ] + retain_weight * NLL_theta(retain).
|y| = the number of answer tokens. open-unlearning writes the margin as delta inside the scaling,
log sigmoid(beta * (NLL/|y| - delta)), i.e. its delta = gamma / beta; both agree at the default gamma = 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, answer_logprobs, logits_of, with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    beta: float = Field(2.5, gt=0)
    gamma: float = 0.0
    retain_weight: float = Field(1.0, ge=0)


def simnpo_loss(logp_theta_forget: Tensor, n_tokens: Tensor, beta: float, gamma: float) -> Tensor:
    """Per-sequence log-probs [B] and answer lengths [B] -> scalar."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / n_tokens) * logp_theta_forget - gamma).mean()


def compute(
    model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params
) -> tuple[Tensor, Metrics]:
    logp_theta, count = answer_logprobs(logits_of(model, batch.forget), batch.forget["labels"])
    forget_loss = simnpo_loss(logp_theta, count.clamp_min(1).to(logp_theta.dtype), params.beta, params.gamma)
    forget_nll = -logp_theta.detach().sum() / count.sum()
    return with_retain_nll(forget_loss, forget_nll, model, batch, params.retain_weight, "simnpo")


OBJECTIVE = Objective("simnpo", compute, Params)
