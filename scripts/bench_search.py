"""Benchmark: the Optuna search against an exhaustive grid, and Ray Tune's overhead, on the tiny benchmark.

    python scripts/bench_search.py --run-dir runs/tiny --method ga --seeds 0 1 2
    python scripts/bench_search.py --run-dir runs/tiny --method ga --replay 20      # sampler settings, no trials

Needs a run folder where `uipe run` (or `uipe prepare` + `uipe unlearn --method M`) already ran. The searches run in
a scratch folder beside it (symlinks to its models and checkpoints, its own MLflow store), never touching the run's
own searches.

- Grid: the method's space (its alpha range in steps of grid_step x every epoch, 2 trials at a time). Its best
  feasible objective is the target; its results are kept and reused (--fresh-grid evaluates it again).
- Optuna (the method's space file as shipped, a third of the grid's trials): how many trials until the best feasible
  objective so far comes within 5% of the grid's (goal: at most a third of the grid's trials), and Tune's overhead.
- --replay N: each sampler setting in VARIANTS walks the grid's recorded results (the grid point nearest each
  sampled alpha) with N seeds: how often and how soon it comes within 5% of the grid's best. Seconds, not trials.

    python scripts/bench_search.py --run-dir runs/tiny --method ga --seeds 0 1 --fidelity --trials 32

--fidelity instead compares, per seed and in alternating order, the same TPE search (the method's space file,
--trials trials, 2 at a time) at full fidelity and with search.screening (uipe/search/screening.py): trial work,
its split between scoring passes and full evaluations, and the chosen point (goal: screened work <= 50% of full,
the same point or one with forget quality at least as high at the same floor).
"""

from __future__ import annotations

import argparse
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
    """One search in `run_root`: its summary, wall seconds and result rows in trial creation order."""
    from uipe.paths import RunPaths
    from uipe.search.driver import run_search

    space = run_root / f"{method}.yaml"
    space.write_text(space_text)
    paths = RunPaths.of(run_root)
    start = time.time()
    summary = run_search(cfg, paths, method, space).to_json()  # the result.json form the report below reads
    wall = time.time() - start
    rows = creation_order(_read_csv(paths.search(method) / "results.csv"), paths.search(method))
    return summary, wall, rows


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: v if k == "trial_id" else _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    if v in ("True", "False"):
        return v == "True"
    try:
        return float(v)
    except ValueError:
        return v


def creation_order(rows: list[dict], search_dir: Path) -> list[dict]:
    """Rows in the order Tune created the trials: the index in each trial folder's name (trial_<id>_<index>_...);
    trial ids are random, so they say nothing about order."""
    index = {}
    for d in (search_dir / "tune").glob("trial_*"):
        parts = d.name.split("_")
        index[parts[1]] = int(parts[2])
    return sorted(rows, key=lambda r: index[r["trial_id"]])


def trials_to_reach(ordered: list[dict], target: float) -> int | None:
    """Trials (in creation order) until the best feasible objective reaches `target`."""
    best = -1.0
    for i, r in enumerate(ordered, 1):
        if r["status"] == "ok" and r["feasible"] > 0:
            best = max(best, r["objective"])
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


def grid_table(cfg, run_dir: Path, method: str, fresh: bool) -> tuple[list[dict], float, float]:
    """The exhaustive grid over the method's space (its alpha range in steps of grid_step x every epoch, 2 trials at
    a time): rows, wall seconds, trial work. Reused from the scratch folder unless `fresh` (replays need only rows)."""
    from uipe.search.space import default_space_path, load_space

    space = load_space(default_space_path(method), method)
    done = run_dir.parent / f"{run_dir.name}-bench" / "grid" / "search" / method / "results.csv"
    if done.is_file() and not fresh:
        rows, wall = _read_csv(done), float("nan")  # reused: no wall time of this run
    else:
        text = (f"method: {method}\nalpha: {{low: {space.alpha.low}, high: {space.alpha.high}}}\nsampler: grid\n"
                f"grid_step: {space.grid_step}\nmax_concurrent_trials: 2\nutility_floor: {space.utility_floor}\n")
        _, wall, rows = run_one(cfg, scratch_run(run_dir, "grid"), method, text)
    return rows, wall, sum(r["trial_seconds"] for r in rows if r["status"] == "ok")


def grid_best(rows: list[dict]) -> float:
    """The best feasible value of what the search maximises (forget quality, on the selection fold in a study)."""
    return max(r["objective"] for r in rows if r["status"] == "ok" and r["feasible"] > 0)


# ---- replay: a sampler setting run against the grid's recorded results, many seeds in seconds -------------------
# A replayed trial takes the grid point nearest its alpha at its epoch (exact where alpha is on the grid's steps), so
# the landscape is the grid's; what differs between settings is only how the sampler walks it. Batches of
# max_concurrent_trials are asked before any is told, as Tune runs them, and the base points come first.
VARIANTS = {
    "tpe (as shipped)": {},
    "tpe, alpha on the grid's steps": {"step": True},
    "tpe, ties broken by utility": {"ties": True},
    "gp, log10 FQ": {"sampler": "gp", "log": True},
    "random": {"sampler": "random"},
}


def replay(rows: list[dict], space, epochs: list[int], variant: dict, seed: int, budget: int) -> list[float]:
    """Best feasible objective after each trial (nan while none is feasible) of one replayed search."""
    import math

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from uipe.results import CONSTRAINT

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = {(round(r["alpha"], 6), int(r["epoch"])): r for r in rows if r["status"] == "ok"}
    alphas = sorted({a for a, _ in table})
    kind = variant.get("sampler", space.sampler)
    if kind == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=space.startup_trials)
    elif kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials, constant_liar=True)
    step = space.grid_step if variant.get("step") else None
    dists = {"alpha": FloatDistribution(space.alpha.low, space.alpha.high, step=step),
             "epoch": CategoricalDistribution(epochs)}
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for e in reversed(epochs):
        study.enqueue_trial({"alpha": 0.0, "epoch": e})
    best, curve = -1.0, []
    while len(curve) < budget:
        batch = [study.ask(dists) for _ in range(min(space.max_concurrent_trials, budget - len(curve)))]
        for t in batch:
            a = min(alphas, key=lambda x: abs(x - t.params["alpha"]))
            r = table[(a, t.params["epoch"])]
            fq = r["objective"]
            value = math.log10(max(fq, 1e-300)) if variant.get("log") or variant.get("ties") else fq
            if variant.get("ties"):  # equal forget quality: the point that keeps more utility ranks higher
                value += 1e-3 * r["model_utility"]
            t.set_constraint(CONSTRAINT, float(r["utility_constraint"]))
            study.tell(t, value)
            if r["feasible"] > 0:
                best = max(best, fq)
            curve.append(best if best >= 0 else float("nan"))
    return curve


def replay_all(rows: list[dict], method: str, n_seeds: int) -> None:
    """Each sampler setting over `n_seeds` seeds at a third of the grid's trials: how often, and how soon, it comes
    within 5% of the grid's best feasible forget quality."""
    import statistics

    from uipe.search.space import default_space_path, load_space

    space = load_space(default_space_path(method), method)
    epochs = sorted({int(r["epoch"]) for r in rows})
    target, budget = 0.95 * grid_best(rows), len(rows) // 3
    print(f"replay: {n_seeds} seeds per setting, budget {budget} trials (a third of the grid), target FQ >= "
          f"{target:.4g}")
    for name, variant in VARIANTS.items():
        needs, finals = [], []
        for seed in range(n_seeds):
            curve = replay(rows, space, epochs, variant, seed, budget)
            needs.append(next((i for i, b in enumerate(curve, 1) if b >= target), None))
            finals.append(curve[-1])
        hit = [n for n in needs if n is not None]
        med = statistics.median([n if n is not None else budget + 1 for n in needs])
        print(f"  {name:32s} reached {len(hit):3d}/{n_seeds} ({len(hit) / n_seeds:.0%}), median trials "
              f"{med if med <= budget else '>' + str(budget)}, median final best FQ {statistics.median(finals):.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--method", default="ga")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fidelity", action="store_true", help="full vs screened trials instead of TPE vs the grid")
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--replay", type=int, default=0, metavar="N",
                    help="replay sampler settings on the grid's results with N sampler seeds each (no new trials)")
    ap.add_argument("--column", default="objective",
                    help="the grid column the target is taken from: objective (what the grid's search maximised), or "
                         "forget_quality (the whole split: what a search with search.select_on=all maximises)")
    ap.add_argument("--fresh-grid", action="store_true", help="evaluate the grid again even if its results exist")
    args = ap.parse_args()

    from uipe.config import load_config
    from uipe.search.space import default_space_path

    cfg = load_config(args.config, ["tracking.register_model=false"])
    # each scratch search logs to its own folder's store, never to the run's (nor under a study's parent run)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": None, "parent_run_id": None})})
    if not (args.run_dir / "unlearn" / args.method / "manifest.json").is_file():
        raise SystemExit(f"{args.run_dir}: run `uipe run` (or prepare + unlearn --method {args.method}) first")
    if args.fidelity:
        return compare_fidelity(cfg, args.run_dir, args.method, args.seeds, args.trials)
    grid_rows, grid_wall, work = grid_table(cfg, args.run_dir, args.method, args.fresh_grid)
    grid_rows = [{**r, "objective": r[args.column]} for r in grid_rows]
    best, n_grid = grid_best(grid_rows), len(grid_rows)
    print(f"grid: {n_grid} trials, best feasible FQ {best:.4g}, wall {grid_wall:.0f}s, trial work {work:.0f}s")
    if args.replay:
        return replay_all(grid_rows, args.method, args.replay)
    budget = n_grid // 3
    space_text = default_space_path(args.method).read_text() + f"\nnum_samples: {budget}\n"
    for seed in args.seeds:
        seeded = cfg.model_copy(update={"search": cfg.search.model_copy(update={"seed": seed})})
        summary, wall, rows = run_one(seeded, scratch_run(args.run_dir, f"tpe-{seed}"), args.method,
                                      _without_num_samples(space_text))
        need = trials_to_reach(rows, 0.95 * best)
        ratio = f"{need / n_grid:.2f} of the grid" if need else "not reached"
        print(f"optuna seed {seed}: {len(rows)} trials, chosen objective {summary['chosen']['objective']:.4g}, "
              f"within 5% of the grid after {need} trials ({ratio}; goal <= 0.33), wall {wall:.0f}s, Tune overhead "
              f"{summary['tune_overhead']:.1%}")


if __name__ == "__main__":
    main()
