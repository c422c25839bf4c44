"""SatImp, saturation-importance token weighting (Yang et al., "Exploring Criteria of Loss Reweighting to Enhance
LLM Unlearning", arXiv 2505.11953), with open-unlearning's retain NLL term.

Gradient ascent on each forget answer token t with the detached weight
w_t = p_t^beta1 * (1 - p_t)^beta2, p_t = p_theta(y_t | x, y<t):
the saturation factor p_t^beta1 fades tokens already forgotten (as WGA), the importance factor (1 - p_t)^beta2 fades
tokens the model finds trivially likely, so the ascent concentrates on tokens in between.

L = forget_weight * (1/N) sum_t sg[w_t] * log p_t + retain_weight * NLL_theta(retain), over the N answer tokens.

This is open-unlearning's `compute_satimp_loss` with the defaults its SatImp.yaml runs (beta1 5, beta2 1,
gamma = forget_weight 0.1, alpha = retain_weight 1; its class's own defaults, gamma 1 and alpha 0.1, are overridden by
that file).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, answer_token_logprobs, logits_of, with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    beta1: float = Field(5.0, ge=0)  # saturation exponent, on p_t
    beta2: float = Field(1.0, ge=0)  # importance exponent, on 1 - p_t
    forget_weight: float = Field(0.1, ge=0)  # open-unlearning's gamma
    retain_weight: float = Field(1.0, ge=0)  # open-unlearning's alpha


def satimp_loss(token_logp: Tensor, beta1: float, beta2: float) -> Tensor:
    """Answer-token log-probs [N] -> (1/N) sum_t sg[p_t^beta1 (1 - p_t)^beta2] * log p_t (before forget_weight)."""
    p = token_logp.detach().exp()
    return (p ** beta1 * (1 - p) ** beta2 * token_logp).mean()


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    token_logp = answer_token_logprobs(logits_of(model, batch.forget), batch.forget["labels"])
    forget_loss = params.forget_weight * satimp_loss(token_logp, params.beta1, params.beta2)
    return with_retain_nll(forget_loss, -token_logp.detach().mean(), model, batch, params.retain_weight, "satimp")


OBJECTIVE = Objective("satimp", compute, Params)
