"""The one Ray session a uipe process works in (training, the search, the tests)."""

from __future__ import annotations

import os

import ray

from uipe.signals import stop_on_sigterm


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

