"""The benchmark registry: one module per benchmark behind uipe.benchmarks.base.Benchmark.

Importing this package registers every benchmark's metrics in the catalogue (uipe/metrics.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uipe import metrics
from uipe.benchmarks.base import Benchmark
from uipe.benchmarks.tofu import TOFU  # first: its entries lead the catalogue, as before MUSE
from uipe.benchmarks.muse import MUSE  # noqa: I001
from uipe.errors import UipeError

if TYPE_CHECKING:
    from uipe.config import ExperimentConfig

BENCHMARKS: dict[str, Benchmark] = {TOFU.name: TOFU, MUSE.name: MUSE}
OBJECTIVE_MODES = ("pareto", "reference_free")  # the words a space may use beside a catalogue objective


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UipeError(f"data.benchmark: unknown benchmark {name!r} (known: {', '.join(sorted(BENCHMARKS))})")
    return BENCHMARKS[name]


def check_objective_words(objective: str | None, signal: str | None, where: str, benchmark: str | None = None) -> None:
    """A space's (or search config's) objective and signal against the catalogue (`benchmark`'s part of it when
    given), one line naming `where`."""
    for key, name, reference_free, also in (("objective", objective, False, OBJECTIVE_MODES),
                                            ("signal", signal, True, ())):
        problem = None if name is None else metrics.objective_problem(name, reference_free, also, benchmark)
        if problem:
            raise UipeError(f"{where}{key}: {problem}")


def check_config(cfg: ExperimentConfig) -> Benchmark:
    """The run's benchmark, after checking the names the config takes from its catalogue (the objective, the
    signal), so a typo fails at load time rather than at the search stage."""
    bench = get_benchmark(cfg.data.benchmark)
    check_objective_words(cfg.search.objective, cfg.search.signal, "search.", bench.name)
    return bench
