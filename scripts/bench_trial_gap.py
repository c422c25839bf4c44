"""Benchmark: the gap between a slot's trials in a real search, logging to an `mlflow server` against a sqlite file
(the baseline, measured in the same run, alternating), and Tune's overhead of each (issue 30's goal: with a server
no worse than with sqlite).

    .venv/bin/python scripts/bench_trial_gap.py --world /tmp/uipe-chaos-x/world --repeats 3

--world: a run folder with GA unlearned (scripts/chaos.py builds one under its --work folder). Each search runs a
fresh copy of it: the chaos run's grid with a finer alpha step, 2 trials at a time, `uipe search` as a user runs
it, on a local Ray it starts itself. Per search, from its result.json: overhead per trial and slot = (wall x slots -
trial work) / trials, which counts Tune's start and end; and from each trial's own record in Tune's folder (the wall
clock when the trial function began and when it reported): the gap between a slot's trials, each trial's start minus
the end of the slot it took (the slot free longest, as Tune hands a free actor the next trial).
"""

from __future__ import annotations

import argparse
import heapq
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

from uipe.report import from_csv  # noqa: E402
from uipe.search.pool import WALL_CLOCK  # noqa: E402


def slot_gaps(spans: list[tuple[float, float]], slots: int) -> list[float]:
    """Each trial's start minus the end of the slot it took, trials in start order; the first `slots` trials start
    Tune's free slots and have no gap."""
    ends: list[float] = []
    gaps = []
    for start, end in sorted(spans):
        if len(ends) < slots:
            heapq.heappush(ends, end)
            continue
        gaps.append(start - heapq.heapreplace(ends, end))
    return gaps


def trial_spans(tune_dir: Path) -> list[tuple[float, float]]:
    """(began, reported) of every trial, from the last line of its result.json in Tune's experiment folder."""
    spans = []
    for f in tune_dir.glob("*/result.json"):
        last = json.loads(f.read_text().strip().splitlines()[-1])
        spans.append((last[WALL_CLOCK[0]], last[WALL_CLOCK[1]]))
    return spans


def one_search(world: Path, work: Path, name: str, uri: str, overrides: list[str], space: Path | None = None,
               environ: dict | None = None) -> dict:
    """A GA search of `space` (default: the work folder's grid.yaml) in a fresh copy of the world: its timings,
    from its result.json and its trials' wall clocks, and the points it tried ("points", sorted)."""
    folder = copy_world(world, "search", work / name)
    sets = [a for s in [*overrides, f"tracking.uri={uri}", f"tracking.experiment=gap-{name}"] for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "uipe.cli", "search", "--method", "ga", "--run-dir", str(folder),
                           "--space", str(space or work / "grid.yaml"), *sets], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(environ or {})})
    if done.returncode:
        raise SystemExit(f"search {name} failed: {done.stderr[-500:]}")
    r = json.loads((folder / "search" / "ga" / "result.json").read_text())
    slots = r["max_concurrent_trials"]
    gaps = slot_gaps(trial_spans(folder / "search" / "ga" / "tune"), slots)
    rows = from_csv((folder / "search" / "ga" / "results.csv").read_text())
    return {"between_trials_s": statistics.mean(gaps), "between_trials_max_s": max(gaps),
            "overhead_per_trial_slot_s": (r["search_seconds"] * slots - r["trial_work_seconds"]) / r["trials"],
            "tune_overhead": r["tune_overhead"], "search_s": r["search_seconds"],
            "points": sorted((r.alpha, r.epoch) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grid-step", type=float, default=0.25,
                    help="alpha's step over the chaos grid's [0, 1.5] x epochs 1, 2 (0.25: 14 trials, 12 gaps)")
    ap.add_argument("--set", dest="overrides", action="append", default=["unlearn.epochs=2"],
                    help="the world's config overrides (default: the chaos world's)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uipe-bench-gap-"))
    (work / "grid.yaml").write_text(GRID.replace("grid_step: 0.5", f"grid_step: {args.grid_step}"))
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
    summary = {store: {k: round(statistics.mean(r[k] for r in runs), 3) for k in runs[0] if k != "points"}
               for store, runs in rows.items()}
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "repeats": args.repeats, **summary,
                      "gap_ratio_server_vs_sqlite":
                          round(summary["server"]["between_trials_s"] / summary["sqlite"]["between_trials_s"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
