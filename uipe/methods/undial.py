"""UNDIAL, self-distillation with adjusted logits (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for
Robust Unlearning in Large Language Models", arXiv 2402.10052), with open-unlearning's retain NLL term.

The teacher is the frozen theta_ini. At every position t of a forget sequence its logits z_t are adjusted by lowering
the logit of the token that follows, z'_t = z_t - beta * onehot(y_t), and the student is trained towards the adjusted
distribution by cross-entropy (KL up to the teacher's entropy, a constant):

L = forget_weight * (1/P) sum_t CE(softmax(z'_t), p_theta(. | x, y<t)) + retain_weight * NLL_theta(retain),

the mean over all P = B * (T - 1) predicting positions of the micro-batch, as open-unlearning's `compute_undial_loss`
averages: positions whose next label is -100 (prompt, padding) are distilled towards the unadjusted teacher. (There,
open-unlearning scatters with index -100, which lowers the logit of vocabulary entry V - 100 instead: an indexing
accident, not part of the method, so uipe adjusts nothing at those positions; scripts/parity_losses.py measures the
difference.) Defaults: open-unlearning's UNDIAL.yaml (beta 10, gamma = forget_weight 1, alpha = retain_weight 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import IGNORE, Batch, Metrics, Objective, logits_of, mean_nll, with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    beta: float = Field(10.0, ge=0)  # how far the forgotten token's teacher logit is lowered
    forget_weight: float = Field(1.0, ge=0)  # open-unlearning's gamma
    retain_weight: float = Field(0.0, ge=0)  # open-unlearning's alpha (0: pure self-distillation)


def adjusted_targets(teacher_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """softmax(z - beta * onehot(next label)) per predicting position, [B, T-1, V]; unlabelled positions unadjusted."""
    target = labels[:, 1:]
    z = teacher_logits[:, :-1].float()
    hit = (target != IGNORE).unsqueeze(-1).to(z.dtype)
    onehot = torch.zeros_like(z).scatter_(-1, target.clamp_min(0).unsqueeze(-1), hit)
    return F.softmax(z - beta * onehot, dim=-1)


def undial_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """Mean over every predicting position of the soft-label cross-entropy to the adjusted teacher (before
    forget_weight); logits [B, T, V], labels [B, T]."""
    soft = adjusted_targets(teacher_logits, labels, beta)
    return -(soft * F.log_softmax(student_logits[:, :-1].float(), dim=-1)).sum(-1).mean()


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    if ref_model is None:
        raise ValueError("undial needs the reference model")
    logits = logits_of(model, batch.forget)
    with torch.no_grad():
        teacher = logits_of(ref_model, batch.forget)
    forget_loss = params.forget_weight * undial_loss(logits, teacher, batch.forget["labels"], params.beta)
    forget_nll = mean_nll(logits.detach(), batch.forget["labels"])
    return with_retain_nll(forget_loss, forget_nll, model, batch, params.retain_weight, "undial")


OBJECTIVE = Objective("undial", compute, Params, needs_ref=True)
