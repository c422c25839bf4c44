"""Fine-tuning (prepare): the causal-LM NLL on answer tokens, the question masked (TOFU, arXiv 2401.06121, sec. 2)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, nll_of


def finetune_loss(nll: Tensor) -> Tensor:
    return nll


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Any) -> tuple[Tensor, Metrics]:
    nll = nll_of(model, batch.forget)
    return finetune_loss(nll), {"loss": nll.detach(), "nll": nll.detach()}


OBJECTIVE = Objective("finetune", compute, needs_retain=False)
