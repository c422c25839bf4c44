"""Search bookkeeping without Ray: the Pareto front, the constrained choice, the CSV, the space files."""

from __future__ import annotations

from pathlib import Path

import pytest

from uipe.errors import UipeError
from uipe.results import TrialResult
from uipe.decisions import base_row, choose, pareto_front
from uipe.report import plot_search, to_csv
from uipe.search.space import SearchSpace, default_space_path, load_space


def _row(alpha: float, epoch: int, fq: float, mu: float, feasible: bool, status: str = "ok") -> TrialResult:
    if status != "ok":
        return TrialResult.failed(f"t{alpha}-{epoch}", alpha, epoch, "boom")
    return TrialResult(f"t{alpha}-{epoch}", status, alpha, epoch, objective=fq, utility=mu, feasible=feasible,
                       trial_seconds=1.0, metrics={"forget_quality": fq, "model_utility": mu})


ROWS = [
    _row(0.0, 5, 0.01, 0.80, True),   # the base method
    _row(1.0, 5, 0.30, 0.78, True),   # better forgetting, still above the floor
    _row(1.5, 5, 0.90, 0.60, False),  # best forget quality, but below the utility floor
    _row(0.5, 3, 0.20, 0.79, True),   # on the front: less forgetting than (0.30, 0.78) but more utility
    _row(0.5, 4, 0.10, 0.70, True),   # dominated by (0.30, 0.78)
    _row(2.0, 5, 0.0, 0.0, False, status="failed"),
]


def test_choice_is_the_best_feasible_trial_not_the_best_overall() -> None:
    # Feasible completed trials: FQ 0.01, 0.30, 0.20, 0.10 -> alpha 1.0 at epoch 5 wins; alpha 1.5 (FQ 0.90) is
    # infeasible, which is exactly what Ray's get_best_result would have picked.
    assert (choose(ROWS).alpha, choose(ROWS).epoch) == (1.0, 5)
    assert base_row(ROWS).metric("forget_quality") == 0.01


def test_with_no_feasible_trial_the_highest_utility_one_is_flagged() -> None:
    rows = [_row(1.0, 5, 0.5, 0.5, False), _row(2.0, 5, 0.9, 0.3, False)]
    best = choose(rows)
    assert best.alpha == 1.0 and best.feasible == 0.0
    assert choose([_row(1.0, 1, 0, 0, False, status="failed")]) is None


def test_pareto_front_by_hand() -> None:
    # (FQ, MU): (0.01, 0.80) (0.30, 0.78) (0.90, 0.60) (0.20, 0.79) (0.10, 0.70)
    # (0.10, 0.70) is beaten by (0.30, 0.78) on both; every other point is best on one side of some pair.
    front = pareto_front(ROWS)
    assert [(r.metric("forget_quality"), r.utility) for r in front] == [(0.90, 0.60), (0.30, 0.78), (0.20, 0.79),
                                                                         (0.01, 0.80)]


def test_csv_has_one_line_per_trial_sorted_by_epoch_then_alpha(tmp_path: Path) -> None:
    lines = to_csv(ROWS).splitlines()
    assert lines[0].startswith("trial_id,status,alpha,epoch,objective,utility,feasible")
    assert lines[0].endswith(",error,forget_quality,model_utility")  # core fields, then metrics by catalogue
    assert len(lines) == 1 + len(ROWS)
    assert [ln.split(",")[2:4] for ln in lines[1:3]] == [["0.5", "3"], ["0.5", "4"]]
    pngs = plot_search(ROWS, "ga", 0.76, tmp_path, "forget_quality", "model_utility")
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_shipped_space_files_validate() -> None:
    for method in ("ga", "graddiff", "kl", "npo", "simnpo", "idkdpo"):
        space = load_space(default_space_path(method), method)
        assert space.alpha.low == 0.0 and space.utility_floor == 0.95
    grid = SearchSpace(method="ga", sampler="grid", alpha={"low": 0.0, "high": 2.0}, grid_step=0.1)
    assert len(grid.alpha_grid()) == 21 and grid.alpha_grid()[-1] == 2.0 and grid.trials_needed([1, 2, 3]) == 63


def test_default_spaces_ship_inside_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # From a folder that has no tune_spaces/ (an installed wheel, run anywhere) the packaged space is found; a user's
    # own tune_spaces/<method>.yaml in the working directory wins.
    monkeypatch.chdir(tmp_path)
    shipped = default_space_path("npo")
    assert shipped.parent.name == "tune_spaces" and tmp_path not in shipped.parents
    (tmp_path / "tune_spaces").mkdir()
    (tmp_path / "tune_spaces" / "npo.yaml").write_text("method: npo\nnum_samples: 3\n")
    assert default_space_path("npo") == tmp_path / "tune_spaces" / "npo.yaml"
    assert load_space(default_space_path("npo"), "npo").num_samples == 3


def test_a_trial_result_survives_the_trip_through_tune() -> None:
    # MU 0.60 against a threshold of 0.95 x 0.60 = 0.57: constraint 0.57 - 0.60 = -0.03 <= 0, feasible.
    agg = {"forget_quality": 0.25, "model_utility": 0.60, "forget_prob": 0.5, "retain_prob": 0.9}
    r = TrialResult.scored(1.5, 3, agg, 0.57, 2.0, "forget_quality", "model_utility")
    assert r.feasible and r.utility_constraint == pytest.approx(-0.03) and r.metrics["retain_prob"] == 0.9
    reported = {**r.to_report(), "alpha": 1.5, "epoch": 3, "time_total_s": 7.0, "training_iteration": 1}
    back = TrialResult.from_report("t1", {"alpha": 1.5, "epoch": 3}, reported)
    assert (back.trial_id, back.summary(), back.metrics, back.utility_constraint, back.trial_seconds) == (
        "t1", r.summary(), r.metrics, r.utility_constraint, r.trial_seconds)  # Tune's own keys left out
    assert not TrialResult.scored(1.5, 3, {**agg, "model_utility": 0.56}, 0.57, 1.0, "forget_quality",
                                  "model_utility").feasible
    assert back.summary()["related_prob"] is None  # not measured: null in summary.json, not NaN


@pytest.mark.parametrize(("text", "message"), [
    ("method: ga\nalpha: {low: 0, high: 2}\nsampler: tpe\nnum_sample: 4\n", "num_sample: unknown key"),
    ("method: ga\nalpha: {low: 2.0, high: 0.5}\n", "alpha: Value error, alpha bounds reversed"),
    ("method: npo\n", "the file is for 'npo', not 'ga'"),
    ("method: ga\nsampler: random\n", "sampler: Input should be"),
])
def test_bad_space_files_give_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UipeError, match=message) as err:
        load_space(path, "ga")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_an_epoch_without_checkpoint_is_refused() -> None:
    space = SearchSpace(method="ga", epochs=[2, 9])
    with pytest.raises(UipeError, match="epoch 9 has no checkpoint"):
        space.candidate_epochs([1, 2, 3])
    assert space.model_copy(update={"epochs": "all"}).candidate_epochs([3, 1, 2]) == [1, 2, 3]


def test_a_search_outcome_round_trips_through_result_json_and_a_broken_one_is_named() -> None:
    import json

    from uipe.errors import UipeError
    from uipe.results import SearchOutcome

    best = ROWS[1]
    outcome = SearchOutcome("ga", "forget_quality", "model_utility", best.summary(), ROWS[0].summary(),
                            {"model_utility": 0.8}, 0.76, True, 6, 1, [best.summary()],
                            {"0.95": {"base": None, "uipe": best.summary()}}, 10.0, 12.0, {"full": 5},
                            0.4, 2, "run1", "/tmp/chosen")
    doc = json.loads(json.dumps(outcome.to_json()))
    assert SearchOutcome.from_json(doc, "result.json") == outcome and outcome.registered is None
    del doc["utility_threshold"]
    with pytest.raises(UipeError, match=r"^r/result.json: not a search result \(no 'utility_threshold'\)"):
        SearchOutcome.from_json(doc, "r/result.json")
