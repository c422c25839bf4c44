"""The one Ray session a uipe process works in (training, the search, the tests)."""

from __future__ import annotations

import os
import signal
import threading

import ray


def ensure_ray() -> None:
    """Join the cluster RAY_ADDRESS names (a `ray job submit` entrypoint, a test's shared session), or start a local
    Ray, unless one is up: the CLI, the search and the tests share one session.

    The local Ray keeps its dashboard (on 127.0.0.1): it serves the State API, which Ray Train V2's
    PlacementGroupCleaner polls during every fit; without it that actor logs "Failed to query Ray Train Controller
    actor state" every few seconds (Ray 2.60).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # include_dashboard may not be passed when connecting to an existing cluster
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
    stop_on_sigterm()


def stop_on_sigterm() -> None:
    """A SIGTERM (a scheduler's stop, `kill`) stops the process as Ctrl+C does: Tune stops its trials and uipe says
    `--resume`. Without this, the handler ray.init installs prints a C++ stack to the log and exits 15 with nothing
    on the console (seen in scripts/chaos.py's driver-sigterm runs). Main thread only, where Python handles signals."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_interrupt)


def _as_interrupt(signum: int, frame: object) -> None:
    # SIGINT's handler: Tune's graceful stop during a fit, else Python's KeyboardInterrupt. A process started in the
    # background inherits SIGINT ignored, which would swallow the SIGTERM too (seen in a chaos run): raise then.
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)
