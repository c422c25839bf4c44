"""TrialResult: one typed record per search trial, from the trial worker to the table, plots, MLflow and summary.

The trial reports it to Tune as a flat dict (`to_report`); the driver rebuilds it from Tune's results
(`from_tune`). Its field names are the one list of result columns: the CSV, the summary and the console table read
them from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

NAN = math.nan
CONSTRAINT = "utility_constraint"  # floor * MU(theta_ini) - MU(trial): feasible when <= 0 (Optuna's convention)
# The evaluator's aggregates a result carries by name (every other aggregate stays in `metrics`).
# Tune's own bookkeeping in every reported result: not the trial's metrics.
TUNE_KEYS = frozenset({"timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid", "time_since_restore",
                       "iterations_since_restore", "done", "alpha", "epoch"})
FULL_FIDELITY = "full_fidelity"  # reported 1.0 by a full evaluation, 0.0 by a screening pass
HEADLINE = ("forget_quality", "forget_quality_select", "forget_quality_report", "model_utility", "forget_prob",
            "forget_rougeL", "related_prob", "related_rougeL", "related_forget_quality", "holdout_ks", "mia_loss_auc",
            "mia_min_k_pp_auc")


@dataclass(frozen=True)
class TrialResult:
    """One (alpha, epoch) point: UIPE's theta_un + alpha*(theta_un - theta_ini) at that epoch's checkpoint, scored."""

    trial_id: str
    status: str  # "ok" or "failed"
    alpha: float
    epoch: int
    forget_quality: float = NAN
    forget_quality_select: float = NAN  # forget quality on the selection / report author fold (uipe study)
    forget_quality_report: float = NAN
    model_utility: float = NAN
    feasible: bool = False
    objective: float = NAN  # what the search maximises: forget quality, or the space's reference-free signal
    forget_prob: float = NAN
    forget_rougeL: float = NAN  # noqa: N815 - TOFU's metric name
    related_prob: float = NAN
    related_rougeL: float = NAN  # noqa: N815
    related_forget_quality: float = NAN
    holdout_ks: float = NAN  # reference-free signals (uipe.eval): where the data has a holdout split
    mia_loss_auc: float = NAN
    mia_min_k_pp_auc: float = NAN
    utility_constraint: float = NAN
    trial_seconds: float = NAN
    peak_memory_bytes: float = NAN  # the trial process's: CUDA allocated peak of this trial, else peak RSS
    error: str = ""
    # "full": every metric, ROUGE-L and model utility included; "screen": a scoring pass only (search.screening), so
    # no model utility and never feasible: such a point is never chosen nor reported at a floor
    fidelity: str = "full"
    metrics: Mapping[str, float] = field(default_factory=dict)  # the evaluator's other aggregates (retain_prob, ...)

    def __post_init__(self) -> None:
        if math.isnan(self.objective):  # forget quality is the objective unless the search said otherwise
            object.__setattr__(self, "objective", self.forget_quality)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def full(self) -> bool:
        """Completed at full fidelity: the only trials a choice, a front or a floor may use."""
        return self.ok and self.fidelity == "full"

    @classmethod
    def scored(cls, alpha: float, epoch: int, aggregates: Mapping[str, float], threshold: float,
               seconds: float, trial_id: str = "", peak_memory_bytes: float = NAN,
               objective_metric: str = "forget_quality") -> TrialResult:
        """A completed trial from the evaluator's aggregates and the utility threshold (floor x MU(theta_ini)); without
        model utility (a screening pass generates nothing) a screened trial, infeasible until evaluated in full."""
        screened = "model_utility" not in aggregates
        constraint = NAN if screened else threshold - aggregates["model_utility"]
        named = {k: float(aggregates[k]) for k in HEADLINE if k in aggregates}
        return cls(trial_id, "ok", float(alpha), int(epoch), feasible=constraint <= 0, utility_constraint=constraint,
                   fidelity="screen" if screened else "full",
                   objective=float(aggregates.get(objective_metric, NAN)),
                   trial_seconds=seconds, peak_memory_bytes=peak_memory_bytes,
                   metrics={k: float(v) for k, v in aggregates.items() if k not in named},
                   **named)

    @classmethod
    def failed(cls, trial_id: str, alpha: float, epoch: int, error: str) -> TrialResult:
        return cls(trial_id, "failed", float(alpha), int(epoch), error=error)

    def to_report(self) -> dict[str, float]:
        """What the trial reports to Tune: every number (Tune, Optuna and the MLflow child run read these), the
        fidelity as `full_fidelity` 1/0."""
        return {**self.metrics, **self.numbers(), FULL_FIDELITY: float(self.fidelity == "full")}

    def numbers(self) -> dict[str, float]:
        """The record's own numeric fields (feasible as 0/1), for CSV, MLflow and summary.json."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                out[f.name] = float(v)
            elif isinstance(v, (int, float)):
                out[f.name] = v
        return out

    @classmethod
    def from_report(cls, trial_id: str, config: Mapping[str, Any], reported: Mapping[str, Any]) -> TrialResult:
        """Rebuild the record from what Tune kept of a trial's report."""
        numeric = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        own = {f.name for f in fields(cls)}
        named = {k: numeric[k] for k in HEADLINE + (CONSTRAINT, "objective", "trial_seconds", "peak_memory_bytes")
                 if k in numeric}
        return cls(trial_id, "ok", float(config["alpha"]), int(config["epoch"]),
                   feasible=numeric.get("feasible", 0.0) > 0,
                   fidelity="full" if numeric.get(FULL_FIDELITY, 1.0) else "screen",
                   metrics={k: v for k, v in numeric.items() if k not in own and k not in TUNE_KEYS | {FULL_FIDELITY}},
                   **named)

    def summary(self) -> dict[str, Any]:
        """The point as summary.json and the console table show it."""
        return {"alpha": self.alpha, "epoch": self.epoch, "feasible": self.feasible, "objective": _or_none(self.objective),
                **{k: _or_none(getattr(self, k)) for k in HEADLINE}}


COLUMNS = [f.name for f in fields(TrialResult) if f.name != "metrics"]


def _or_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x
