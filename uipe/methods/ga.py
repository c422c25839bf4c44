"""Gradient ascent (TOFU, arXiv 2401.06121, sec. 4): minimise -NLL_theta(forget)."""

from __future__ import annotations

from torch import Tensor, nn

from uipe.methods.common import Batch, Metrics, Objective, monitor_nll, nll_of
from uipe.schema import Strict


class Params(Strict):
    """GA has no parameters."""


def ga_loss(nll_forget: Tensor) -> Tensor:
    return -nll_forget


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    nll_f = nll_of(model, batch.forget)
    loss = ga_loss(nll_f)
    metrics: Metrics = {"loss": loss.detach(), "forget_loss": loss.detach(), "forget_nll": nll_f.detach()}
    retain_nll = monitor_nll(model, batch.retain)  # GA ignores the retain set; its NLL is watched, not trained
    if retain_nll is not None:
        metrics["retain_nll"] = retain_nll
    return loss, metrics


# needs_retain: the loop still pairs a retain batch so that utility is monitored the same way for every method.
OBJECTIVE = Objective("ga", compute, Params)
