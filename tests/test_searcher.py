"""The Optuna searcher driven as Tune drives it (suggest, then on_trial_complete per finished trial), with no Ray: two
trials in flight, trials timed two ways."""

from __future__ import annotations

import contextlib

import pytest

from uipe.results import CONSTRAINT


def _searcher(in_order: bool, sampler=None, points: list | None = None):
    """One x in [0, 1], maximised, c = 2 trials in flight (what Tune's ConcurrencyLimiter sets)."""
    import optuna
    from optuna.distributions import FloatDistribution

    from uipe.search.searcher import ConstrainedOptunaSearch

    search = ConstrainedOptunaSearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="objective", mode="max",
                                     points_to_evaluate=points, in_order=in_order,
                                     sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    assert search.set_max_concurrency(2) is False  # Tune still limits the trials in flight
    return search


def _search(in_order: bool, seconds: list[float], n: int = 8) -> tuple[list[float], int]:
    """Run n trials of `x`, two at a time, trial i taking seconds[i]; each scores x. The points suggested, by trial,
    and how often a free slot had to wait for a suggestion."""
    import optuna

    search = _searcher(in_order, optuna.samplers.TPESampler(seed=0, n_startup_trials=1, constant_liar=True))
    points: list[float] = []
    running: dict[int, float] = {}  # trial -> when it finishes
    now, waits = 0.0, 0
    while len(points) < n or running:
        while len(running) < 2 and len(points) < n:
            config = search.suggest(f"t{len(points)}")
            if config is None:
                waits += 1
                assert running, "a suggestion waits for a trial that is not running"
                break
            running[len(points)] = now + seconds[len(points)]
            points.append(config["x"])
        first = min(running, key=running.get)
        now = running.pop(first)
        search.on_trial_complete(f"t{first}", {"objective": points[first], CONSTRAINT: -1.0})
    return points, waits


def test_in_order_a_seed_suggests_the_same_points_however_the_trials_are_timed() -> None:
    even = [1.0] * 8  # trials finish in the order they started
    slow_first = [2.5] + [1.0] * 7  # trial 1 finishes before trial 0, and later trials shift
    points, waits = _search(True, even)
    again, waited = _search(True, slow_first)
    assert again == points and len(set(points)) == 8
    # even: never a wait. slow first: trial 2 may see only trial 0, so its slot waits once (from 1.0 s to 2.5 s)
    assert waits == 0 and waited == 1
    # without the order, trial 2 is suggested from trial 1's score instead of trial 0's: another search
    plain, plain_waits = _search(False, even)
    assert plain == points  # timed as suggested, the order changes nothing
    assert _search(False, slow_first)[0][2:] != points[2:] and plain_waits == 0


def test_in_order_a_trial_that_finished_early_is_told_in_its_turn() -> None:
    search = _searcher(True, points=[{"x": 0.25}, {"x": 0.75}])
    assert [search.suggest(t)["x"] for t in ("a", "b")] == [0.25, 0.75]  # the points to evaluate first, in order
    search.on_trial_complete("b", {"objective": 0.75, CONSTRAINT: 0.5})
    states = [t.state.name for t in search._ot_study.trials]
    assert states == ["RUNNING", "RUNNING"]  # b is held back: a is older and still running
    assert search.suggest("c") is None  # c may see a, which has not finished
    search.on_trial_complete("a", {"objective": 0.25, CONSTRAINT: -0.1})
    assert search.suggest("c") is not None  # told: a only (trials 0 .. 2 - 2); b waits for d's turn
    trials = search._ot_study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING", "RUNNING"]
    assert trials[0].value == pytest.approx(0.25) and trials[0].constraints == {CONSTRAINT: -0.1}
    search.suggest("d")
    assert [t.state.name for t in search._ot_study.trials][:2] == ["COMPLETE", "COMPLETE"]
    assert search._ot_study.trials[1].constraints == {CONSTRAINT: 0.5}


def test_the_space_file_or_the_config_says_whether_trials_are_told_in_order() -> None:
    from uipe.config import load_config
    from uipe.search.driver import resolve_space
    from uipe.search.space import SearchSpace, build_searcher, default_space_path, load_space
    from uipe.study.driver import seed_config

    assert not load_space(default_space_path("ga"), "ga").deterministic  # as shipped: as finished, the faster
    assert build_searcher(SearchSpace(method="ga", deterministic=True), [1, 2], 0)._in_order
    assert not build_searcher(SearchSpace(method="ga"), [1, 2], 0)._in_order
    # the grid's order is its seed's, whatever finished first: nothing to hold back
    grid = SearchSpace(method="ga", sampler="grid", grid_step=0.5, deterministic=True)
    assert not build_searcher(grid, [1, 2], 0)._in_order
    cfg = load_config(None, ["search.deterministic=true"])  # --set overrides every space file
    assert resolve_space(cfg, "ga", None)[1].deterministic
    # uipe study repeats its searches from their seeds, unless told otherwise
    assert seed_config(load_config(None, []), 3, "sqlite:///x.db", "e", "p").search.deterministic is True
    off = load_config(None, ["search.deterministic=false"])
    assert seed_config(off, 3, "sqlite:///x.db", "e", "p").search.deterministic is False


def test_a_constraint_blind_sampler_is_told_infeasible_trials_below_every_feasible_one() -> None:
    from uipe.search.searcher import INFEASIBLE_VALUE, ranked_infeasible

    # worked by hand: INFEASIBLE_VALUE - violation, so 0.2 over the floor ranks above 0.5 over it
    assert INFEASIBLE_VALUE == -1e6
    assert ranked_infeasible(0.2) == pytest.approx(-1_000_000.2)
    assert ranked_infeasible(0.5) == pytest.approx(-1_000_000.5)
    assert ranked_infeasible(0.2) > ranked_infeasible(0.5)


def _cmaes_search(rank_infeasible_last: bool, n: int = 40) -> tuple[list[float], list]:
    """The weighted form's (alpha, retain_lambda) under CMA-ES, one trial at a time: objective alpha, feasible while
    alpha <= 1.5 (constraint alpha - 1.5), as forgetting against a utility floor."""
    from uipe.search.space import SearchSpace, build_searcher

    search = build_searcher(SearchSpace(method="ga", form="weighted", sampler="cmaes", startup_trials=2), [1, 2], 0)
    assert search._rank_infeasible_last  # a cmaes space turns it on
    search._rank_infeasible_last = rank_infeasible_last
    search.set_max_concurrency(1)
    alphas = []
    # set as a constraint (the blind arm), CMA-ES warns that it reads none: why the ranked arm tells none
    blind = pytest.warns(UserWarning, match="CmaEsSampler will not use them")
    with contextlib.nullcontext() if rank_infeasible_last else blind:
        for i in range(n):
            _tell_one(search, i, alphas)
    return alphas, search._ot_study.trials


def _tell_one(search, i: int, alphas: list[float]) -> None:
    config = search.suggest(f"t{i}")
    assert config["epoch"] in (1, 2)  # categorical: drawn by TPE beside CMA-ES
    alphas.append(config["alpha"])
    search.on_trial_complete(f"t{i}", {"objective": config["alpha"], CONSTRAINT: config["alpha"] - 1.5})


def test_cmaes_moves_the_coefficients_and_infeasible_points_rank_last() -> None:
    alphas, trials = _cmaes_search(True)
    # the base points first (alpha 0 at epochs 2 and 1), then CMA-ES's own, each marked with its generation
    assert alphas[:2] == [0.0, 0.0] and sum("cma:generation" in t.system_attrs for t in trials) >= 30
    for a, t in zip(alphas, trials):
        assert t.value == pytest.approx(a if a <= 1.5 else -1e6 - (a - 1.5))
        assert not t.constraints  # the value carries the constraint: CMA-ES reads none (and would warn)
    # told the raw objective, CMA-ES climbs alpha past the floor for good; told the ranking, it comes back to it
    blind, _ = _cmaes_search(False)
    assert sum(a <= 1.5 for a in blind[20:]) == 0
    assert sum(a <= 1.5 for a in alphas[20:]) >= 5


def test_cmaes_needs_a_form_with_two_coefficients_and_one_objective(tmp_path) -> None:
    from uipe.errors import UipeError
    from uipe.search.space import SearchSpace, load_space

    path = tmp_path / "ga.yaml"
    path.write_text("method: ga\nsampler: cmaes\n")
    with pytest.raises(UipeError, match=r"ga\.yaml: \(top level\): Value error, sampler cmaes: needs at least two"):
        load_space(path, "ga")
    path.write_text("method: ga\nsampler: cmaes\nform: groups\nobjective: pareto\n")
    with pytest.raises(UipeError, match="sampler cmaes: optimises one objective, not pareto"):
        load_space(path, "ga")
    # beside the same form's TPE search in one run folder
    assert SearchSpace(method="ga", form="groups", sampler="cmaes").label("ga") == "ga-groups-cmaes"
    assert SearchSpace(method="ga", form="groups").label("ga") == "ga-groups"
