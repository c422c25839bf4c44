"""Two-fidelity search trials without Ray: which screened points go on to the full evaluation (numbers by hand),
and that a point evaluated only at screening fidelity is never chosen, on a front or at a floor."""

from __future__ import annotations

import math

import pytest
from ray.tune.schedulers import TrialScheduler

from uipe.eval.metrics import scored_utility
from uipe.decisions import best_at_floors, choose, completed, pareto_front
from uipe.report import from_csv, to_csv
from uipe.search.outcome import fidelity_split
from uipe.results import FULL_FIDELITY, TrialResult
from uipe.search.screening import UTILITY_TOLERANCE, ScreeningScheduler, could_matter, utility_predictor


def test_scored_utility_is_the_harmonic_mean_of_the_six_scoring_numbers() -> None:
    parts = {f"{s}_{m}": 0.5 for s in ("retain", "real_authors", "world_facts") for m in ("prob", "truth_ratio")}
    parts["world_facts_prob"] = 0.25  # hmean(5 x 0.5, 0.25) = 6 / (5 * 2 + 4) = 0.428571
    assert math.isclose(scored_utility({**parts, "retain_rougeL": 0.01}), 6 / 14)  # ROUGE-L plays no part
    assert scored_utility({**parts, "retain_prob": 0.0}) == 0.0


def test_utility_is_predicted_from_scored_utility_by_a_line_through_the_full_points() -> None:
    # (scored, model): (0.5, 0.6), (0.6, 0.7), (0.7, 0.8): exactly model = 0.1 + scored, no residual
    a, b, tol = utility_predictor([(0.5, 0.6), (0.6, 0.7), (0.7, 0.8)])
    assert (a, b, tol) == (pytest.approx(0.1), pytest.approx(1.0), pytest.approx(UTILITY_TOLERANCE))
    # residuals +0.01, -0.02, +0.01 around model = 0.1 + scored: sd = sqrt(0.0006 / 2) = 0.017321
    a, b, tol = utility_predictor([(0.5, 0.61), (0.6, 0.68), (0.7, 0.81)])
    assert tol == pytest.approx(2 * math.sqrt(0.0003) + UTILITY_TOLERANCE)
    assert utility_predictor([(0.5, 0.6), (0.6, 0.7)]) is None  # too few to fit


FULL = [(0.01, 0.7, 0.80), (0.05, 0.6, 0.70), (0.20, 0.5, 0.60)]  # (objective, scored, model): model = 0.1 + scored


def test_a_screened_point_goes_on_only_if_it_could_beat_the_best_at_some_threshold() -> None:
    # thresholds 0.75 (best there: 0.01) and 0.65 (best: 0.05)
    assert could_matter(0.03, 0.66, FULL, [0.75, 0.65])  # predicted 0.76 >= 0.75 and 0.03 > 0.01
    assert not could_matter(0.03, 0.60, FULL, [0.75, 0.65])  # predicted 0.70: only 0.65, where 0.05 is better
    assert could_matter(0.06, 0.60, FULL, [0.75, 0.65])  # ... unless it beats 0.05 there
    assert not could_matter(0.9, 0.40, FULL, [0.75, 0.65])  # best forgetting, hopeless utility (0.50)
    assert could_matter(0.9, 0.40, FULL, [0.75, 0.65, 0.5])  # a floor low enough to reach
    assert could_matter(0.06, 0.547, FULL, [0.65])  # predicted 0.647 is within the tolerance (0.005) of 0.65
    assert not could_matter(0.06, 0.54, FULL, [0.65])  # predicted 0.64 is not
    assert could_matter(0.0, 0.1, FULL[:2], [0.75])  # two full points: no prediction yet, evaluate in full


def _report(objective: float, scored: float, model: float | None) -> dict:
    out = {"objective": objective, "scored_utility": scored, FULL_FIDELITY: float(model is not None)}
    return out | ({} if model is None else {"utility": model, "model_utility": model})


def test_the_scheduler_stops_screened_points_that_could_not_matter_and_learns_from_full_ones() -> None:
    s = ScreeningScheduler([0.75, 0.65], "scored_utility")
    for o, sc, m in FULL:
        assert s.on_trial_result(None, None, _report(o, sc, m)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, None, _report(0.03, 0.60, None)) == TrialScheduler.STOP
    assert s.on_trial_result(None, None, _report(0.03, 0.66, None)) == TrialScheduler.CONTINUE
    s.on_trial_result(None, None, _report(0.03, 0.66, 0.76))  # that point in full: now the best at 0.75
    assert s.on_trial_result(None, None, _report(0.02, 0.70, None)) == TrialScheduler.STOP
    assert (s.stopped, s.promoted, len(s.full)) == (2, 1, 4)


def _row(alpha: float, fq: float, mu: float | None, seconds: float = 2.0, screen_seconds: float = 0.0) -> TrialResult:
    aggregates = {"forget_quality": fq, "scored_utility": 0.5, **({} if mu is None else {"model_utility": mu})}
    r = TrialResult.scored(alpha, 3, aggregates, 0.7, seconds, "forget_quality", "model_utility", trial_id=f"t{alpha}")
    if mu is None:
        return r
    return TrialResult(**{**r.__dict__, "screen_seconds": screen_seconds})


def test_a_point_screened_only_is_never_chosen_nor_on_a_front_nor_at_a_floor() -> None:
    rows = [_row(0.0, 0.01, 0.80), _row(1.0, 0.05, 0.75, 3.0, 1.0), _row(2.0, 0.90, None, 1.0)]
    screened = rows[2]
    assert screened.fidelity == "screen" and not screened.feasible and math.isnan(screened.utility)
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
