"""Benchmark: the gap between a slot's trials in a real search, logging to an `mlflow server` against a sqlite file
(the baseline, measured in the same run, alternating), and Tune's overhead of each (issue 30's goal: with a server
no worse than with sqlite).

    .venv/bin/python scripts/bench_trial_gap.py --world /tmp/uipe-chaos-x/world --repeats 3

--world: a run folder with GA unlearned (scripts/chaos.py builds one under its --work folder). Each search runs a
fresh copy of it: the same 4 x 2 grid as the chaos run, 2 trials at a time, `uipe search` as a user runs it, on a
local Ray it starts itself. Per search, from its result.json: gap per slot = (wall x slots - trial work) / trials.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import GRID, copy_world  # noqa: E402
from chaos_services import TrackingServer  # noqa: E402


def one_search(world: Path, work: Path, name: str, uri: str, overrides: list[str]) -> dict:
    folder = copy_world(world, "search", work / name)
    sets = [a for s in [*overrides, f"tracking.uri={uri}", f"tracking.experiment=gap-{name}"] for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "uipe.cli", "search", "--method", "ga", "--run-dir", str(folder),
                           "--space", str(work / "grid.yaml"), *sets], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"search {name} failed: {done.stderr[-500:]}")
    r = json.loads((folder / "search" / "ga" / "result.json").read_text())
    slots = r["max_concurrent_trials"]
    return {"gap_s": (r["search_seconds"] * slots - r["trial_work_seconds"]) / r["trials"],
            "tune_overhead": r["tune_overhead"], "search_s": r["search_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=["unlearn.epochs=2"],
                    help="the world's config overrides (default: the chaos world's)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uipe-bench-gap-"))
    (work / "grid.yaml").write_text(GRID)
    server = TrackingServer(f"sqlite:///{work / 'server.db'}", work / "server")
    server.start()
    rows: dict[str, list[dict]] = {"sqlite": [], "server": []}
    try:
        for i in range(args.repeats):
            for store in ("sqlite", "server") if i % 2 == 0 else ("server", "sqlite"):
                uri = server.url if store == "server" else f"sqlite:///{work / f'{store}-{i}.db'}"
                rows[store].append(one_search(args.world.resolve(), work, f"{store}-{i}", uri, args.overrides))
                print(f"{store} {i}: {rows[store][-1]}", flush=True)
    finally:
        server.stop()
    summary = {store: {k: round(statistics.mean(r[k] for r in runs), 3) for k in runs[0]}
               for store, runs in rows.items()}
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "repeats": args.repeats, **summary,
                      "gap_ratio_server_vs_sqlite": round(summary["server"]["gap_s"] / summary["sqlite"]["gap_s"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
