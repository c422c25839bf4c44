"""Training progress and metrics from Ray Train workers to the driver, the one writer of the tracking store.

Rank 0 of a fit posts events to a small Ray actor (`Board`, no CPU) that the driver created; a driver thread
(`Follower`) drains it twice a second, logs the metrics to MLflow and updates the console's progress display. So no
worker process ever opens the tracking store (SQLite over a shared file system breaks with writers on several hosts),
and the driver's console shows live progress without Ray's forwarded worker output.

Events are plain dicts, each naming its job (several jobs may share one fit): {"kind": "steps", "job": label,
"rows": [(step, {metric: value})]}, {"kind": "epoch", "job": label, "epoch": e, "step": s, "metrics": {...}},
{"kind": "final", "job": label, "metrics": {...}} (prepare's gate figures), {"kind": "done", "job": label}.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray

POLL_S = 0.5
POST_EVERY_S = 5.0  # a long epoch still shows live step metrics


@ray.remote(num_cpus=0)
class Board:
    """A mailbox: workers append, the driver drains."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(events)

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class Reporter:
    """Worker side (rank 0) of one job: buffer step metrics, post them with each epoch (or every few seconds); fire
    and forget."""

    def __init__(self, board: Any, job: str) -> None:
        self.board, self.job, self.rows, self.last_post = board, job, [], time.monotonic()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))
        if time.monotonic() - self.last_post > POST_EVERY_S:
            self._post([])

    def epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self._post([{"kind": "epoch", "epoch": epoch, "step": step, "metrics": metrics}])

    def final(self, step: int, metrics: dict[str, float]) -> None:
        self._post([{"kind": "final", "step": step, "metrics": metrics}])

    def done(self) -> None:
        self._post([{"kind": "done"}])

    def _post(self, events: list[dict[str, Any]]) -> None:
        if self.board is None:
            return
        batch = ([{"kind": "steps", "rows": self.rows}] if self.rows else []) + events
        if batch:
            self.board.post.remote([{**event, "job": self.job} for event in batch])
        self.rows, self.last_post = [], time.monotonic()


class Follower:
    """Driver side: a thread that drains the board and hands each event to `handle`, until stopped (then once more)."""

    def __init__(self, board: Any, handle: Callable[[dict[str, Any]], None]) -> None:
        self.board, self.handle = board, handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uipe-progress", daemon=True)

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # what the last epoch posted just before the fit returned

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        for event in ray.get(self.board.drain.remote()):
            self.handle(event)
