"""Two-fidelity trials (search.screening): score every sampled point without generation first, and spend greedy
generation (ROUGE-L, so model utility) only on points that could change a result.

A screened point reports its scoring pass first: the objective (forget quality, or a reference-free signal) is exact
there, and `scored_utility` (uipe.eval.metrics: the six utility numbers a scoring pass gives) predicts model utility
through a line fitted to the points already evaluated in full. `ScreeningScheduler`, a Tune scheduler, lets the trial
go on to the full evaluation only when, at some utility threshold (the space's floor and the reported floors), the
point could be feasible (its predicted utility plus a tolerance reaches the threshold) and would beat the best fully
evaluated point there on the objective. Otherwise it stops the trial after its scoring pass. The base method's
points (alpha 0) are always evaluated in full. A stopped trial has no model utility: it is never chosen, never on a
front, never at a floor (uipe.report.completed), and Optuna counts it as infeasible.

Measured (docs/BENCHMARKS.md): promoting every point on the running front of (objective, scored utility) sent 23 of
32 TPE points to the full evaluation and saved nothing. Along one epoch, raising alpha trades utility for forgetting,
so almost every point is on that front; what matters is whether a point could move a floor's answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from uipe.results import FULL_FIDELITY

# Added to twice the fit's residual spread: how far below a threshold a point's predicted utility may sit and still
# be evaluated in full (scored utility is a proxy; a point just under a floor may well be over it).
UTILITY_TOLERANCE = 0.005
MIN_FIT_POINTS = 3


def utility_predictor(full: Sequence[tuple[float, float]]) -> tuple[float, float, float] | None:
    """Least-squares line model_utility = a + b * scored_utility over the fully evaluated (scored, model) pairs, and
    the tolerance 2 x residual sd + UTILITY_TOLERANCE; None with fewer than MIN_FIT_POINTS distinct pairs."""
    pts = np.array([p for p in full if all(math.isfinite(v) for v in p)], dtype=np.float64).reshape(-1, 2)
    if len(pts) < MIN_FIT_POINTS or np.ptp(pts[:, 0]) == 0:
        return None
    b, a = np.polyfit(pts[:, 0], pts[:, 1], 1)
    resid = pts[:, 1] - (a + b * pts[:, 0])
    return float(a), float(b), float(2 * np.std(resid, ddof=1) + UTILITY_TOLERANCE)


def could_matter(objective: float, scored: float, full: Sequence[tuple[float, float, float]],
                 thresholds: Sequence[float]) -> bool:
    """Whether a screened (objective, scored utility) could move the best point at some utility threshold. `full`:
    (objective, scored utility, model utility) of the points evaluated in full. Unknown is promoted: a non-finite
    value, or too few full points to predict utility from."""
    fit = utility_predictor([(s, u) for _, s, u in full])
    if fit is None or not (math.isfinite(objective) and math.isfinite(scored)):
        return True
    a, b, tol = fit
    predicted = a + b * scored
    for t in thresholds:
        best = max((o for o, _, u in full if u >= t), default=-math.inf)
        if predicted + tol >= t and objective > best:
            return True
    return False


class ScreeningScheduler(FIFOScheduler):
    """FIFO order; a screening report goes on to full fidelity only when it `could_matter` given the points evaluated
    in full so far. `thresholds`: utilities (floor x theta_ini's) at which a result is reported; `proxy`: the catalogue
    name of the utility proxy a scoring pass reports (the benchmark's screening_utility)."""

    def __init__(self, thresholds: Sequence[float], proxy: str) -> None:
        super().__init__()
        self.thresholds = sorted(set(float(t) for t in thresholds))
        self.proxy = proxy
        self.full: list[tuple[float, float, float]] = []  # (objective, scored utility proxy, utility)
        self.stopped = 0
        self.promoted = 0

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        objective = float(result.get("objective", math.nan))
        scored = float(result.get(self.proxy, math.nan))
        if result.get(FULL_FIDELITY, 1.0):
            self.full.append((objective, scored, float(result.get("utility", math.nan))))
            return TrialScheduler.CONTINUE
        if could_matter(objective, scored, self.full, self.thresholds):
            self.promoted += 1
            return TrialScheduler.CONTINUE
        self.stopped += 1
        return TrialScheduler.STOP
