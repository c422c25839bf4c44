"""Benchmark: what logging one search trial's MLflow child run costs Tune's loop, through an `mlflow server` (how a
cluster logs) and a sqlite file: uipe's TrialLogger as shipped (handed to its thread) against the two baselines it
replaced, measured in the same run: each trial first searching every child run of its parent (`log_trial` with its
check on), and the logger writing in the loop with the children read once per process.

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


MODES = ("search_per_trial", "in_loop", "on_thread")


def per_trial_seconds(uri: str, trials: int, mode: str) -> tuple[list[float], float]:
    """(Seconds Tune's loop waits per trial, seconds until all `trials` are logged) under a fresh parent run.
    search_per_trial: `log_trial` searching every child run first (before 82111fa); in_loop: the logger's own write
    in the loop (child runs read once per process, 82111fa..); on_thread: as shipped, handed to the logger's thread."""
    from uipe import tracking
    from uipe.results import TrialResult

    exp_id = tracking.client(uri).create_experiment(f"bench-{time.time_ns()}")
    parent = tracking.create_run(uri, exp_id, "search-ga", {})
    logger = tracking.TrialLogger(uri, exp_id, parent, "ga")
    out, start = [], time.perf_counter()
    for i in range(trials):
        report = {"objective": -1.0 - i / trials, "utility": 0.8, "forget_quality": 0.01 * i, "model_utility": 0.8}
        record = TrialResult.from_report(f"t{i:03d}", {"alpha": 0.1 * i, "epoch": 1}, report)
        t0 = time.perf_counter()
        if mode == "on_thread":
            trial = SimpleNamespace(trial_id=f"t{i:03d}", config={"alpha": 0.1 * i, "epoch": 1}, last_result=report)
            logger.on_trial_complete(0, [], trial)
        elif mode == "in_loop":
            logger._write(record, "")
        else:
            tracking.log_trial(uri, exp_id, parent, "ga", record)
        out.append(time.perf_counter() - t0)
    logger.flush()
    return out, time.perf_counter() - start


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
            per_trial_seconds(uri, 3, "in_loop")  # warm-up: imports, connections, tables
            for mode in MODES:  # baselines first
                s, total = per_trial_seconds(uri, args.trials, mode)
                rows[f"{store}_{mode}"] = {
                    "loop_ms": round(1000 * statistics.mean(s), 2), "last10_loop_ms": round(1000 * statistics.mean(s[-10:]), 2),
                    "all_logged_ms_per_trial": round(1000 * total / args.trials, 1)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    ratios = {f"{store}_{mode}": round(rows[f"{store}_{mode}"]["loop_ms"] / rows[f"{store}_search_per_trial"]["loop_ms"], 4)
              for store in ("server", "sqlite") for mode in MODES[1:]}
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "trials": args.trials, **rows, "loop_ratio_vs_search_per_trial": ratios}, indent=1))


if __name__ == "__main__":
    main()
