"""Benchmark: Tune's overhead over a run's whole search stage (issue 27's goal: <= 10%), this checkout's code against
a baseline checkout's, measured in the same run, alternating.

    git archive <rev> uipe | tar -x -C /tmp/uipe-base     # the baseline's code
    .venv/bin/python scripts/bench_search_stage.py --world /tmp/run --baseline /tmp/uipe-base --repeats 2

--world: a finished `uipe run` folder (every method of its config unlearned). Each run copies it without its
searches and runs `uipe run --run-dir COPY` on it, which reuses the data, models and checkpoints and runs only the
searches, with this checkout's uipe or the baseline's (PYTHONPATH), on a local Ray of its own. Per run, from the
searches' result.json: the stage's wall (the searches' seconds, summed), its trial work, the overhead 1 - work /
(slots x wall), each search's wall, and the whole command's wall.

--vary KEY=VALUE (repeatable) compares the stage at another trial size instead of another code, e.g. TOFU's own
generation length, which makes each tiny trial several times longer:

    .venv/bin/python scripts/bench_search_stage.py --world /tmp/run --vary eval.max_new_tokens=200 --repeats 1
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
from chaos import copy_world  # noqa: E402


def timed_uipe(command: str, folder: Path, code: Path | None, overrides: list[str]) -> float:
    """`uipe COMMAND --run-dir FOLDER` with `code`'s uipe (PYTHONPATH; None: this checkout's), on a local Ray of its
    own: its wall seconds; a failure stops the benchmark with the command's last output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    sets = [a for s in overrides for a in ("--set", s)]
    t0 = time.time()
    # run from the folder's parent: `python -m` puts the working folder first on sys.path, before PYTHONPATH
    done = subprocess.run([sys.executable, "-m", "uipe.cli", command, "--run-dir", str(folder), *sets],
                          capture_output=True, text=True, env=env, cwd=folder.parent)
    if done.returncode:
        raise SystemExit(f"uipe {command} in {folder} failed: {done.stdout[-800:]} {done.stderr[-800:]}")
    return time.time() - t0


def one_stage(world: Path, dest: Path, code: Path | None, overrides: list[str]) -> dict:
    folder = copy_world(world, "search", dest)
    command = timed_uipe("run", folder, code, overrides)
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted((folder / "search").glob("*/result.json"))}
    wall = sum(r["search_seconds"] for r in results.values())
    work = sum(r["trial_work_seconds"] for r in results.values())
    slots = {r["max_concurrent_trials"] for r in results.values()}
    if len(slots) != 1:
        raise SystemExit(f"{folder}: searches of different concurrency {sorted(slots)}")
    return {"stage_s": wall, "work_s": work, "overhead": 1 - work / (wall * slots.pop()), "command_s": command,
            "trials": sum(r["trials"] for r in results.values()),
            "searches_s": {m: round(r["search_seconds"], 1) for m, r in results.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, help="a folder holding the baseline's uipe package")
    ap.add_argument("--vary", action="append", default=[],
                    help="instead of --baseline: this checkout again with these overrides added (KEY=VALUE)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="the world's config overrides")
    args = ap.parse_args()
    if (args.baseline is None) == (not args.vary):
        raise SystemExit("--baseline or --vary: one of them, to compare against")
    if args.baseline and not (args.baseline / "uipe" / "__init__.py").is_file():
        raise SystemExit(f"{args.baseline}: no uipe package in it")
    work = Path(tempfile.mkdtemp(prefix="uipe-bench-stage-"))
    other = "baseline" if args.baseline else "varied"
    arms = {"this checkout": (None, args.overrides),  # arm -> (code, overrides)
            other: (args.baseline.resolve(), args.overrides) if args.baseline else (None, args.overrides + args.vary)}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for i in range(args.repeats):
        for name in arms if i % 2 == 0 else reversed(arms):
            code, overrides = arms[name]
            r = one_stage(args.world.resolve(), work / f"{name.split()[0]}-{i}", code, overrides)
            runs[name].append(r)
            print(f"{name} {i}: {json.dumps(r)}", flush=True)
    summary = {name: {k: round(statistics.mean(r[k] for r in rs), 3) for k in ("stage_s", "work_s", "overhead",
                                                                               "command_s", "trials")}
               for name, rs in runs.items()}
    if args.vary:
        summary[other]["overrides"] = args.vary
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "repeats": args.repeats, **summary,
                      f"stage_ratio_this_vs_{other}":
                          round(summary["this checkout"]["stage_s"] / summary[other]["stage_s"], 3),
                      # the searches' seconds are what each code counts as a search (since f1b2162 they include
                      # theta_ini's measurement and the MLflow run): the command's wall is comparable across codes
                      f"command_ratio_this_vs_{other}":
                          round(summary["this checkout"]["command_s"] / summary[other]["command_s"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
