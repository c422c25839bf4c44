"""What runs in a search trial's worker process: load once, apply alpha, evaluate, report.

A trial trains nothing: it sets a loaded theta_ini model's weights in place to theta_un + alpha*(theta_un -
theta_ini) (UIPE, arXiv 2503.04693, the extrapolation operator) for one epoch's checkpoint, and evaluates it with
TOFU's metrics. It runs in a pool's worker process (uipe/search/pool.py), which keeps the model, tokenizer and
evaluator loaded across trials and across the searches of a stage. The driver (uipe/search/driver.py) imports this
module; this module never imports the driver.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from uipe.coefficients import Coefficients, Extrapolation, Group
from uipe.config import EvalConfig
from uipe.faults import NONE, Faults
from uipe.results import TrialResult


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, as plain values (pickled into each trial actor)."""

    theta_ini: str
    epoch_dirs: dict[int, str]
    benchmark: str  # a name in uipe.benchmarks: the evaluator and the metric names
    data: str
    forget_split: str
    template: str
    max_length: int
    eval: EvalConfig
    reference: str | None  # the retain reference (forget quality); None for a reference-free search
    dtype: str
    threads: int
    # forms beyond one alpha (uipe.coefficients): the groups form's groups (None: the default groups) and the
    # weighted form's importance folder per epoch (uipe.search.importance)
    groups: dict[str, Group] | None = None
    importance: dict[int, str] | None = None

    def identity(self) -> dict[str, Any]:
        doc = {**asdict(self), "eval": self.eval.model_dump()}
        for key in ("groups", "importance"):  # absent when unused: a global search keeps its identity
            if doc[key] is None:
                del doc[key]
        if self.groups is not None:
            doc["groups"] = {g: spec.model_dump() for g, spec in self.groups.items()}
        return doc


_CONTEXT: dict[str, tuple] = {}  # per process: (model, evaluator, device), kept across trials and searches
_EVALUATOR: dict[str, Any] = {}  # per process: the evaluator of the setup it last served
_EXTRAPOLATED: set[str] = set()  # context keys whose model holds an extrapolated point, not theta_ini
_SCREENED: dict[tuple, tuple] = {}  # (context key, epoch, alpha, coefficients) -> a scoring pass's scores


def _key(setup: TrialSetup) -> str:
    return json.dumps(setup.identity(), sort_keys=True, default=str)


def _context_key(setup: TrialSetup) -> str:
    """What the loaded model and evaluator depend on: not the checkpoints a search extrapolates from (every trial
    writes each weight anew), so the searches of several methods from one theta_ini share them."""
    doc = {k: v for k, v in setup.identity().items() if k not in ("epoch_dirs", "groups", "importance")}
    return json.dumps(doc, sort_keys=True, default=str)


def context(setup: TrialSetup, pristine: bool = False) -> tuple:
    """The loaded model, evaluator (retain reference set) and device for this setup, built once per process;
    `pristine`: the model must be theta_ini itself (reloaded if a trial in this process has extrapolated it)."""
    key = _context_key(setup)
    if key not in _CONTEXT or (pristine and key in _EXTRAPOLATED):
        import torch

        from uipe.models import default_device, load_model

        torch.set_num_threads(setup.threads)
        device = default_device()
        model = load_model(setup.theta_ini, dtype=setup.dtype, device=device)
        _CONTEXT.clear()
        _EXTRAPOLATED.clear()
        _CONTEXT[key] = (model, cached_evaluator(setup), device)
    if not pristine:  # the caller is about to extrapolate into it
        _EXTRAPOLATED.add(key)
    return _CONTEXT[key]


def cached_evaluator(setup: TrialSetup) -> Any:
    """The setup's evaluator, built once per process (a sharded trial group's model is built per point instead)."""
    key = _context_key(setup)
    if key not in _EVALUATOR:
        _EVALUATOR.clear()
        _EVALUATOR[key] = build_evaluator(setup)
    return _EVALUATOR[key]


def build_evaluator(setup: TrialSetup) -> Any:
    """The benchmark's evaluator for the setup, its reference loaded when the setup names one."""
    from uipe.benchmarks import get_benchmark
    from uipe.models import load_tokenizer

    return get_benchmark(setup.benchmark).evaluator(setup.data, setup.forget_split, load_tokenizer(setup.theta_ini),
                                                    setup.template, setup.eval, setup.max_length, setup.reference)


def utility_metric(setup: TrialSetup, generate: bool = True) -> str:
    """The benchmark's utility metric (a full pass), or the proxy a scoring pass reports instead."""
    from uipe.benchmarks import get_benchmark

    bench = get_benchmark(setup.benchmark)
    return bench.utility if generate else bench.screening_utility


def scored_metrics(aggregates: Mapping[str, float], start: Mapping[str, float] | None) -> dict[str, float]:
    """The evaluator's aggregates, forgetting relative to theta_ini's (`start`), and the catalogue's derived
    metrics (an objective defined as a function of the others)."""
    from uipe import metrics
    from uipe.eval.metrics import relative_to_start

    out = dict(aggregates) | relative_to_start(aggregates, start or {})
    return out | metrics.derive_all(out)


@dataclass(frozen=True)
class Resolved:
    """A point made concrete for one setup: the folders the kernel reads and the per-tensor coefficients."""

    point: Extrapolation  # with its summary alpha
    base: str  # theta_ini, or the anchor epoch's checkpoint
    unlearned: str
    importance: str | None
    coefficients: Coefficients


def resolve_point(setup: TrialSetup, point: Extrapolation) -> Resolved:
    """The point's folders and coefficients (headers only are read); UipeError naming a bad group pattern, a
    coefficient vector of the wrong length, an anchor without a checkpoint or a missing importance folder."""
    from uipe.coefficients import resolve
    from uipe.errors import UipeError
    from uipe.safetensors_io import read_checkpoint

    if point.anchor and point.anchor not in setup.epoch_dirs:
        raise UipeError(f"anchor epoch {point.anchor}: no checkpoint (have {sorted(setup.epoch_dirs)})")
    base = setup.theta_ini if point.anchor == 0 else setup.epoch_dirs[point.anchor]
    importance = None
    if point.retain_lambda is not None:
        importance = (setup.importance or {}).get(point.epoch)
        if importance is None or not Path(importance).is_dir():
            raise UipeError(f"epoch {point.epoch}: the weighted form's importance folder is missing ({importance})")
    unlearned = setup.epoch_dirs[point.epoch]
    sizes = {k: math.prod(spec[1]) for k, spec in read_checkpoint(unlearned).specs.items()}
    point, coef = resolve(point, sizes, setup.groups, "search space groups")
    return Resolved(point, base, unlearned, importance, coef)


def evaluate_point(setup: TrialSetup, alpha: float | Extrapolation, epoch: int, utility_threshold: float,
                   objective_metric: str | None = None, start: Mapping[str, float] | None = None,
                   generate: bool = True) -> TrialResult:
    """Extrapolate in memory and evaluate (with `start`, theta_ini's aggregates, also forgetting relative to it);
    raise when the extrapolated model's metrics are not finite. `alpha`: a plain alpha at `epoch`, or a point of
    any form (uipe.coefficients.Extrapolation; its own epoch). generate=False: a screening pass, every scoring
    metric (forget quality, probabilities, truth ratios) without greedy generation, ROUGE-L or model utility."""
    from uipe.models import peak_memory_bytes, reset_peak_memory
    from uipe.update_vector import cached_update_vector

    t0 = time.perf_counter()
    point = alpha if isinstance(alpha, Extrapolation) else Extrapolation(int(epoch), float(alpha))
    model, evaluator, device = context(setup)
    reset_peak_memory(device)
    r = resolve_point(setup, point)
    cached_update_vector(r.base, r.unlearned, device=device, importance=r.importance).apply(model, r.coefficients)
    point = r.point
    # the full pass of a point this process has just screened reuses its scores (same weights: the extrapolation
    # depends only on the point), so it pays only for generation
    key = (_key(setup), point.epoch, point.alpha, tuple(sorted(point.vector().items())))
    result = evaluator.evaluate(model, generate=generate, scores=None if not generate else _SCREENED.pop(key, None))
    _SCREENED.clear()
    if not generate:
        _SCREENED[key] = result.scores
    if objective_metric is None:  # the benchmark's default objective
        from uipe.benchmarks import get_benchmark

        objective_metric = get_benchmark(setup.benchmark).default_objective
    return record_point(setup, point, result.aggregates, start, utility_threshold, objective_metric,
                        time.perf_counter() - t0, peak_memory_bytes(device), generate)


def record_point(setup: TrialSetup, point: Extrapolation, aggregates: Mapping[str, float],
                 start: Mapping[str, float] | None, utility_threshold: float, objective_metric: str, seconds: float,
                 peak_memory: float, generate: bool = True) -> TrialResult:
    """The trial's record from an evaluation; raise when the objective or utility is not finite."""
    metrics = scored_metrics(aggregates, start)
    needed = (objective_metric, utility_metric(setup, generate))
    bad = [k for k in needed if not math.isfinite(metrics.get(k, math.nan))]
    if bad:
        raise ValueError(f"alpha={point.alpha} epoch={point.epoch} {point.vector()}: {bad[0]} is not finite (the "
                         "extrapolated model broke)")
    return TrialResult.scored(point.alpha, point.epoch, metrics, utility_threshold, seconds, objective_metric,
                              utility_metric(setup), peak_memory_bytes=peak_memory, coefficients=point.vector())


def theta_ini_metrics(setup: TrialSetup) -> dict[str, float]:
    """The start model's evaluation: the utility the search's floor refers to."""
    model, evaluator, _ = context(setup, pristine=True)
    return evaluator.evaluate(model).aggregates


THETA_INI = "theta_ini"  # the kind of pool call that evaluates the start model itself (no point)


@dataclass(frozen=True)
class TrialCall:
    """What every trial of one search evaluates against, put in Ray's object store once per search and read by the
    pool's workers (uipe/search/pool.py); a Tune trial passes it on unread."""

    setup: TrialSetup
    utility_threshold: float
    objective_metric: str
    catalogue: Mapping[str, Any]
    faults: Faults = NONE
    start: Mapping[str, float] | None = None


def warm(call: TrialCall) -> None:
    """Load what the call's trials need (imports, model, evaluator) before the first trial asks."""
    context(call.setup)


def evaluate_call(call: TrialCall, config: dict, kind: str, screened_seconds: float = 0.0) -> dict | None:
    """One pass of a trial in a pool worker, as the report Tune keeps. kind "screen": the scoring pass of a point
    other than the base method's (None for the base point, which is evaluated in full only); "full": the full
    evaluation, its time counting `screened_seconds` of the scoring pass before it; THETA_INI: the start model's
    evaluation (`config` unread), which the search's floor refers to."""
    from uipe import metrics

    metrics.adopt(call.catalogue)  # entries the driver registered at run time (a user's objective)
    if kind == THETA_INI:
        return theta_ini_metrics(call.setup)
    point = Extrapolation.from_config(config)
    if kind == "screen" and point.is_base:
        return None
    if kind == "screen" or screened_seconds == 0.0:  # the trial's first pass: where a test's fault strikes it
        call.faults.point("trial", alpha=point.alpha, epoch=point.epoch)  # tests only: see uipe/faults.py
    result = evaluate_point(call.setup, point, point.epoch, call.utility_threshold, call.objective_metric, call.start,
                            generate=kind == "full")
    if kind == "full":  # the trial's work is both passes; the screening part is kept apart for the search's split
        result = replace(result, trial_seconds=result.trial_seconds + screened_seconds,
                         screen_seconds=screened_seconds)
    return {**result.to_report(), "alpha": result.alpha, "epoch": point.epoch}
