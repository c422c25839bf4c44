"""TrialResult: one typed record per search trial, from the trial worker to the decisions, table, plots, MLflow and
summary.

The record holds the core fields every benchmark shares (the point, its objective and utility, feasibility,
fidelity, timings, status) and a `metrics` mapping of everything the benchmark's evaluator reported, by catalogue
name (uipe/metrics.py): a name the catalogue does not know is refused where a record is built from an evaluation.
The trial reports it to Tune as a flat dict (`to_report`); the driver rebuilds it from what Tune kept (`from_report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from uipe import benchmarks  # noqa: F401 - imported for its effect: every benchmark's metrics in the catalogue
from uipe import metrics as catalogue
from uipe.coefficients import GROUP_PREFIX, is_coefficient

NAN = math.nan
CONSTRAINT = "utility_constraint"  # floor * utility(theta_ini) - utility(trial): feasible when <= 0 (Optuna's rule)
FULL_FIDELITY = "full_fidelity"  # reported 1.0 by a full evaluation, 0.0 by a screening pass


@dataclass(frozen=True)
class TrialResult:
    """One (alpha, epoch) point: UIPE's theta_un + alpha*(theta_un - theta_ini) at that epoch's checkpoint, scored."""

    trial_id: str
    status: str  # "ok" or "failed"
    alpha: float
    epoch: int
    objective: float = NAN  # what the search maximises (the space's objective metric, oriented to be maximised)
    utility: float = NAN  # the benchmark's utility metric (TOFU: model utility); NaN after a screening pass
    feasible: bool = False
    utility_constraint: float = NAN
    # "full": every metric, generation included; "screen": a scoring pass only (search.screening), so no utility and
    # never feasible: such a point is never chosen nor reported at a floor
    fidelity: str = "full"
    trial_seconds: float = NAN
    screen_seconds: float = 0.0  # the screening pass's part of trial_seconds
    peak_memory_bytes: float = NAN  # the trial process's: CUDA allocated peak of this trial, else peak RSS
    error: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)  # the evaluator's aggregates, by catalogue name
    # beyond (alpha, epoch): a form's coefficient vector (alpha_<group>, retain_lambda, anchor_epoch), empty for the
    # global form; `alpha` is then the form's summary (uipe.coefficients.Extrapolation)
    coefficients: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_base(self) -> bool:
        """The base method's own checkpoint: alpha 0 and every group's alpha 0."""
        return self.alpha == 0.0 and not any(v for k, v in self.coefficients.items() if k.startswith(GROUP_PREFIX))

    @property
    def full(self) -> bool:
        """Completed at full fidelity: the only trials a choice, a front or a floor may use."""
        return self.ok and self.fidelity == "full"

    def metric(self, name: str) -> float:
        """A reported metric by catalogue name; NaN where this trial did not report it."""
        return float(self.metrics.get(name, NAN))

    @classmethod
    def scored(cls, alpha: float, epoch: int, aggregates: Mapping[str, float], threshold: float, seconds: float,
               objective_metric: str, utility_metric: str, trial_id: str = "",
               peak_memory_bytes: float = NAN, coefficients: Mapping[str, float] | None = None) -> TrialResult:
        """A completed trial from the evaluator's aggregates and the utility threshold (floor x utility(theta_ini));
        without the utility metric (a screening pass generates nothing) a screened trial, infeasible until evaluated
        in full."""
        unknown = sorted(k for k in aggregates if not catalogue.known(k))
        if unknown:
            raise ValueError(f"metric {unknown[0]!r}: reported by the evaluator but not in the metric catalogue")
        values = {k: float(v) for k, v in aggregates.items()}
        screened = utility_metric not in values
        utility = NAN if screened else values[utility_metric]
        constraint = NAN if screened else threshold - utility
        objective = catalogue.oriented(objective_metric, values.get(objective_metric, NAN))
        return cls(trial_id, "ok", float(alpha), int(epoch), objective=objective, utility=utility,
                   feasible=constraint <= 0, utility_constraint=constraint,
                   fidelity="screen" if screened else "full", trial_seconds=seconds,
                   peak_memory_bytes=peak_memory_bytes, metrics=values, coefficients=dict(coefficients or {}))

    @classmethod
    def failed(cls, trial_id: str, alpha: float, epoch: int, error: str) -> TrialResult:
        return cls(trial_id, "failed", float(alpha), int(epoch), error=error)

    def to_report(self) -> dict[str, float]:
        """What the trial reports to Tune: every number (Tune, Optuna and the MLflow child run read these), the
        fidelity as `full_fidelity` 1/0."""
        return {**self.metrics, **self.numbers(), **self.coefficients, FULL_FIDELITY: float(self.fidelity == "full")}

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
        """Rebuild the record from what Tune kept of a trial's report: the core fields by name, the metrics by
        catalogue name (Tune's own bookkeeping is neither)."""
        numeric = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        core = {k: numeric[k] for k in NUMERIC_CORE if k in numeric}
        # a form's summary alpha is the trial's to report (the groups form's config has one alpha per group)
        alpha = float(reported.get("alpha", config.get("alpha", NAN)))
        return cls(trial_id, "ok", alpha, int(config["epoch"]),
                   feasible=numeric.get("feasible", 0.0) > 0,
                   fidelity="full" if numeric.get(FULL_FIDELITY, 1.0) else "screen",
                   metrics={k: v for k, v in numeric.items() if catalogue.known(k) and k not in CORE},
                   coefficients={k: v for k, v in numeric.items() if is_coefficient(k)}, **core)

    def summary(self) -> dict[str, Any]:
        """The point as summary.json and the console tables show it: core fields and the headline metrics."""
        return {"alpha": self.alpha, "epoch": self.epoch, **self.coefficients, "feasible": self.feasible,
                "objective": or_none(self.objective), "utility": or_none(self.utility),
                **{k: or_none(self.metric(k)) for k in catalogue.benchmark_headline(self.metrics)}}


CORE = [f.name for f in fields(TrialResult) if f.name not in ("metrics", "coefficients")]
NUMERIC_CORE = ("objective", "utility", CONSTRAINT, "trial_seconds", "screen_seconds", "peak_memory_bytes")


def search_label(method: str, form: str) -> str:
    """A search's name and folder under search/: the method for the paper's one alpha, else method-form, "-anchor"
    added when the anchor epoch is searched too (form "groups+anchor" -> "ga-groups-anchor")."""
    return method if form == "global" else f"{method}-{form.replace('+', '-')}"


def or_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@dataclass(frozen=True)
class SearchOutcome:
    """What a finished search returns and result.json holds: the chosen point and the base method's (as
    TrialResult.summary() gives them), theta_ini's headline metrics, the best points at each utility floor, the
    front, and the search's counts and costs. `objective` and `utility_metric` are catalogue names."""

    method: str
    objective: str
    utility_metric: str
    chosen: Mapping[str, Any]
    base: Mapping[str, Any] | None
    theta_ini: Mapping[str, float | None]
    utility_threshold: float
    feasible: bool
    trials: int
    failed: int
    pareto_front: list[Mapping[str, Any]]
    floors: Mapping[str, Mapping[str, Mapping[str, Any] | None]]  # floor key -> {"base": point, "uipe": point}
    search_seconds: float
    trial_work_seconds: float
    fidelity: Mapping[str, float]  # full / screened_only counts, screening / full seconds
    tune_overhead: float | None  # (wall x slots - trial work) / (wall x slots)
    max_concurrent_trials: int
    parent_run_id: str
    chosen_model: str = ""
    registered: Mapping[str, Any] | None = None  # the registry's name, version, alias and source
    form: str = "global"  # the extrapolation form searched (uipe.coefficients), "+anchor" when the anchor was too

    @property
    def label(self) -> str:
        """The search's name and folder under search/."""
        return search_label(self.method, self.form)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> SearchOutcome:
        """A result.json read back; UipeError naming the file and the first missing key otherwise."""
        from uipe.errors import UipeError

        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in doc]
        if missing:
            raise UipeError(f"{where}: not a search result (no {missing[0]!r}); remove it to search again")
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})
