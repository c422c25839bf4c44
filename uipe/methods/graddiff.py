"""Gradient difference (TOFU, arXiv 2401.06121, sec. 4): -NLL_theta(forget) + retain_weight * NLL_theta(retain)."""

from __future__ import annotations

from torch import Tensor, nn

from uipe.config import GradDiffParams
from uipe.methods.common import Batch, Metrics, Objective, nll_of, with_retain_nll


def graddiff_loss(nll_forget: Tensor, nll_retain: Tensor, retain_weight: float) -> Tensor:
    return -nll_forget + retain_weight * nll_retain


def compute(
    model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: GradDiffParams
) -> tuple[Tensor, Metrics]:
    nll_f = nll_of(model, batch.forget)
    # with_retain_nll computes -nll_f + retain_weight * NLL(retain), i.e. graddiff_loss.
    return with_retain_nll(-nll_f, nll_f, model, batch, params.retain_weight, "graddiff")


OBJECTIVE = Objective("graddiff", compute)
