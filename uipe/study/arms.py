"""One seed's comparison, as pure functions over trial records: each arm's best point at each utility floor, the
utility at matched forgetting, the hypervolume of each arm's points, and how well reference-free signals track
forget quality.

Arms (per method): `base`, the base method (alpha 0) at its best epoch among the epochs UIPE may use; `more`, the
base method trained `longer_factor` times as many epochs, at its best epoch (the paper's "more iterations"
baseline); `uipe`, theta_un + alpha*(theta_un - theta_ini) at the searched (alpha, epoch) (arXiv 2503.04693).
Every arm chooses by the search's objective (forget quality on the selection fold in a study) and is reported on
both folds and the whole forget split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from uipe.config import SIGNALS
from uipe.report import best_above, completed, floor_key, pareto_front
from uipe.search.result import TrialResult
from uipe.study.aggregate import log10_fq



def ratio(utility: float, start_utility: float) -> float:
    """Utility as a fraction of theta_ini's (NaN when theta_ini has none: a model that never learned the task)."""
    return utility / start_utility if start_utility > 0 else math.nan


def point(r: TrialResult, start_utility: float) -> dict:
    return {"alpha": r.alpha, "epoch": r.epoch, "model_utility": r.model_utility,
            "utility_ratio": ratio(r.model_utility, start_utility), "forget_quality": r.forget_quality,
            "forget_quality_select": r.forget_quality_select, "forget_quality_report": r.forget_quality_report,
            "forget_prob": r.forget_prob}


def at_floors(rows: Sequence[TrialResult], start_utility: float, floors: Sequence[float]) -> dict[str, dict | None]:
    """Per floor: the arm's best point with utility >= floor x theta_ini's utility (None: no point gets there)."""
    out = {}
    for floor in floors:
        best = best_above(completed(list(rows)), floor * start_utility)
        out[floor_key(floor)] = point(best, start_utility) if best else None
    return out


def matched_utility(uipe: dict | None, trajectory: Sequence[tuple[float, float]]) -> float | None:
    """UIPE's utility minus the base trajectory's at UIPE's forget probability: the trajectory's (forget prob,
    utility) points, theta_ini first, interpolated linearly in forget probability. None when UIPE's forget
    probability is outside the trajectory's range (no base point forgets that much, or that little)."""
    if uipe is None or not trajectory:
        return None
    probs, utils = np.array([p for p, _ in trajectory]), np.array([u for _, u in trajectory])
    order = np.argsort(probs)
    x = uipe["forget_prob"]
    if not probs.min() <= x <= probs.max():
        return None
    return float(uipe["model_utility"] - np.interp(x, probs[order], utils[order]))


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
    """A reference-free signal of a trial: holdout KS as recorded; an attack's closeness to chance, 1 - 2|AUC - 0.5|,
    from its AUC."""
    if name.endswith("_closeness"):
        return 1.0 - 2.0 * abs(getattr(r, name.removesuffix("_closeness") + "_auc") - 0.5)
    return getattr(r, name)


def signal_checks(rows: Sequence[TrialResult], threshold: float) -> dict[str, dict]:
    """Per reference-free signal: its Spearman correlation with forget quality over the trials, and the regret of
    choosing by it at the utility threshold: log10 FQ of the point forget quality picks minus that of the point the
    signal picks (0: the same forget quality; log10 3 = 0.48 is a factor of 3)."""
    from scipy.stats import spearmanr

    out = {}
    for name in SIGNALS:
        done = [(signal_value(r, name), r) for r in completed(list(rows))]
        done = [(v, r) for v, r in done if math.isfinite(v)]
        feasible = [(v, r) for v, r in done if r.model_utility >= threshold]
        rho = spearmanr([v for v, _ in done], [r.forget_quality for _, r in done])[0] if len(done) > 2 else math.nan
        regret = None
        if feasible:
            by_fq = max((r for _, r in feasible), key=lambda r: r.forget_quality)
            by_signal = max(feasible, key=lambda p: (p[0], p[1].model_utility))[1]
            regret = log10_fq(by_fq.forget_quality) - log10_fq(by_signal.forget_quality)
        out[name] = {"spearman": None if math.isnan(rho) else float(rho), "regret": regret}
    return out


def method_record(search: Sequence[TrialResult], longer: Sequence[TrialResult], start: dict, threshold: float,
                  floors: Sequence[float], epochs: int, longer_epochs: int) -> dict:
    """Everything the study keeps of one method on one seed. `search`: the UIPE search's trials (alpha 0 among them
    at every epoch it may use); `longer`: the longer run's epochs at alpha 0; `start`: theta_ini's metrics."""
    mu = start["model_utility"]
    base = [r for r in completed(list(search)) if r.alpha == 0.0]
    arms = {"base": base, "more": completed(list(longer)), "uipe": completed(list(search))}
    chosen = {arm: at_floors(rows, mu, floors) for arm, rows in arms.items()}
    trajectory = [(start["forget_prob"], mu)] + [(r.forget_prob, r.model_utility)
                                                 for r in sorted(arms["more"], key=lambda r: r.epoch)]
    ref = (log10_fq(start["forget_quality"]), min(floors))
    plane = {arm: [(log10_fq(r.forget_quality), ratio(r.model_utility, mu)) for r in rows]
             for arm, rows in arms.items()}
    return {
        "theta_ini": start, "epochs": epochs, "longer_epochs": longer_epochs, "arms": chosen,
        "matched_utility": {k: matched_utility(p, trajectory) for k, p in chosen["uipe"].items()},
        # an arm that was not run (study.more_baseline: false) has no hypervolume, not an empty one
        "hypervolume": {arm: hypervolume(pts, ref) if pts else None for arm, pts in plane.items()},
        "fronts": {arm: [[ratio(r.model_utility, mu), r.forget_quality] for r in rows]
                   for arm, rows in (("uipe", pareto_front(arms["uipe"])), ("base", arms["base"]),
                                     ("more", arms["more"]))},
        "signals": signal_checks(search, threshold),
    }
