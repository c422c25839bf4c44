"""Two-fidelity trials (search.screening): score every sampled point without generation first, and spend greedy
generation (ROUGE-L, so model utility) only on points that could matter.

A screened point reports its scoring pass first: the objective (forget quality, or a reference-free signal) is exact
there, and `scored_utility` (uipe.eval.metrics: the six utility numbers a scoring pass gives) stands in for model
utility. `ScreeningScheduler`, a Tune scheduler, lets it go on to the full evaluation only when no point seen so far
(screened or evaluated in full) dominates it in (objective, scored utility): it is on the running front, the points
a choice at any utility floor could pick. Otherwise it stops the trial after its scoring pass.
The base method's points (alpha 0) are always evaluated in full. A stopped trial has no model utility: it is never
chosen, never on a front, never at a floor (uipe.report.completed), and Optuna counts it as infeasible (it is
dominated by a point it has already seen).

Measured (docs/BENCHMARKS.md): promoting every point not dominated by the *fully evaluated* ones sent three in four
TPE points to the full evaluation (TPE samples near the front), which saved nothing; the front of all points seen
is the stricter, and intended, test.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from uipe.search.result import FULL_FIDELITY

# How far below a fully evaluated point's scored utility a screened point may sit and still count as near the
# front (and be evaluated in full): scored utility is a proxy, so a point just under the front is kept.
SCORED_UTILITY_MARGIN = 0.005


def dominated(point: tuple[float, float], seen: list[tuple[float, float]],
              margin: float = SCORED_UTILITY_MARGIN) -> bool:
    """True when some point seen is at least as good on the objective and better by more than `margin` on scored
    utility: the point is neither on nor near the front."""
    obj, util = point
    if not (math.isfinite(obj) and math.isfinite(util)):
        return False  # nothing to compare: evaluate it in full rather than guess
    return any(o >= obj and u >= util + margin for o, u in seen)


class ScreeningScheduler(FIFOScheduler):
    """FIFO order; a screening report is continued to full fidelity only when it is on or near the front of every
    point seen so far (`dominated`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, float]] = []  # (objective, scored utility) of every report, either fidelity
        self.stopped = 0
        self.promoted = 0

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        point = (float(result.get("objective", math.nan)), float(result.get("scored_utility", math.nan)))
        decision = TrialScheduler.CONTINUE
        if not result.get(FULL_FIDELITY, 1.0):
            decision = TrialScheduler.STOP if dominated(point, self.seen) else TrialScheduler.CONTINUE
            self.stopped += decision == TrialScheduler.STOP
            self.promoted += decision == TrialScheduler.CONTINUE
        self.seen.append(point)
        return decision
