"""IdkDPO (TOFU, arXiv 2401.06121, sec. 4; DPO, Rafailov et al., arXiv 2305.18290, eq. 7).

Preferred y_w = an "I don't know" answer, rejected y_l = the true forget answer, both for the same question:
L = -(2/beta) * E[ log sigmoid(beta * ((log p_theta(y_w) - log p_ref(y_w)) - (log p_theta(y_l) - log p_ref(y_l)))) ]
    + retain_weight * NLL_theta(retain).
The 2/beta factor is open-unlearning's (it scales DPO's eq. 7 like NPO; the minimiser is the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, answer_logprobs, logits_of, require, sequence_logprobs
from uipe.methods.common import with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    beta: float = Field(0.1, gt=0)
    retain_weight: float = Field(1.0, ge=0)


def dpo_loss(
    logp_theta_win: Tensor, logp_ref_win: Tensor, logp_theta_lose: Tensor, logp_ref_lose: Tensor, beta: float
) -> Tensor:
    margin = (logp_theta_win - logp_ref_win) - (logp_theta_lose - logp_ref_lose)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def compute(
    model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params
) -> tuple[Tensor, Metrics]:
    if ref_model is None:
        raise ValueError("idkdpo needs the reference model")
    idk = require(batch.idk, "idk", "idkdpo")
    logp_lose, count = answer_logprobs(logits_of(model, batch.forget), batch.forget["labels"])
    logp_win, _ = sequence_logprobs(model, idk)
    with torch.no_grad():
        ref_lose, _ = sequence_logprobs(ref_model, batch.forget)
        ref_win, _ = sequence_logprobs(ref_model, idk)
    forget_loss = dpo_loss(logp_win, ref_win, logp_lose, ref_lose, params.beta)
    forget_nll = -logp_lose.detach().sum() / count.sum()
    return with_retain_nll(forget_loss, forget_nll, model, batch, params.retain_weight, "idkdpo")


OBJECTIVE = Objective("idkdpo", compute, Params, needs_ref=True, needs_idk=True)
