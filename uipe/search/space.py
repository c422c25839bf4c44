"""Search spaces (tune_spaces/<method>.yaml), validated with pydantic, and the Optuna searcher built from one.

The searcher maximises the objective (a metric of the benchmark's catalogue: TOFU's forget quality, or a
reference-free signal) subject to utility >= floor x utility of theta_ini. The constraint is set
per trial with Optuna 5's `trial.set_constraint` (feasible when <= 0) from a small OptunaSearch subclass: Optuna 5
deprecates samplers' constraints_func, and a lambda would not pickle when Tune checkpoints the searcher.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from ray.tune.search.optuna import OptunaSearch

from uipe import metrics
from uipe.benchmarks import OBJECTIVE_MODES, Benchmark
from uipe.config import MethodName
from uipe.errors import UipeError
from uipe.methods import check_method
from uipe.results import CONSTRAINT, FULL_FIDELITY
from uipe.schema import Strict, one_line


class AlphaRange(Strict):
    low: float = 0.0
    high: float = 2.0
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> AlphaRange:
        if not self.low < self.high:
            raise ValueError(f"alpha bounds reversed or empty: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log alpha range needs low > 0")
        return self


class SearchSpace(Strict):
    method: MethodName
    alpha: AlphaRange = AlphaRange()
    epochs: Literal["all"] | list[int] = "all"
    sampler: Literal["tpe", "gp", "nsga2", "grid"] = "tpe"
    grid_step: float = Field(0.1, gt=0)
    startup_trials: int = Field(6, ge=0)
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    # A catalogue objective (uipe/metrics.py; default: the benchmark's, TOFU's forget quality, which needs a retain
    # reference); pareto: the benchmark's default objective and utility; reference_free: maximise `signal`, measured
    # without a retain model (TOFU: against the holdout split; default: the benchmark's default signal).
    objective: str | None = None
    signal: str | None = None
    utility_floor: float = Field(0.95, ge=0)
    # all: forget quality over the whole forget split; selection_fold: over the selection author fold only, so the
    # chosen point can be reported on the report fold, items the choice never saw (uipe study).
    select_on: Literal["all", "selection_fold"] = "all"

    @field_validator("objective")
    @classmethod
    def _objective(cls, name: str | None) -> str | None:
        problem = None if name is None else metrics.objective_problem(name, also=OBJECTIVE_MODES)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("signal")
    @classmethod
    def _signal(cls, name: str | None) -> str | None:
        problem = None if name is None else metrics.objective_problem(name, reference_free=True)
        if problem:
            raise ValueError(problem)
        return name

    def objective_metric(self, benchmark: Benchmark) -> str:
        """The catalogue metric the search maximises (reported by every trial as `objective`)."""
        return benchmark.objective_metric(self.objective, self.signal, self.select_on)

    def alpha_grid(self) -> list[float]:
        n = int(round((self.alpha.high - self.alpha.low) / self.grid_step))
        return [round(self.alpha.low + i * self.grid_step, 10) for i in range(n + 1)]

    def candidate_epochs(self, available: list[int]) -> list[int]:
        if self.epochs == "all":
            return sorted(available)
        missing = [e for e in self.epochs if e not in available]
        if missing:
            raise UipeError(f"space file: epochs: epoch {missing[0]} has no checkpoint (have {sorted(available)})")
        return sorted(set(self.epochs))

    def trials_needed(self, epochs: list[int]) -> int:
        # at least the base method at every epoch (points evaluated first), then the sampler's own trials
        return len(self.alpha_grid()) * len(epochs) if self.sampler == "grid" else max(self.num_samples, len(epochs))


def default_space_path(method: str, space_dir: str = "tune_spaces") -> Path:
    """<space_dir>/<method>.yaml relative to the working directory (a user's own spaces), else the default space
    shipped inside the package (uipe/tune_spaces, the repository's tune_spaces/ in a wheel)."""
    for path in (Path.cwd() / space_dir / f"{method}.yaml",
                 Path(str(resources.files("uipe") / "tune_spaces" / f"{method}.yaml"))):
        if path.is_file():
            return path
    raise UipeError(f"{space_dir}/{method}.yaml: space file not found (pass --space FILE)")


def load_space(path: str | Path, method: str) -> SearchSpace:
    path = Path(path)
    check_method(method)
    if not path.is_file():
        raise UipeError(f"{path}: space file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        space = SearchSpace.model_validate(raw)
    except yaml.YAMLError as e:
        raise UipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        raise UipeError(one_line(e, str(path))) from None
    if space.method != method:
        raise UipeError(f"{path}: method: the file is for {space.method!r}, not {method!r}")
    return space


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that records each trial's utility constraint before telling Optuna its value."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and CONSTRAINT in result:
            # a trial stopped after its screening pass has no utility: infeasible to the sampler (a point evaluated
            # in full dominates it), while its objective, exact at screening, still informs the model
            screened = not result.get(FULL_FIDELITY, 1.0)
            ot_trial.set_constraint(CONSTRAINT, 1.0 if screened else float(result[CONSTRAINT]))
        super().on_trial_complete(trial_id, result=result, error=error)


def _sampler(space: SearchSpace, epochs: list[int], seed: int):
    import optuna

    if space.sampler == "grid":
        return optuna.samplers.GridSampler({"alpha": space.alpha_grid(), "epoch": epochs}, seed=seed)
    if space.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=space.startup_trials)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials, constant_liar=True)


def build_searcher(space: SearchSpace, epochs: list[int], seed: int) -> ConstrainedOptunaSearch:
    """The base method first: alpha 0 at the last epoch, then at every other epoch, so every result shows its gain
    over the plain method at its best epoch. The grid holds those points already."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {"alpha": FloatDistribution(space.alpha.low, space.alpha.high, log=space.alpha.log),
             "epoch": CategoricalDistribution(epochs)}
    start = 0.0 if space.alpha.low <= 0 <= space.alpha.high else space.alpha.low
    base = [{"alpha": start, "epoch": e} for e in reversed(epochs)]
    if space.objective == "pareto":
        metric, mode = ["objective", "utility"], ["max", "max"]
    else:
        metric, mode = "objective", "max"
    first = None if space.sampler == "grid" else base
    return ConstrainedOptunaSearch(space=dists, metric=metric, mode=mode, points_to_evaluate=first,
                                   sampler=_sampler(space, epochs, seed))
