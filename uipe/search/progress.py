"""The search's progress display on the driver (a Tune callback): trials done, the best feasible objective so far, an
ETA, named with the catalogue's short labels."""

from __future__ import annotations

from typing import Any

from ray import tune

from uipe.console import Task


class Progress(tune.Callback):
    """The search's progress display on the driver: trials done, the best feasible objective so far, an ETA."""

    utility = "utility"  # a callback Tune pickled in an older search has no utility name of its own

    def __init__(self, method: str, total: int, label: str, utility: str) -> None:
        self.method, self.total, self.done, self.failed, self.best = method, total, 0, 0, None
        self.label, self.utility = label, utility  # the catalogue's short names of the objective and the utility
        self.task: Task | None = None

    def setup(self, **info: Any) -> None:
        self.task = Task(f"search {self.method}", self.total)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        if r.get("feasible") and (self.best is None or r["objective"] > self.best):
            self.best = r["objective"]
        # a form's summary alpha is what the trial reported (the groups form's config holds one alpha per group)
        alpha = r.get("alpha", trial.config.get("alpha", float("nan")))
        self._advance(f"last alpha {alpha:.3f} epoch {trial.config['epoch']} "
                      f"{self.label} {r.get('objective', float('nan')):.3g} "
                      f"{self.utility} {r.get('utility', float('nan')):.3f}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self._advance(f"last alpha {trial.config.get('alpha', float('nan')):.3f} epoch {trial.config['epoch']} FAILED "
                      "(recorded in MLflow; the search goes on)")

    def _advance(self, last: str) -> None:
        self.done += 1
        best = f"{self.best:.3g}" if self.best is not None else "none yet"
        failed = f", {self.failed} failed" if self.failed else ""
        if self.task is not None:
            self.task.update(self.done, f"trial {self.done}/{self.total} | best feasible {self.label} {best}{failed} | "
                                    f"{last}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.task is not None:
            self.task.finish()

    def __getstate__(self) -> dict:  # Tune checkpoints its callbacks; a live display does not pickle
        return {**self.__dict__, "task": None}
