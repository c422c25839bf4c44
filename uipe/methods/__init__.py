"""Unlearning objectives (and prepare's fine-tuning loss): one file each, one Objective each, one registry.

Each file holds its parameters (a pydantic model), a pure loss on tensors (tested against hand-worked numbers) and
a thin `compute` that runs the forward passes. The training loop only sees `OBJECTIVES[name]`.
"""

from __future__ import annotations

from uipe.errors import UipeError
from uipe.methods import finetune, ga, graddiff, idkdpo, kl, npo, rmu, satimp, simnpo, undial, wga
from uipe.methods.common import Batch, Compute, Metrics, Objective, answer_logprobs, mean_nll

OBJECTIVES: dict[str, Objective] = {
    m.OBJECTIVE.name: m.OBJECTIVE
    for m in (finetune, ga, graddiff, kl, npo, simnpo, idkdpo, rmu, undial, wga, satimp)
}
UNLEARN_METHODS = tuple(name for name in OBJECTIVES if name != "finetune")  # the one list of method names


def check_method(method: str) -> str:
    """An unlearning method's name, or one line listing the ones there are."""
    if method not in UNLEARN_METHODS:
        raise UipeError(f"unknown method {method!r}; choose one of {', '.join(UNLEARN_METHODS)}")
    return method


def get_objective(name: str) -> Objective:
    return OBJECTIVES[name if name == "finetune" else check_method(name)]


__all__ = ["Batch", "Compute", "Metrics", "OBJECTIVES", "Objective", "UNLEARN_METHODS", "answer_logprobs",
           "check_method", "get_objective", "mean_nll"]
