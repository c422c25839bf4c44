"""Search spaces (tune_spaces/<method>.yaml), validated with pydantic, and the Optuna searcher built from one.

The searcher maximises the objective (a metric of the benchmark's catalogue: TOFU's forget quality, or a
reference-free signal) subject to utility >= floor x utility of theta_ini. The constraint is set per trial with
Optuna 5's `trial.set_constraint` (feasible when <= 0) from a small OptunaSearch subclass (uipe/search/searcher.py):
Optuna 5 deprecates samplers' constraints_func, and a lambda would not pickle when Tune checkpoints the searcher.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from uipe import metrics
from uipe.benchmarks import OBJECTIVE_MODES, Benchmark
from uipe.coefficients import ANCHOR_KEY, DEFAULT_GROUPS, GROUP_PREFIX, LAMBDA_KEY, Group
from uipe.config import MethodName
from uipe.errors import UipeError
from uipe.methods import check_method
from uipe.results import search_label
from uipe.schema import Strict, one_line
from uipe.search.searcher import ConstrainedOptunaSearch  # also here: the name pickled in earlier search folders


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


class WeightedSpace(Strict):
    """The weighted form (uipe.coefficients): s = f_forget / (f_forget + retain_lambda * f_retain) per element."""

    retain_lambda: AlphaRange = AlphaRange(low=0.01, high=100.0, log=True)
    # s <= 1 shrinks every step, so the form's alpha range is the space's times this
    alpha_scale: float = Field(2.0, gt=0)
    items: int = Field(64, ge=1)  # forget items (and as many retain items) per Fisher estimate


class SearchSpace(Strict):
    method: MethodName
    alpha: AlphaRange = AlphaRange()
    epochs: Literal["all"] | list[int] = "all"
    # cmaes: CMA-ES over a form's continuous coefficients (groups, weighted), the epoch and anchor gap (categorical,
    # which CMA-ES cannot model) drawn by TPE; it reads no constraint, so an infeasible trial is told a value below
    # every feasible one (ConstrainedOptunaSearch)
    sampler: Literal["tpe", "gp", "nsga2", "grid", "cmaes"] = "tpe"
    grid_step: float = Field(0.1, gt=0)
    startup_trials: int = Field(6, ge=0)
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    # A sampler that learns from finished trials (tpe, gp, nsga2) suggests from whichever trials have finished, so
    # with trials in flight a seed alone does not fix the search: a slower trial changes every later suggestion.
    # deterministic: the sampler is told finished trials in the order they were suggested, each suggestion once the
    # trials it may see have finished (ConstrainedOptunaSearch), so a seed repeats the search trial for trial however
    # the trials are timed. Off by default: where it has to wait, Ray 2.60's Tune stops a trial process it could have
    # reused, and its searches then ran ~1.4x longer (docs/BENCHMARKS.md); `uipe study` turns it on.
    deterministic: bool = False
    # A catalogue objective (uipe/metrics.py; default: the benchmark's, TOFU's forget quality, which needs a retain
    # reference); pareto: the benchmark's default objective and utility; reference_free: maximise `signal`, measured
    # without a retain model (TOFU: against the holdout split; default: the benchmark's default signal).
    objective: str | None = None
    signal: str | None = None
    utility_floor: float = Field(0.95, ge=0)
    # all: forget quality over the whole forget split; selection_fold: over the selection author fold only, so the
    # chosen point can be reported on the report fold, items the choice never saw (uipe study).
    select_on: Literal["all", "selection_fold"] = "all"
    # Beyond one alpha (uipe.coefficients): global (the paper's), groups (one alpha per parameter group, each in the
    # alpha range; groups: name -> patterns and depth, default: embeddings, attention and MLP of each third of the
    # blocks, final norm and head), weighted (alpha times importance scales); anchor: also search the base epoch
    # e' < e to extrapolate from (theta_e + alpha*(theta_e - theta_e'), ExPO). A form with more dimensions gets
    # trials_per_extra_dimension more trials per dimension beyond (alpha, epoch).
    form: Literal["global", "groups", "weighted"] = "global"
    groups: dict[str, Group] | None = None
    weighted: WeightedSpace = WeightedSpace()
    anchor: bool = False
    trials_per_extra_dimension: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _form(self) -> SearchSpace:
        if self.sampler == "grid" and (self.form != "global" or self.anchor):
            raise ValueError(f"sampler grid: searches the global form only (form {self.form}, anchor {self.anchor})")
        if self.sampler == "cmaes" and self.form == "global":
            raise ValueError("sampler cmaes: needs at least two continuous coefficients (form groups or weighted); "
                             "the global form has one (alpha)")
        if self.sampler == "cmaes" and self.objective == "pareto":
            raise ValueError("sampler cmaes: optimises one objective, not pareto")
        if self.groups is not None and not self.groups:
            raise ValueError("groups: name at least one group (or leave it out for the default groups)")
        return self

    @property
    def beyond_global(self) -> bool:
        return self.form != "global" or self.anchor

    @property
    def form_name(self) -> str:
        """The form searched, "+anchor" when the anchor epoch is searched too: "global", "groups+anchor", ..."""
        return self.form + ("+anchor" if self.anchor else "")

    def label(self, method: str) -> str:
        """The search's name and folder (uipe.results.search_label); "-cmaes" added for a CMA-ES search, so it can
        sit beside the same form's TPE search in one run folder."""
        return search_label(method, self.form_name) + ("-cmaes" if self.sampler == "cmaes" else "")

    def group_names(self) -> list[str]:
        return list(self.groups or DEFAULT_GROUPS)

    def dimensions(self) -> int:
        """Searched dimensions, the epoch included: (alpha, epoch) for the global form."""
        coefficients = {"global": 1, "groups": len(self.group_names()), "weighted": 2}[self.form]
        return coefficients + 1 + int(self.anchor)

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
        # at least the base method at every epoch (points evaluated first), then the sampler's own trials; a form
        # with more dimensions gets more (the space file states how many per dimension)
        if self.sampler == "grid":
            return len(self.alpha_grid()) * len(epochs)
        extra = self.trials_per_extra_dimension * (self.dimensions() - 2)
        return max(self.num_samples + extra, len(epochs))


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


def _sampler(space: SearchSpace, epochs: list[int], seed: int):
    import optuna

    if space.sampler == "grid":
        return optuna.samplers.GridSampler({"alpha": space.alpha_grid(), "epoch": epochs}, seed=seed)
    if space.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=space.startup_trials)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if space.sampler == "cmaes":
        # its mean starts mid-box (x0, which could start it at the warm point, is deprecated in Optuna 5; the warm
        # point is still evaluated first); the epoch and anchor gap, categorical, come from TPE
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=space.startup_trials, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials))
    # more than (alpha, epoch): multivariate TPE models the coefficients jointly (group alphas interact)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials, constant_liar=True,
                                      multivariate=space.beyond_global)


def distributions(space: SearchSpace, epochs: list[int]) -> dict:
    """Optuna's distributions of the space's form: alpha (or one alpha per group), retain_lambda, the anchor gap."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    a = space.alpha
    if space.form == "groups":
        dists = {f"{GROUP_PREFIX}{g}": FloatDistribution(a.low, a.high, log=a.log) for g in space.group_names()}
    elif space.form == "weighted":
        k, lam = space.weighted.alpha_scale, space.weighted.retain_lambda
        dists = {"alpha": FloatDistribution(a.low * k, a.high * k, log=a.log),
                 LAMBDA_KEY: FloatDistribution(lam.low, lam.high, log=lam.log)}
    else:
        dists = {"alpha": FloatDistribution(a.low, a.high, log=a.log)}
    dists["epoch"] = CategoricalDistribution(epochs)
    if space.anchor:  # e' = e - gap, theta_ini once the gap reaches e
        dists[ANCHOR_KEY] = CategoricalDistribution(list(range(1, max(epochs) + 1)))
    return dists


def start_points(space: SearchSpace, epochs: list[int], warm: dict | None = None) -> list[dict]:
    """The base method at every epoch, last epoch first (every coefficient at 0, or the range's low end), then
    `warm`: a point of the global form (alpha, epoch) carried into this form (each group at that alpha; the weighted
    form at that alpha with the smallest retain_lambda, where s is near 1 wherever the forget loss moves)."""
    start = 0.0 if space.alpha.low <= 0 <= space.alpha.high else space.alpha.low

    def point(alpha: float, epoch: int) -> dict:
        if space.form == "groups":
            out = {f"{GROUP_PREFIX}{g}": alpha for g in space.group_names()}
        elif space.form == "weighted":
            out = {"alpha": alpha, LAMBDA_KEY: space.weighted.retain_lambda.low}
        else:
            out = {"alpha": alpha}
        out["epoch"] = epoch
        if space.anchor:
            out[ANCHOR_KEY] = max(epochs)  # from theta_ini: the paper's operator
        return out

    points = [point(start, e) for e in reversed(epochs)]
    if warm and warm.get("epoch") in epochs and space.beyond_global:
        points.append(point(float(warm["alpha"]), int(warm["epoch"])))
    return points


def build_searcher(space: SearchSpace, epochs: list[int], seed: int,
                   warm: dict | None = None) -> ConstrainedOptunaSearch:
    """The base method first: alpha 0 at the last epoch, then at every other epoch, so every result shows its gain
    over the plain method at its best epoch (the grid holds those points already); then `warm` (start_points)."""
    if space.objective == "pareto":
        metric, mode = ["objective", "utility"], ["max", "max"]
    else:
        metric, mode = "objective", "max"
    first = None if space.sampler == "grid" else start_points(space, epochs, warm)
    return ConstrainedOptunaSearch(space=distributions(space, epochs), metric=metric, mode=mode,
                                   points_to_evaluate=first, sampler=_sampler(space, epochs, seed),
                                   in_order=space.deterministic and space.sampler != "grid",
                                   rank_infeasible_last=space.sampler == "cmaes")
