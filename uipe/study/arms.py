"""One seed's comparison, as pure functions from trial records to the study's typed records (uipe/study/records.py):
each arm's best point at each utility floor, the utility at matched forgetting, the hypervolume of each arm's
points, and how well reference-free signals track forget quality.

Arms (per method): `base`, the base method (alpha 0) at its best epoch among the epochs UIPE may use; `more`, the
base method trained `longer_factor` times as many epochs, at its best epoch (the paper's "more iterations"
baseline); `uipe`, theta_un + alpha*(theta_un - theta_ini) at the searched (alpha, epoch) (arXiv 2503.04693).
Every arm chooses by the search's objective (forget quality on the selection fold in a study) and is reported on
both folds and the whole forget split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from uipe import metrics
from uipe.decisions import best_above, completed, pareto_front
from uipe.errors import UipeError
from uipe.results import TrialResult
from uipe.study.aggregate import log10_fq
from uipe.study.records import (BASE, FORGET_PROB, FORGET_QUALITY, FORGET_QUALITY_REPORT, FORGET_QUALITY_SELECT,
                                MORE, UIPE, UTILITY, ArmPoint, MethodRecord, SignalCheck)


def ratio(utility: float, start_utility: float) -> float:
    """Utility as a fraction of theta_ini's (NaN when theta_ini has none: a model that never learned the task)."""
    return utility / start_utility if start_utility > 0 else math.nan


def point(r: TrialResult, start_utility: float, crossfit: float = math.nan) -> ArmPoint:
    return ArmPoint(r.alpha, r.epoch, r.utility, ratio(r.utility, start_utility), r.metric(FORGET_QUALITY),
                    r.metric(FORGET_QUALITY_SELECT), r.metric(FORGET_QUALITY_REPORT), r.metric(FORGET_PROB),
                    crossfit)


def _on_report_fold(rows: Sequence[TrialResult], utility: float) -> TrialResult | None:
    """The point the arm's rule picks when the report fold is the one chosen on: the highest report-fold forget
    quality with utility >= `utility`, then the higher utility, then the smaller alpha."""
    feasible = [r for r in rows if r.utility >= utility and math.isfinite(r.metric(FORGET_QUALITY_REPORT))]
    return max(feasible, key=lambda r: (r.metric(FORGET_QUALITY_REPORT), r.utility, -r.alpha)) if feasible else None


def crossfit(chosen: TrialResult, rows: Sequence[TrialResult], utility: float) -> float:
    """Cross-fitting (choose on each fold, read the other, average on log10): the geometric mean of the chosen
    point's report-fold forget quality and the selection-fold forget quality of the point chosen on the report fold,
    so one fold's draw of the KS test's noise no longer decides the reading alone (docs/RESULTS.md, "Folds")."""
    other = _on_report_fold(rows, utility)
    reads = [chosen.metric(FORGET_QUALITY_REPORT), other.metric(FORGET_QUALITY_SELECT) if other else math.nan]
    if not all(math.isfinite(x) for x in reads):
        return math.nan
    return math.sqrt(max(reads[0], 1e-300) * max(reads[1], 1e-300))


def at_floors(rows: Sequence[TrialResult], start_utility: float,
              floors: Sequence[float]) -> dict[float, ArmPoint | None]:
    """Per floor: the arm's best point with utility >= floor x theta_ini's utility (None: no point gets there),
    with its cross-fitted forget quality."""
    out = {}
    done = completed(list(rows))
    for floor in floors:
        best = best_above(done, floor * start_utility)
        out[float(floor)] = point(best, start_utility, crossfit(best, done, floor * start_utility)) if best else None
    return out


def matched_utility(uipe: ArmPoint | None, trajectory: Sequence[tuple[float, float]]) -> float | None:
    """UIPE's utility minus the base trajectory's at UIPE's forget probability: the trajectory's (forget prob,
    utility) points, theta_ini first, interpolated linearly in forget probability. None when UIPE's forget
    probability is outside the trajectory's range (no base point forgets that much, or that little)."""
    if uipe is None or not trajectory:
        return None
    probs, utils = np.array([p for p, _ in trajectory]), np.array([u for _, u in trajectory])
    order = np.argsort(probs)
    x = uipe.forget_prob
    if not probs.min() <= x <= probs.max():
        return None
    return float(uipe.utility - np.interp(x, probs[order], utils[order]))


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area of the (log10 forget quality, utility ratio) plane that the points dominate above `ref` (both
    maximised). Sweep in decreasing utility: each point adds a slab from its utility down to the next point's,
    as wide as the best forget quality seen so far."""
    inside = sorted(((x - ref[0], y) for x, y in points if x > ref[0] and y > ref[1]), key=lambda p: -p[1])
    area, widest = 0.0, 0.0
    for i, (x, y) in enumerate(inside):
        widest = max(widest, x)
        lower = inside[i + 1][1] if i + 1 < len(inside) else ref[1]
        area += widest * (y - lower)
    return area


def signal_value(r: TrialResult, name: str) -> float:
    """A reference-free signal of a trial: as its evaluation reported it, or derived by the catalogue from what it
    reported (an attack's closeness to chance from its AUC); NaN where neither."""
    return metrics.value_of(name, r.metrics)


def signal_checks(rows: Sequence[TrialResult], threshold: float) -> dict[str, SignalCheck]:
    """Per reference-free signal: its Spearman correlation with forget quality over the trials, and the regret of
    choosing by it at the utility threshold: log10 FQ of the point forget quality picks minus that of the point the
    signal picks (0: the same forget quality; log10 3 = 0.48 is a factor of 3)."""
    from scipy.stats import spearmanr

    def fq(r: TrialResult) -> float:
        return r.metric(FORGET_QUALITY)

    out = {}
    for name in metrics.objectives(reference=False, benchmark=metrics.get(FORGET_QUALITY).benchmark):
        done = [(signal_value(r, name), r) for r in completed(list(rows))]
        done = [(v, r) for v, r in done if math.isfinite(v)]
        feasible = [(v, r) for v, r in done if r.utility >= threshold]
        rho = spearmanr([v for v, _ in done], [fq(r) for _, r in done])[0] if len(done) > 2 else math.nan
        regret = None
        if feasible:
            by_fq = max((r for _, r in feasible), key=fq)
            by_signal = max(feasible, key=lambda p: (p[0], p[1].utility))[1]
            regret = log10_fq(fq(by_fq)) - log10_fq(fq(by_signal))
        out[name] = SignalCheck(None if math.isnan(rho) else float(rho), regret)
    return out


def start_value(start: Mapping[str, float | None], name: str) -> float:
    """theta_ini's value of a metric the comparison cannot do without; one line naming it when the search's summary
    lacks it."""
    v = start.get(name)
    if v is None:
        raise UipeError(f"theta_ini's metrics have no {name} (got: {', '.join(sorted(start)) or 'none'})")
    return float(v)


def method_record(search: Sequence[TrialResult], longer: Sequence[TrialResult], start: Mapping[str, float | None],
                  threshold: float, floors: Sequence[float], epochs: int, longer_epochs: int,
                  forms: Mapping[str, Sequence[TrialResult]] | None = None) -> MethodRecord:
    """Everything the study keeps of one method on one seed. `search`: the UIPE search's trials (alpha 0 among them
    at every epoch it may use); `longer`: the longer run's epochs at alpha 0; `start`: theta_ini's metrics, by
    catalogue name; `forms`: each form's search (study.forms), an arm each, chosen and compared like UIPE."""
    mu = start_value(start, UTILITY)
    base = [r for r in completed(list(search)) if r.is_base]
    arms = {BASE: base, MORE: completed(list(longer)), UIPE: completed(list(search))}
    arms |= {form: completed(list(rows)) for form, rows in (forms or {}).items()}
    chosen = {arm: at_floors(rows, mu, floors) for arm, rows in arms.items()}
    trajectory = [(start_value(start, FORGET_PROB), mu)] + [(r.metric(FORGET_PROB), r.utility)
                                                            for r in sorted(arms[MORE], key=lambda r: r.epoch)]
    ref = (log10_fq(start_value(start, FORGET_QUALITY)), min(floors))
    plane = {arm: [(log10_fq(r.metric(FORGET_QUALITY)), ratio(r.utility, mu)) for r in rows]
             for arm, rows in arms.items()}
    fronts = {UIPE: pareto_front(arms[UIPE]), BASE: arms[BASE], MORE: arms[MORE],
              **{form: pareto_front(arms[form]) for form in forms or {}}}
    return MethodRecord(
        arms=chosen, theta_ini=dict(start), epochs=epochs, longer_epochs=longer_epochs,
        matched_utility={f: matched_utility(p, trajectory) for f, p in chosen[UIPE].items()},
        # an arm that was not run (study.more_baseline: false) has no hypervolume, not an empty one
        hypervolume={arm: hypervolume(pts, ref) if pts else None for arm, pts in plane.items()},
        fronts={arm: tuple((ratio(r.utility, mu), r.metric(FORGET_QUALITY)) for r in rows)
                for arm, rows in fronts.items()},
        signals=signal_checks(search, threshold),
        matched_forms={form: {f: matched_utility(p, trajectory) for f, p in chosen[form].items()}
                       for form in forms or {}},
    )
