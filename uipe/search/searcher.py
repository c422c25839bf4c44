"""The Optuna searcher every search runs through Tune: the utility constraint told with each value, and finished
trials told in the order they were suggested where a seed must fix the search (SearchSpace.deterministic)."""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from uipe.results import CONSTRAINT, FULL_FIDELITY


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that records each trial's utility constraint before telling Optuna its value and, `in_order`,
    tells Optuna the finished trials in the order it suggested them.

    In order: with c trials in flight (Tune's max_concurrent_trials), suggestion k (from 0) waits until trials 0 to
    k - c have finished, and the sampler has been told exactly those; a later trial that finished first is held back,
    still running to the sampler (TPE's constant liar), until its turn. Every suggestion then sees the same history
    whatever the timing, so the seed fixes the search. The cost is Tune's: once a slot has waited, Ray 2.60 keeps
    one idle trial process of two and tends to run one trial at a time from then on (1.44x the wall time of a tiny
    search; Tune's ConcurrencyLimiter in batch mode does the same after its first batch): docs/BENCHMARKS.md.
    """

    # a searcher restored from a search folder written before these options existed has none of them
    _in_order, _in_flight, _told, _rank_infeasible_last = False, 1, 0, False

    def __init__(self, space: dict, metric: str | list[str], mode: str | list[str], points_to_evaluate: list | None,
                 sampler: Any, in_order: bool = False, rank_infeasible_last: bool = False) -> None:
        """`rank_infeasible_last`: for a sampler that reads no constraint (CMA-ES), an infeasible trial is told
        INFEASIBLE_VALUE minus its violation, below every feasible value and the less violating ones higher."""
        super().__init__(space=space, metric=metric, mode=mode, points_to_evaluate=points_to_evaluate,
                         sampler=sampler)
        self._in_order, self._order, self._held = in_order, [], {}
        self._rank_infeasible_last = rank_infeasible_last

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._in_flight = max_concurrent
        return False  # Tune's ConcurrencyLimiter still limits the trials in flight

    def suggest(self, trial_id: str) -> dict | None:
        if self._in_order:
            while self._told <= len(self._order) - self._in_flight:  # trials 0 .. k - c, told in order
                oldest = self._order[self._told]
                if oldest not in self._held:
                    return None  # still running: Tune asks again at its next step
                self._tell(oldest, *self._held.pop(oldest))
                self._told += 1
        config = super().suggest(trial_id)
        if self._in_order and isinstance(config, dict):
            self._order.append(trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._in_order and trial_id in self._order[self._told:]:
            self._held[trial_id] = (result, error)
        else:
            self._tell(trial_id, result, error)

    def restore(self, checkpoint_path: str) -> None:
        """A resumed search (Tune restores the searcher's last save): what it holds is told, and the order starts
        again from here. A trial it waited for may have finished after that save and will not report again, and the
        trials in flight at the stop run again in another order: waiting for them could stall the search."""
        super().restore(checkpoint_path)
        if self._in_order:
            for trial_id in self._order[self._told:]:
                if trial_id in self._held:
                    self._tell(trial_id, *self._held.pop(trial_id))
            self._told = len(self._order)

    def _tell(self, trial_id: str, result: dict | None, error: bool) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and CONSTRAINT in result:
            # a trial stopped after its screening pass has no utility: infeasible to the sampler (a point evaluated
            # in full dominates it), while its objective, exact at screening, still informs the model
            screened = not result.get(FULL_FIDELITY, 1.0)
            violation = 1.0 if screened else float(result[CONSTRAINT])
            if not self._rank_infeasible_last:
                ot_trial.set_constraint(CONSTRAINT, violation)
            elif violation > 0:  # the value carries the constraint (CMA-ES would warn that it reads none)
                result = {**result, self._metric: ranked_infeasible(violation)}
        super().on_trial_complete(trial_id, result=result, error=error)


INFEASIBLE_VALUE = -1e6  # below any objective a trial reports (log10 forget quality, a signal in [-1, 1] or so)


def ranked_infeasible(violation: float) -> float:
    """The value a constraint-blind sampler is told for an infeasible trial (violation > 0): below every feasible
    value, and higher the smaller the violation, so the sampler still moves towards the feasible region."""
    return INFEASIBLE_VALUE - violation
