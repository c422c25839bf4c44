"""Benchmark: what MLflow 3's GenAI job runner costs an `mlflow server` uipe starts, with it on (MLflow's default) and
off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, uipe's setting: uipe runs none of those jobs).

Per start, alternating on/off: seconds until /health answers, seconds until a store request answers, and, after
`--settle` seconds, the number of processes in the server's process group and their summed resident memory (from
/proc). The baseline is the default (on), measured in the same run; ratios off/on are printed.

    .venv/bin/python scripts/bench_mlflow_server.py [--store sqlite:///runs/tiny/mlflow.db] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VAR = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_memory(pgid: int) -> tuple[int, int]:
    """(processes, summed VmRSS bytes) of every process in process group `pgid`."""
    count, rss = 0, 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:  # field 5 of stat: pgrp
                continue
            kb = next(int(ln.split()[1]) for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmRSS"))
        except (OSError, StopIteration, ValueError):
            continue
        count, rss = count + 1, rss + kb * 1024
    return count, rss


def wait_for(url: str, body: bytes | None, proc: subprocess.Popen, limit: float = 180) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        try:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=60)
            return time.perf_counter() - start
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}") from None
            time.sleep(0.1)
    raise TimeoutError(url)


def one_start(store: str, job_runner: bool, settle: float) -> dict:
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, VAR: "true" if job_runner else "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        health = wait_for(f"http://127.0.0.1:{port}/health", None, proc)
        wait_for(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", json.dumps({"max_results": 1}).encode(),
                 proc)
        ready = time.perf_counter() - t0
        time.sleep(settle)
        procs, rss = group_memory(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return {"health_s": health, "ready_s": ready, "processes": procs, "rss_mib": rss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="backend store URI (default: a fresh sqlite file)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after ready before counting processes")
    args = ap.parse_args()
    store = args.store or f"sqlite:///{tempfile.mkdtemp(prefix='uipe-mlflow-bench-')}/mlflow.db"
    print(f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; store {store}")
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(args.repeats):
        for job_runner in ((True, False) if i % 2 == 0 else (False, True)):
            r = one_start(store, job_runner, args.settle)
            runs[job_runner].append(r)
            print(f"job runner {'on ' if job_runner else 'off'}: health {r['health_s']:.1f} s, ready "
                  f"{r['ready_s']:.1f} s, {r['processes']} processes, {r['rss_mib']:.0f} MiB", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ready_s", "processes", "rss_mib")}
           for k, v in runs.items()}
    print("| job runner | ready (median) | processes | resident memory |")
    print("| --- | --- | --- | --- |")
    for k, label in ((True, "on (MLflow's default)"), (False, "off (uipe)")):
        print(f"| {label} | {med[k]['ready_s']:.1f} s | {med[k]['processes']:.0f} | {med[k]['rss_mib']:.0f} MiB |")
    print(f"off/on: ready {med[False]['ready_s'] / med[True]['ready_s']:.2f}x, memory "
          f"{med[False]['rss_mib'] / med[True]['rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
