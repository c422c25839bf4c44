"""Benchmark: what logging one search trial's MLflow child run costs Tune's loop, through an `mlflow server` (how a
cluster logs) and a sqlite file: uipe's TrialLogger as shipped (the parent's child runs read once per process)
against the baseline it replaced, measured in the same run: each trial first searching every child run of its
parent (`log_trial` with its check on).

    .venv/bin/python scripts/bench_trial_logging.py [--trials 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from bench_mlflow_server import free_port, wait_for  # noqa: E402


def per_trial_seconds(uri: str, trials: int, cached: bool) -> list[float]:
    """Seconds per trial of logging `trials` trials under a fresh parent run."""
    from uipe import tracking
    from uipe.results import TrialResult

    exp_id = tracking.client(uri).create_experiment(f"bench-{time.time_ns()}")
    parent = tracking.create_run(uri, exp_id, "search-ga", {})
    logger = tracking.TrialLogger(uri, exp_id, parent, "ga")
    out = []
    for i in range(trials):
        report = {"objective": -1.0 - i / trials, "utility": 0.8, "forget_quality": 0.01 * i, "model_utility": 0.8}
        t0 = time.perf_counter()
        if cached:
            trial = SimpleNamespace(trial_id=f"t{i:03d}", config={"alpha": 0.1 * i, "epoch": 1}, last_result=report)
            logger.on_trial_complete(0, [], trial)
        else:
            record = TrialResult.from_report(f"t{i:03d}", {"alpha": 0.1 * i, "epoch": 1}, report)
            tracking.log_trial(uri, exp_id, parent, "ga", record)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60)
    args = ap.parse_args()
    from uipe.tracking import SERVER_ENV

    root = Path(tempfile.mkdtemp(prefix="uipe-bench-trial-logging-"))
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{root / 'server.db'}", "--default-artifact-root", str(root / "art"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **SERVER_ENV},
                              start_new_session=True)
    rows = {}
    try:
        wait_for(f"http://127.0.0.1:{port}/health", None, server)
        for store, uri in (("server", f"http://127.0.0.1:{port}"), ("sqlite", f"sqlite:///{root / 'file.db'}")):
            per_trial_seconds(uri, 3, True)  # warm-up: imports, connections, tables
            for cached in (False, True):  # baseline first
                s = per_trial_seconds(uri, args.trials, cached)
                rows[f"{store}_{'once_per_process' if cached else 'search_per_trial'}"] = {
                    "mean_ms": round(1000 * statistics.mean(s), 1), "first10_ms": round(1000 * statistics.mean(s[:10]), 1),
                    "last10_ms": round(1000 * statistics.mean(s[-10:]), 1)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    ratios = {store: round(rows[f"{store}_once_per_process"]["mean_ms"] / rows[f"{store}_search_per_trial"]["mean_ms"], 3)
              for store in ("server", "sqlite")}
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "trials": args.trials, **rows, "ratio_once_per_process_vs_search_per_trial": ratios}, indent=1))


if __name__ == "__main__":
    main()
