"""Weighted gradient ascent, WGA (Wang et al., "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
Beyond", arXiv 2502.19301), with open-unlearning's retain NLL term.

Each forget answer token t is ascended with the detached weight w_t = p_theta(y_t | x, y<t)^beta, so tokens the model
has already forgotten (p_t near 0) stop pulling, unlike plain GA whose gradient grows without bound as p_t -> 0:

L = forget_weight * (1/N) sum_t sg[p_t^beta] * log p_t + retain_weight * NLL_theta(retain),

the mean over the N answer tokens of the micro-batch (sg: no gradient through the weight). This is open-unlearning's
`compute_wga_loss` (-(w * CE) averaged over tokens whose label is not -100) and its WGA.yaml defaults (beta 1,
gamma = forget_weight 1, alpha = retain_weight 1).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, answer_token_logprobs, logits_of, with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    beta: float = Field(1.0, ge=0)  # the weight's exponent; 0 is plain GA (every weight 1)
    forget_weight: float = Field(1.0, ge=0)  # open-unlearning's gamma
    retain_weight: float = Field(1.0, ge=0)  # open-unlearning's alpha


def wga_loss(token_logp: Tensor, beta: float) -> Tensor:
    """Answer-token log-probs [N] -> (1/N) sum_t sg[p_t^beta] * log p_t (the forget term, before forget_weight)."""
    weight = token_logp.detach().exp() ** beta
    return (weight * token_logp).mean()


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    token_logp = answer_token_logprobs(logits_of(model, batch.forget), batch.forget["labels"])
    forget_loss = params.forget_weight * wga_loss(token_logp, params.beta)
    return with_retain_nll(forget_loss, -token_logp.detach().mean(), model, batch, params.retain_weight, "wga")


OBJECTIVE = Objective("wga", compute, Params)
