"""Benchmark: the Optuna search against an exhaustive grid, and Ray Tune's overhead, on the tiny benchmark.

    python scripts/bench_search.py --run-dir runs/tiny --method ga --seeds 0 1 2

Needs a run folder where `uipe run` (or `uipe prepare` + `uipe unlearn --method M`) already ran. The searches run in
a scratch folder beside it (symlinks to its models and checkpoints), never touching the run's own searches.

- Grid: alpha 0..2 in steps of 0.1 x every epoch, one trial at a time. Its best feasible forget quality is the target.
- Optuna (TPE, the method's space file): how many trials until the best feasible forget quality so far comes within
  5% of the grid's (goal: at most a third of the grid's trials).
- Tune overhead: (search wall time - sum of trial work) / search wall time on the grid run (goal: <= 15%).

    python scripts/bench_search.py --run-dir runs/tiny --method ga --seeds 0 1 --fidelity --trials 32

--fidelity instead compares, per seed and in alternating order, the same TPE search (the method's space file,
--trials trials, 2 at a time) at full fidelity and with search.screening (uipe/search/screening.py): trial work,
its split between scoring passes and full evaluations, and the chosen point (goal: screened work <= 50% of full,
the same point or one with forget quality at least as high at the same floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def scratch_run(run_dir: Path, name: str) -> Path:
    """A folder that shares the run's data, models and checkpoints, with its own searches and MLflow store."""
    root = run_dir.parent / f"{run_dir.name}-bench" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for part in ("data", "models", "unlearn", "retain_reference.json"):
        (root / part).symlink_to((run_dir / part).resolve())
    return root


def run_one(cfg, run_root: Path, method: str, space_text: str) -> tuple[dict, float, list[dict]]:
    from uipe.paths import RunPaths
    from uipe.search.driver import run_search

    space = run_root / f"{method}.yaml"
    space.write_text(space_text)
    paths = RunPaths.of(run_root)
    start = time.time()
    summary = run_search(cfg, paths, method, space)
    wall = time.time() - start
    rows = [r for r in _read_csv(paths.search(method) / "results.csv")]
    return summary, wall, rows


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def trials_to_reach(rows: list[dict], target: float) -> int | None:
    """Trials (in the order Tune created them) until the best feasible forget quality reaches `target`."""
    ordered = sorted(rows, key=lambda r: str(r["trial_id"]))
    best = -1.0
    for i, r in enumerate(ordered, 1):
        if r["status"] == "ok" and r["feasible"] > 0:
            best = max(best, r["forget_quality"])
        if best >= target:
            return i
    return None


def compare_fidelity(cfg, run_dir: Path, method: str, seeds: list[int], trials: int) -> None:
    from uipe.search.space import default_space_path

    space_text = default_space_path(method).read_text() + f"\nnum_samples: {trials}\n"
    for seed in seeds:
        order = [False, True] if seed % 2 == 0 else [True, False]  # alternate which runs first
        out = {}
        for screening in order:
            search = cfg.search.model_copy(update={"seed": seed, "screening": screening})
            name = f"{'screened' if screening else 'full'}-{seed}"
            summary, wall, _ = run_one(cfg.model_copy(update={"search": search}), scratch_run(run_dir, name), method,
                                       _without_num_samples(space_text))
            out[screening] = (summary, wall)
        (full, full_wall), (scr, scr_wall) = out[False], out[True]
        f, c = full["fidelity"], scr["fidelity"]
        print(f"seed {seed}: full {full['trials']} trials, work {full['trial_work_seconds']:.1f}s, "
              f"wall {full_wall:.0f}s "
              f"| screened: {c['full']} in full + {c['screened_only']} screened only, work "
              f"{scr['trial_work_seconds']:.1f}s (screening {c['screening_seconds']:.1f}s, full "
              f"{c['full_seconds']:.1f}s), wall {scr_wall:.0f}s | work ratio "
              f"{scr['trial_work_seconds'] / full['trial_work_seconds']:.2f} (goal <= 0.50)")
        for label, s in (("full", full), ("screened", scr)):
            ch = s["chosen"]
            print(f"  {label:8s} chose alpha {ch['alpha']:.3f} epoch {ch['epoch']}: FQ {ch['forget_quality']:.4g}, "
                  f"utility {ch['model_utility']:.4f}; floors " + ", ".join(
                      f"{k}: {(v['uipe'] or {}).get('forget_quality', float('nan')):.3g}" for k, v in s["floors"].items()))
        assert f["screened_only"] == 0


def _without_num_samples(text: str) -> str:
    """The space file with only the last num_samples line (the one this bench appends)."""
    lines = text.splitlines()
    last = max(i for i, ln in enumerate(lines) if ln.startswith("num_samples:"))
    return "\n".join(ln for i, ln in enumerate(lines) if not ln.startswith("num_samples:") or i == last) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--method", default="ga")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fidelity", action="store_true", help="full vs screened trials instead of TPE vs the grid")
    ap.add_argument("--trials", type=int, default=32)
    args = ap.parse_args()

    from uipe.config import load_config
    from uipe.search.space import default_space_path, load_space

    cfg = load_config(args.config, ["tracking.register_model=false"])
    if not (args.run_dir / "unlearn" / args.method / "manifest.json").is_file():
        raise SystemExit(f"{args.run_dir}: run `uipe run` (or prepare + unlearn --method {args.method}) first")
    if args.fidelity:
        return compare_fidelity(cfg, args.run_dir, args.method, args.seeds, args.trials)
    space = load_space(default_space_path(args.method), args.method)
    epochs = sorted(json.loads((args.run_dir / "unlearn" / args.method / "manifest.json").read_text())["epochs"],
                    key=lambda e: e["epoch"])
    grid_text = (f"method: {args.method}\nalpha: {{low: 0.0, high: 2.0}}\nsampler: grid\ngrid_step: 0.1\n"
                 f"max_concurrent_trials: 1\nutility_floor: {space.utility_floor}\n")
    grid, grid_wall, grid_rows = run_one(cfg, scratch_run(args.run_dir, "grid"), args.method, grid_text)
    feasible = [r for r in grid_rows if r["status"] == "ok" and r["feasible"] > 0]
    best = max(r["forget_quality"] for r in feasible)
    work = sum(r["trial_seconds"] for r in grid_rows if r["status"] == "ok")
    n_grid = len(grid_rows)
    print(f"grid: {n_grid} trials ({len(epochs)} epochs x 21 alphas), best feasible FQ {best:.4g}, "
          f"wall {grid_wall:.0f}s, trial work {work:.0f}s, Tune overhead {(grid_wall - work) / grid_wall:.1%} "
          f"(goal <= 15%; includes Ray/Tune start-up and the model/evaluator load in the trial actor)")

    budget = n_grid // 3
    for seed in args.seeds:
        text = (f"method: {args.method}\nalpha: {{low: 0.0, high: 2.0}}\nsampler: tpe\nstartup_trials: "
                f"{space.startup_trials}\nnum_samples: {budget}\nmax_concurrent_trials: 1\n"
                f"utility_floor: {space.utility_floor}\n")
        seeded = cfg.model_copy(update={"search": cfg.search.model_copy(update={"seed": seed})})
        summary, wall, rows = run_one(seeded, scratch_run(args.run_dir, f"tpe-{seed}"), args.method, text)
        need = trials_to_reach(rows, 0.95 * best)
        ratio = f"{need / n_grid:.2f} of the grid" if need else "not reached"
        print(f"optuna seed {seed}: {len(rows)} trials, best feasible FQ {summary['chosen']['forget_quality']:.4g}, "
              f"within 5% of the grid after {need} trials ({ratio}; goal <= 0.33), wall {wall:.0f}s")


if __name__ == "__main__":
    main()
