"""TOFU evaluation: metric formulas (metrics), TOFU eval logs (tofu_logs), batched scoring (scoring), the
Evaluator (evaluate), and the retain reference for forget quality (reference)."""

from uipe.eval.evaluate import EvalResult, Evaluator
from uipe.eval.reference import (
    RetainReference,
    compute_reference,
    load_or_compute_reference,
    load_reference,
    save_reference,
)
from uipe.eval.tofu_logs import tofu_report

__all__ = [
    "EvalResult", "Evaluator", "RetainReference", "compute_reference", "load_or_compute_reference", "load_reference",
    "save_reference", "tofu_report",
]
