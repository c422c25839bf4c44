"""Two-fidelity search trials without Ray: which screened points go on to the full evaluation (numbers by hand),
and that a point evaluated only at screening fidelity is never chosen, on a front or at a floor."""

from __future__ import annotations

import math

from ray.tune.schedulers import TrialScheduler

from uipe.eval.metrics import scored_utility
from uipe.report import best_at_floors, choose, completed, from_csv, pareto_front, to_csv
from uipe.search.outcome import fidelity_split
from uipe.search.result import FULL_FIDELITY, TrialResult
from uipe.search.screening import ScreeningScheduler, dominated


def test_scored_utility_is_the_harmonic_mean_of_the_six_scoring_numbers() -> None:
    parts = {f"{s}_{m}": 0.5 for s in ("retain", "real_authors", "world_facts") for m in ("prob", "truth_ratio")}
    parts["world_facts_prob"] = 0.25  # hmean(5 x 0.5, 0.25) = 6 / (5 * 2 + 4) = 0.428571
    assert math.isclose(scored_utility({**parts, "retain_rougeL": 0.01}), 6 / 14)  # ROUGE-L plays no part
    assert scored_utility({**parts, "retain_prob": 0.0}) == 0.0


def test_a_screened_point_is_evaluated_in_full_unless_a_full_point_dominates_it() -> None:
    full = [(0.02, 0.60), (0.10, 0.50)]  # (objective, scored utility) of points seen
    assert dominated((0.01, 0.55), full)  # (0.02, 0.60) is better on both, by more than the 0.005 margin
    assert not dominated((0.03, 0.55), full)  # better objective than any point with more utility: on the front
    assert not dominated((0.01, 0.597), full)  # within the margin of (0.02, 0.60): near the front, kept
    assert not dominated((0.01, math.nan), full) and not dominated((0.5, 0.9), [])


def _report(objective: float, scored: float, full: bool) -> dict:
    return {"objective": objective, "scored_utility": scored, FULL_FIDELITY: float(full)}


def test_the_scheduler_continues_only_screening_reports_on_the_running_front() -> None:
    s = ScreeningScheduler()
    assert s.on_trial_result(None, None, _report(0.02, 0.60, True)) == TrialScheduler.CONTINUE  # base point
    assert s.on_trial_result(None, None, _report(0.01, 0.50, False)) == TrialScheduler.STOP
    assert s.on_trial_result(None, None, _report(0.05, 0.50, False)) == TrialScheduler.CONTINUE  # a new front point
    s.on_trial_result(None, None, _report(0.05, 0.50, True))  # that point, now in full
    assert s.on_trial_result(None, None, _report(0.04, 0.49, False)) == TrialScheduler.STOP  # 0.05 has more of both
    # a screened-only point counts too: (0.01, 0.50) was stopped, yet it dominates this one
    assert s.on_trial_result(None, None, _report(0.009, 0.49, False)) == TrialScheduler.STOP
    assert s.on_trial_result(None, None, _report(0.30, 0.40, False)) == TrialScheduler.CONTINUE
    assert (s.stopped, s.promoted, len(s.seen)) == (3, 2, 7)


def _row(alpha: float, fq: float, mu: float | None, seconds: float = 2.0, screen_seconds: float = 0.0) -> TrialResult:
    aggregates = {"forget_quality": fq, "scored_utility": 0.5, **({} if mu is None else {"model_utility": mu})}
    r = TrialResult.scored(alpha, 3, aggregates, 0.7, seconds, trial_id=f"t{alpha}")
    return r if mu is None else TrialResult(**{**r.__dict__, "metrics": {**r.metrics, "screen_seconds": screen_seconds}})


def test_a_point_screened_only_is_never_chosen_nor_on_a_front_nor_at_a_floor() -> None:
    rows = [_row(0.0, 0.01, 0.80), _row(1.0, 0.05, 0.75, 3.0, 1.0), _row(2.0, 0.90, None, 1.0)]
    screened = rows[2]
    assert screened.fidelity == "screen" and not screened.feasible and math.isnan(screened.model_utility)
    assert completed(rows) == rows[:2] and screened not in pareto_front(rows)
    assert choose(rows).alpha == 1.0  # not alpha 2, whose forget quality is the highest
    floors = best_at_floors(rows, 0.8, (0.9,))
    assert floors["0.9"]["uipe"]["alpha"] == 1.0
    again = from_csv(to_csv(rows))
    assert [r.fidelity for r in again] == ["full", "full", "screen"] and choose(again).alpha == 1.0
    # work: 2 + 3 + 1 s; screening: the screened-only trial's 1 s and the promoted trial's 1 s
    assert fidelity_split(rows) == {"full": 2, "screened_only": 1, "screening_seconds": 2.0, "full_seconds": 4.0}
    report = screened.to_report()
    assert report[FULL_FIDELITY] == 0.0 and TrialResult.from_report("t", {"alpha": 2.0, "epoch": 3}, report).fidelity \
        == "screen"
