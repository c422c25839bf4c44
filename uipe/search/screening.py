"""Two-fidelity trials (search.screening): score every sampled point without generation first, and spend greedy
generation (ROUGE-L, so model utility) only on points that could matter.

A screened point reports its scoring pass first: the objective (forget quality, or a reference-free signal) is exact
there, and `scored_utility` (uipe.eval.metrics: the six utility numbers a scoring pass gives) stands in for model
utility. `ScreeningScheduler`, a Tune scheduler, lets it go on to the full evaluation unless a point already
evaluated in full dominates it in (objective, scored utility); otherwise it stops the trial after its scoring pass.
The base method's points (alpha 0) are always evaluated in full. A stopped trial has no model utility: it is never
chosen, never on a front, never at a floor (uipe.report.completed), and Optuna counts it as infeasible (it is
dominated by a point it has already seen).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from uipe.search.result import FULL_FIDELITY

# How far below a fully evaluated point's scored utility a screened point may sit and still count as near the
# front (and be evaluated in full): scored utility is a proxy, so a point just under the front is kept.
SCORED_UTILITY_MARGIN = 0.005


def dominated(point: tuple[float, float], full: list[tuple[float, float]],
              margin: float = SCORED_UTILITY_MARGIN) -> bool:
    """True when some fully evaluated (objective, scored utility) is at least as good on the objective and better by
    more than `margin` on scored utility: the point is neither on nor near the front of what is known in full."""
    obj, util = point
    if not (math.isfinite(obj) and math.isfinite(util)):
        return False  # nothing to compare: evaluate it in full rather than guess
    return any(o >= obj and u >= util + margin for o, u in full)


class ScreeningScheduler(FIFOScheduler):
    """FIFO order; a screening report is continued to full fidelity only when it is on or near the front of the
    points evaluated in full so far (`dominated`)."""

    def __init__(self) -> None:
        super().__init__()
        self.full: list[tuple[float, float]] = []
        self.stopped = 0
        self.promoted = 0

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(FULL_FIDELITY, 1.0):
            self.full.append((float(result.get("objective", math.nan)), float(result.get("scored_utility", math.nan))))
            return TrialScheduler.CONTINUE
        point = (float(result.get("objective", math.nan)), float(result.get("scored_utility", math.nan)))
        if dominated(point, self.full):
            self.stopped += 1
            return TrialScheduler.STOP
        self.promoted += 1
        return TrialScheduler.CONTINUE
