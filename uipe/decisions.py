"""The search's decisions over TrialResult records: which trials count, the Pareto front, the chosen point, the
base method's point, and the best point at each utility floor. Pure functions, no rendering (uipe/report.py draws
and writes them), testable without Ray or MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence

from uipe.config import FLOORS
from uipe.results import TrialResult


def floor_key(floor: float) -> str:
    """A floor as a JSON key: "0.95", "0.9", ..."""
    return str(float(floor))


def completed(rows: Sequence[TrialResult]) -> list[TrialResult]:
    """Trials completed at full fidelity: what every choice, front, floor and plot uses (a screened-only trial has no
    utility, so it can never be chosen)."""
    return [r for r in rows if r.full]


def pareto_front(rows: Sequence[TrialResult]) -> list[TrialResult]:
    """Completed trials no other trial beats on both the objective and utility (both maximised)."""
    done = completed(rows)
    front = []
    for r in done:
        dominated = any(
            o.objective >= r.objective and o.utility >= r.utility
            and (o.objective > r.objective or o.utility > r.utility) for o in done)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.utility)


def choose(rows: Sequence[TrialResult]) -> TrialResult | None:
    """The best feasible trial: highest objective, then higher utility, then the smaller alpha.

    Ray's get_best_result ignores constraints, hence this. With no feasible trial, the least infeasible one (the
    highest utility) is returned with feasible = 0, so a caller can say so rather than fail.
    """
    done = completed(rows)
    if not done:
        return None
    feasible = best([r for r in done if r.feasible])
    return feasible or max(done, key=lambda r: (r.utility, r.objective))


def best(rows: Sequence[TrialResult]) -> TrialResult | None:
    """Highest objective, then higher utility, then the smaller alpha (the search's own rule)."""
    return max(rows, key=lambda r: (r.objective, r.utility, -r.alpha)) if rows else None


def best_above(rows: Sequence[TrialResult], utility: float) -> TrialResult | None:
    """The best completed trial with utility >= `utility` (None: no trial gets there)."""
    return best([r for r in completed(rows) if r.utility >= utility])


def best_at_floors(rows: Sequence[TrialResult], start_utility: float,
                   floors: Sequence[float] = FLOORS) -> dict[str, dict[str, dict | None]]:
    """Per floor f: the best point of the base method (alpha 0) and of UIPE (any alpha) among the completed trials
    with utility >= f x theta_ini's, by the search's objective; None where no trial reaches the floor."""
    out = {}
    for floor in floors:
        base = best_above([r for r in rows if r.is_base], floor * start_utility)
        uipe = best_above(rows, floor * start_utility)
        out[floor_key(floor)] = {"base": base.summary() if base else None, "uipe": uipe.summary() if uipe else None}
    return out


def base_row(rows: Sequence[TrialResult]) -> TrialResult | None:
    """The plain base method (alpha = 0) at its best epoch, chosen by the same rule as the UIPE trials."""
    return choose([r for r in rows if r.is_base])
