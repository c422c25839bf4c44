"""Gradient difference (TOFU, arXiv 2401.06121, sec. 4): -NLL_theta(forget) + retain_weight * NLL_theta(retain)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, nll_of, with_retain_nll
from uipe.schema import Strict


class Params(Strict):
    retain_weight: float = Field(1.0, ge=0)


def graddiff_loss(nll_forget: Tensor, nll_retain: Tensor, retain_weight: float) -> Tensor:
    return -nll_forget + retain_weight * nll_retain


def compute(
    model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params
) -> tuple[Tensor, Metrics]:
    nll_f = nll_of(model, batch.forget)
    # with_retain_nll computes -nll_f + retain_weight * NLL(retain), i.e. graddiff_loss.
    return with_retain_nll(-nll_f, nll_f, model, batch, params.retain_weight, "graddiff")


OBJECTIVE = Objective("graddiff", compute, Params)
