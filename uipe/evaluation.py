"""One model evaluated outside a search, through the run's benchmark: `uipe evaluate` (every aggregate and per-item
value to a file) and `uipe reference` (the retain model's evaluation an objective compares against: TOFU's truth
ratios, MUSE's Min-K% AUC).

    uipe evaluate --model runs/tiny/search/ga/chosen --out metrics.json     # after `uipe run`, on a CPU
"""

from __future__ import annotations

from pathlib import Path

from uipe.benchmarks import get_benchmark
from uipe.config import EvalConfig


def evaluate_model(model: Path, data: str, forget_split: str, retain_reference: Path, out: Path, template: str,
                   eval_cfg: EvalConfig, dtype: str, max_length: int = 128, benchmark: str = "tofu") -> dict:
    """Every aggregate (by catalogue name) and per-item value of `model` -> `out`; the reference is read before the
    model is loaded, so a missing file fails fast."""
    from uipe.io import atomic_write_json
    from uipe.models import default_device, load_model, load_tokenizer

    evaluator = get_benchmark(benchmark).evaluator(data, forget_split, load_tokenizer(model), template, eval_cfg,
                                                   max_length, str(retain_reference))
    result = evaluator.evaluate(load_model(model, dtype=dtype, device=default_device())).to_json()
    atomic_write_json(out, result)
    return result


def retain_reference(model: Path, data: str, forget_split: str, out: Path, template: str, eval_cfg: EvalConfig,
                     dtype: str, max_length: int = 128, benchmark: str = "tofu") -> dict:
    """The reference model's evaluation -> `out` (reused when model and data are unchanged), summarised: TOFU's
    retain model's truth ratios (forget quality's reference), MUSE's retrained model's Min-K% AUC (PrivLeak's)."""
    return get_benchmark(benchmark).reference(model, data, forget_split, out, template, eval_cfg, dtype, max_length)
