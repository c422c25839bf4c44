"""Benchmark: `uipe prepare` (the tiny preset's target and retain models, side by side on one worker each), this
checkout's code against a baseline checkout's, measured in the same run, alternating.

    git archive <rev> uipe tune_spaces | tar -x -C /tmp/uipe-base     # the baseline's code
    .venv/bin/python scripts/bench_prepare.py --baseline /tmp/uipe-base --repeats 2

Each run prepares a fresh run folder on a local Ray of its own (`uipe prepare --run-dir NEW`). Per run: the command's
wall, each model's training seconds (the sum of its epochs' own timing, uipe_meta.json) and the sha256 of each
model's weights, which must be the same for both codes (a speed-up that changed the models would change every
result downstream).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search_stage import timed_uipe  # noqa: E402

ROLES = ("target", "retain")


def one_prepare(dest: Path, code: Path | None, overrides: list[str]) -> dict:
    out = {"command_s": round(timed_uipe("prepare", dest, code, overrides), 1)}
    for role in ROLES:
        folder = dest / "models" / role
        meta = json.loads((folder / "uipe_meta.json").read_text())
        out[f"{role}_train_s"] = round(sum(e["seconds"] for e in meta["history"]), 1)
        out[f"{role}_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a folder holding the baseline's uipe package")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for both")
    args = ap.parse_args()
    if not (args.baseline / "uipe" / "__init__.py").is_file():
        raise SystemExit(f"{args.baseline}: no uipe package in it")
    work = Path(tempfile.mkdtemp(prefix="uipe-bench-prepare-"))
    codes = {"this checkout": None, "baseline": args.baseline.resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    for i in range(args.repeats):
        for name in codes if i % 2 == 0 else reversed(codes):
            r = one_prepare(work / f"{'base' if codes[name] else 'this'}-{i}", codes[name], args.overrides)
            runs[name].append(r)
            print(f"{name} {i}: {json.dumps(r)}", flush=True)
    keys = ("command_s", *(f"{role}_train_s" for role in ROLES))
    summary = {name: {k: round(statistics.mean(r[k] for r in rs), 1) for k in keys} for name, rs in runs.items()}
    hashes = {(r["target_sha256"], r["retain_sha256"]) for rs in runs.values() for r in rs}
    this, base = summary["this checkout"], summary["baseline"]
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "repeats": args.repeats, **summary,
                      "train_ratio_this_vs_baseline": round(
                          sum(this[f"{r}_train_s"] for r in ROLES) / sum(base[f"{r}_train_s"] for r in ROLES), 3),
                      "command_ratio_this_vs_baseline": round(this["command_s"] / base["command_s"], 3),
                      "same_models": len(hashes) == 1}, indent=1))


if __name__ == "__main__":
    main()
