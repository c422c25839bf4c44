"""Unlearning objectives (and prepare's fine-tuning loss): one file each, one Objective each, one registry.

Each file holds a pure loss on tensors (tested against hand-worked numbers) and a thin `compute` that runs the
forward passes. The training loop only sees `OBJECTIVES[name]`.
"""

from __future__ import annotations

from uipe.errors import UipeError
from uipe.methods import finetune, ga, graddiff, idkdpo, kl, npo, simnpo
from uipe.methods.common import Batch, Compute, Metrics, Objective, answer_logprobs, mean_nll

OBJECTIVES: dict[str, Objective] = {
    m.OBJECTIVE.name: m.OBJECTIVE for m in (finetune, ga, graddiff, kl, npo, simnpo, idkdpo)
}
UNLEARN_METHODS = tuple(name for name in OBJECTIVES if name != "finetune")


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UipeError(f"unknown method {name!r}; choose one of {', '.join(UNLEARN_METHODS)}")
    return OBJECTIVES[name]


__all__ = ["Batch", "Compute", "Metrics", "OBJECTIVES", "Objective", "UNLEARN_METHODS", "answer_logprobs",
           "get_objective", "mean_nll"]
