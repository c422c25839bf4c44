"""The metric and objective catalogue: every number a trial reports, by name, with what tables, plots, the search,
the study and MLflow need to know of it.

A benchmark (uipe/benchmarks/) declares its metrics and registers them here; everything else reads names, labels,
directions and roles from the catalogue instead of spelling them. Adding an objective is one entry: a `Metric` with
`objective=True`, either computed by the benchmark's evaluator or `derive`d from the aggregates it already reports.

    from uipe.metrics import Metric, register
    register(Metric("forget_prob_drop", "1 - forget probability", "1-Pf", derive=lambda m: 1 - m["forget_prob"],
                    objective=True))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from uipe.errors import UipeError


@dataclass(frozen=True)
class Metric:
    """One reported number. `objective`: a search may maximise it (a `direction="min"` metric is negated by the
    search, never here); `utility`: it can be the utility measure a floor refers to; `needs_generation`: only a full
    evaluation (greedy generation) gives it, so a screening pass cannot; `needs_reference`: it compares against the
    retain model (TOFU's forget quality), so a deployment without one cannot compute it; `log_scale`: plots draw it
    on a log axis (p-values); `derive`: computed from the other aggregates after the evaluator ran."""

    name: str
    label: str  # for axes and long captions
    short: str  # for table columns and progress lines
    direction: Literal["max", "min"] = "max"
    needs_generation: bool = False
    needs_reference: bool = False
    objective: bool = False
    utility: bool = False
    log_scale: bool = False
    headline: bool = False  # shown in summaries and as its own results.csv column
    derive: Callable[[Mapping[str, float]], float] | None = None
    benchmark: str = ""


CATALOGUE: dict[str, Metric] = {}


def register(*metrics: Metric) -> None:
    """Add entries; re-registering an identical entry is a no-op (module reloads), a different one under a known
    name is an error: a name has one meaning."""
    for m in metrics:
        known = CATALOGUE.get(m.name)
        if known is not None and known != m:
            raise UipeError(f"metric {m.name!r}: registered twice with different definitions")
        CATALOGUE[m.name] = m


def unregister(name: str) -> None:
    CATALOGUE.pop(name, None)


def get(name: str) -> Metric:
    if name not in CATALOGUE:
        raise UipeError(f"metric {name!r}: not in the catalogue (known: {', '.join(sorted(CATALOGUE)) or 'none'})")
    return CATALOGUE[name]


def known(name: str) -> bool:
    return name in CATALOGUE


def label(name: str) -> str:
    return CATALOGUE[name].label if name in CATALOGUE else name


def short(name: str) -> str:
    return CATALOGUE[name].short if name in CATALOGUE else name


def objectives(reference: bool | None = None, benchmark: str | None = None) -> list[str]:
    """Names a search may maximise; reference=False: only those that need no retain model; `benchmark`: only its
    own and those registered for no benchmark in particular."""
    return [m.name for m in CATALOGUE.values()
            if m.objective and (reference is None or reference or not m.needs_reference)
            and (benchmark is None or m.benchmark in (benchmark, ""))]


def objective_problem(name: str, reference_free: bool = False, also: Iterable[str] = (),
                      benchmark: str | None = None) -> str | None:
    """Why `name` cannot be a search's objective (reference_free: one that needs no retain model; `benchmark`: of
    that benchmark), or None when it can; `also`: other words the caller accepts (a space's "pareto",
    "reference_free")."""
    also = tuple(also)
    allowed = objectives(reference=not reference_free, benchmark=benchmark)
    if name in also or name in allowed:
        return None
    kind = "a reference-free objective" if reference_free else "an objective"
    return f"{name!r} is not {kind} in the metric catalogue (choose from {', '.join([*also, *allowed])})"


def ordered(names: Iterable[str]) -> list[str]:
    """Distinct names in catalogue order; names the catalogue does not know after them, in the order given."""
    given = list(dict.fromkeys(names))
    rank = {name: i for i, name in enumerate(CATALOGUE)}
    return sorted(given, key=lambda n: (rank.get(n, len(rank)), given.index(n)))


def headline(names: Iterable[str] | None = None) -> list[str]:
    """The headline metrics in catalogue order (of `names` when given)."""
    pool = None if names is None else set(names)
    return [m.name for m in CATALOGUE.values() if m.headline and (pool is None or m.name in pool)]


def benchmark_headline(names: Iterable[str]) -> list[str]:
    """Every headline metric of the benchmark(s) that reported `names`, present or not (a summary shows a metric
    its benchmark could not measure this time as null, not as a missing key)."""
    owners = {CATALOGUE[n].benchmark for n in names if n in CATALOGUE}
    return [m.name for m in CATALOGUE.values() if m.headline and m.benchmark in owners]


def _derived(m: Metric, aggregates: Mapping[str, float]) -> float | None:
    """`m` derived from `aggregates`; None when it has no derivation or its inputs are missing."""
    if m.derive is None:
        return None
    try:
        return float(m.derive(aggregates))
    except KeyError:
        return None


def derive_all(aggregates: Mapping[str, float]) -> dict[str, float]:
    """The derived entries computable from `aggregates` and not already in them."""
    derived = {m.name: _derived(m, aggregates) for m in CATALOGUE.values() if m.name not in aggregates}
    return {name: v for name, v in derived.items() if v is not None}


def value_of(name: str, aggregates: Mapping[str, float]) -> float:
    """A metric's value in `aggregates`, or derived from them by its catalogue entry; NaN when neither."""
    if name in aggregates:
        return float(aggregates[name])
    v = _derived(CATALOGUE[name], aggregates) if name in CATALOGUE else None
    return math.nan if v is None else v


def oriented(name: str, value: float) -> float:
    """The value a maximiser should see: itself, or its negation for a metric to be minimised."""
    return -value if name in CATALOGUE and CATALOGUE[name].direction == "min" else value


def snapshot() -> dict[str, Metric]:
    """The catalogue as it is now, to carry into another process (a Ray trial) where entries registered at run time
    (a user's objective) would otherwise be missing."""
    return dict(CATALOGUE)


def adopt(catalogue: Mapping[str, Metric]) -> None:
    """Register a snapshot's entries in this process (a trial worker receiving the driver's catalogue)."""
    for m in catalogue.values():
        if m.name not in CATALOGUE:
            CATALOGUE[m.name] = m
