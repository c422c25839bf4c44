"""What runs in a search trial's worker process: load once, apply alpha, evaluate, report.

A trial trains nothing: it sets a loaded theta_ini model's weights in place to theta_un + alpha*(theta_un -
theta_ini) (UIPE, arXiv 2503.04693, the extrapolation operator) for one epoch's checkpoint, and evaluates it with
TOFU's metrics. Actors are reused, so the model, tokenizer and evaluator are loaded once per worker process, not
once per trial. The driver (uipe/search/driver.py) imports this module; this module never imports the driver.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from uipe.config import EvalConfig
from uipe.search.result import TrialResult

# Tests only, read by the driver and passed to every trial: "alpha=A,marker=PATH" kills the trial's process once
# at alpha A (as the OOM killer would).
KILL_SWITCH = "UIPE_TEST_KILL_TRIAL"


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, as plain values (pickled into each trial actor)."""

    theta_ini: str
    epoch_dirs: dict[int, str]
    data: str
    forget_split: str
    template: str
    max_length: int
    eval: EvalConfig
    reference: str | None  # the retain reference (forget quality); None for a reference-free search
    dtype: str
    threads: int

    def identity(self) -> dict[str, Any]:
        return {**asdict(self), "eval": self.eval.model_dump()}


_CONTEXT: dict[str, tuple] = {}  # per worker process: (model, evaluator, device), kept across trials by reuse_actors
_EXTRAPOLATED: set[str] = set()  # context keys whose model holds an extrapolated point, not theta_ini
_SCREENED: dict[tuple, tuple] = {}  # (context key, alpha, epoch) -> the scoring pass's scores, for its full pass


def _key(setup: TrialSetup) -> str:
    return json.dumps(setup.identity(), sort_keys=True, default=str)


def context(setup: TrialSetup, pristine: bool = False) -> tuple:
    """The loaded model, evaluator (retain reference set) and device for this setup, built once per process;
    `pristine`: the model must be theta_ini itself (reloaded if a trial in this process has extrapolated it)."""
    key = _key(setup)
    if key not in _CONTEXT or (pristine and key in _EXTRAPOLATED):
        import torch

        from uipe.models import default_device, load_model

        torch.set_num_threads(setup.threads)
        device = default_device()
        model = load_model(setup.theta_ini, dtype=setup.dtype, device=device)
        _CONTEXT.clear()
        _EXTRAPOLATED.clear()
        _CONTEXT[key] = (model, build_evaluator(setup), device)
    if not pristine:  # the caller is about to extrapolate into it
        _EXTRAPOLATED.add(key)
    return _CONTEXT[key]


def build_evaluator(setup: TrialSetup) -> Any:
    """The trial's Evaluator, its retain reference set when the setup names one."""
    from uipe.eval.evaluate import Evaluator
    from uipe.eval.reference import load_reference
    from uipe.models import load_tokenizer

    evaluator = Evaluator.from_source(setup.data, setup.forget_split, load_tokenizer(setup.theta_ini),
                                      setup.template, setup.eval, setup.max_length)
    if setup.reference:
        evaluator.set_reference(load_reference(setup.reference))
    return evaluator


def evaluate_point(setup: TrialSetup, alpha: float, epoch: int, utility_threshold: float,
                   objective_metric: str = "forget_quality", start: Mapping[str, float] | None = None,
                   generate: bool = True) -> TrialResult:
    """Extrapolate in memory and evaluate (with `start`, theta_ini's aggregates, also forgetting relative to it);
    raise when the extrapolated model's metrics are not finite. generate=False: a screening pass, every scoring
    metric (forget quality, probabilities, truth ratios) without greedy generation, ROUGE-L or model utility."""
    from uipe.eval.metrics import relative_to_start
    from uipe.update_vector import cached_update_vector

    from uipe.models import peak_memory_bytes, reset_peak_memory

    t0 = time.perf_counter()
    model, evaluator, device = context(setup)
    reset_peak_memory(device)
    cached_update_vector(setup.theta_ini, setup.epoch_dirs[epoch], device=device).apply(model, alpha)
    # the full pass of a point this process has just screened reuses its scores (same weights: the extrapolation
    # depends only on alpha and the epoch), so it pays only for generation
    point = (_key(setup), float(alpha), int(epoch))
    result = evaluator.evaluate(model, generate=generate, scores=None if not generate else _SCREENED.pop(point, None))
    _SCREENED.clear()
    if not generate:
        _SCREENED[point] = result.scores
    metrics = result.aggregates
    metrics |= relative_to_start(metrics, start or {})
    bad = [k for k in (objective_metric, "model_utility" if generate else "scored_utility")
           if not math.isfinite(metrics.get(k, math.nan))]
    if bad:
        raise ValueError(f"alpha={alpha} epoch={epoch}: {bad[0]} is not finite (the extrapolated model broke)")
    return TrialResult.scored(alpha, epoch, metrics, utility_threshold, time.perf_counter() - t0,
                              peak_memory_bytes=peak_memory_bytes(device), objective_metric=objective_metric)


def theta_ini_metrics(setup: TrialSetup) -> dict[str, float]:
    """The start model's evaluation: the utility the search's floor refers to."""
    model, evaluator, _ = context(setup, pristine=True)
    return evaluator.evaluate(model).aggregates


def trial(config: dict, setup: TrialSetup, utility_threshold: float, objective_metric: str = "forget_quality",
          fault: str = "", start: Mapping[str, float] | None = None, screening: bool = False) -> None:
    """The Tune function trainable: one (alpha, epoch) point, reported once at full fidelity. With `screening`, a
    point other than the base method's (alpha 0) is first reported from a scoring pass; the search's
    ScreeningScheduler (uipe/search/screening.py) then stops it there, or lets it go on to the full evaluation."""
    from ray import tune

    alpha, epoch = float(config["alpha"]), int(config["epoch"])
    maybe_die(fault, alpha, epoch)
    screened_seconds = 0.0
    if screening and alpha != 0.0:
        screen = evaluate_point(setup, alpha, epoch, utility_threshold, objective_metric, start, generate=False)
        tune.report({**screen.to_report(), "alpha": alpha, "epoch": epoch})
        screened_seconds = screen.trial_seconds
    result = evaluate_point(setup, alpha, epoch, utility_threshold, objective_metric, start)
    # the trial's work is both passes; the screening part is kept apart for the search's time split
    result = replace(result, trial_seconds=result.trial_seconds + screened_seconds,
                     metrics={**result.metrics, "screen_seconds": screened_seconds})
    tune.report({**result.to_report(), "alpha": alpha, "epoch": epoch})


def maybe_die(fault: str, alpha: float, epoch: int) -> None:
    """Tests only: a trial process killed mid-trial, once (a marker file remembers), at the given alpha."""
    if not fault:
        return
    opts = dict(item.split("=", 1) for item in fault.split(","))
    marker = opts["marker"]
    if math.isclose(alpha, float(opts["alpha"])) and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{epoch}\n")  # the epoch of the trial killed
        os._exit(137)
