"""MUSE's embedded world over several seeds: does UIPE beat its base method, and the base method trained longer?

    python scripts/muse_seeds.py --seeds 0,1,2 --root runs/muse-seeds      # ~13 minutes a seed on 2 CPU cores

Per seed s, two `uipe run`s of the MUSE preset (uipe/presets/tiny_muse.yaml), each the command a user types:
- <root>/seed-s: the whole pipeline with its own world, training and search seeds (data.synth.seed, train.seed,
  search.seed = s): the target and retrained models, each method's unlearning for unlearn.epochs, its alpha search;
- <root>/seed-s/longer: the same target, retrained reference and data, each method unlearned --longer-factor times
  as many epochs (its own schedule over the longer run), searched over alpha 0 only (one trial per epoch).
Then, per method and utility floor (KnowMem retain >= floor x theta_ini's), the objective of the best point of each
arm (base: alpha 0 at the epochs run; more: alpha 0 of the longer run; UIPE: any alpha) and the paired per-seed
differences UIPE - base and UIPE - more with 95% t-intervals (uipe.study.aggregate.t_interval); an arm with no point
above a floor counts as objective 0 there (its closeness to the retrained model's PrivLeak cannot be read), and the
number of seeds where that happened is shown. Writes <root>/muse_seeds.json and prints a markdown table. Runs that
finished are reused, so an interrupted call resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uipe.config import load_config  # noqa: E402
from uipe.study.aggregate import t_interval  # noqa: E402

HEADLINE = ("knowmem_retain_rougeL", "verbmem_rougeL", "knowmem_forget_rougeL", "privleak")


def _uipe_run(config: Path, run_dir: Path, sets: list[str]) -> dict:
    """`uipe run` in its own process (as a user runs it), unless its summary.json is there already."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "uipe.cli", "run", "--config", str(config), "--run-dir", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def run_seed(config: Path, root: Path, seed: int, factor: int) -> dict:
    """Both runs of one seed: {"uipe": summary of the pipeline, "longer": summary of the longer base method}."""
    epochs = load_config(config).unlearn.epochs * factor
    seeds = [f"data.synth.seed={seed}", f"train.seed={seed}", f"search.seed={seed}"]
    main = root / f"seed-{seed}"
    first = _uipe_run(config, main, seeds)
    longer = _uipe_run(config, main / "longer", seeds + [
        f"unlearn.epochs={epochs}", f"search.num_samples={epochs}", "prepare.retain=false",
        f"model.base={main / 'models' / 'base'}", f"model.target={main / 'models' / 'target'}",
        f"eval.retain_reference={main / 'retain_reference.json'}", f"data.source={main / 'data'}"])
    return {"uipe": first, "longer": longer}


def _point(summary: dict, method: str, floor: str, arm: str) -> dict | None:
    by_method = {m["method"]: m for m in summary["methods"]}
    return by_method[method]["floors"].get(floor, {}).get(arm)


def _objective(p: dict | None) -> float:
    """An arm's objective at a floor; 0 without a point there (the target itself, PrivLeak -100, is such a point)."""
    return p["objective"] if p else 0.0


def aggregate(seeds: dict[int, dict]) -> dict:
    """Per method and floor: each arm's mean objective and headline metrics, and the paired differences."""
    first = next(iter(seeds.values()))["uipe"]
    out: dict = {}
    for m in first["methods"]:
        method = m["method"]
        for floor in sorted(m["floors"], key=float, reverse=True):
            arms = {s: {"base": _point(r["uipe"], method, floor, "base"), "uipe": _point(r["uipe"], method, floor, "uipe"),
                        "more": _point(r["longer"], method, floor, "base")} for s, r in seeds.items()}

            row = {"missing": {a: sum(arms[s][a] is None for s in arms) for a in ("base", "more", "uipe")}}
            for arm in ("base", "more", "uipe"):
                row[arm] = {k: t_interval([(arms[s][arm] or {}).get(k) for s in arms])
                            for k in ("objective", *HEADLINE)}
            for other in ("base", "more"):
                diffs = [_objective(arms[s]["uipe"]) - _objective(arms[s][other]) for s in arms]
                row[f"uipe-{other}"] = {**t_interval(diffs), "wins": sum(d > 0 for d in diffs),
                                        "ties": sum(d == 0 for d in diffs)}
            out.setdefault(method, {})[floor] = row
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}" if abs(x) < 10 else f"{x:+.0f}"


def markdown(agg: dict, n: int) -> str:
    lines = [f"| method | floor | base | 2x epochs | UIPE | UIPE - base [95% CI] (wins/{n}) | "
             f"UIPE - 2x epochs [95% CI] (wins/{n}) | UIPE's KnowMem retain / VerbMem / KnowMem forget / PrivLeak |",
             "|---|---|---|---|---|---|---|---|"]
    for method, floors in agg.items():
        for floor, row in floors.items():
            arms = [f"{row[a]['objective']['mean'] or 0:.2f}" + (f" ({row['missing'][a]} none)"
                                                                 if row["missing"][a] else "")
                    for a in ("base", "more", "uipe")]
            diffs = [f"{_fmt(d['mean'])} [{_fmt(d['low'])}, {_fmt(d['high'])}] ({d['wins']})"
                     for d in (row["uipe-base"], row["uipe-more"])]
            heads = " / ".join(_fmt(row["uipe"][k]["mean"]) for k in HEADLINE)
            lines.append(f"| {method} | {floor} | {' | '.join(arms)} | {' | '.join(diffs)} | {heads} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "uipe" / "presets" / "tiny_muse.yaml")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--root", type=Path, default=Path("runs/muse-seeds"))
    ap.add_argument("--longer-factor", type=int, default=2)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {s: run_seed(args.config, args.root.resolve(), s, args.longer_factor) for s in seeds}
    agg = aggregate(results)
    (args.root / "muse_seeds.json").write_text(json.dumps({"seeds": seeds, "config": str(args.config),
                                                           "longer_factor": args.longer_factor,
                                                           "aggregate": agg}, indent=1))
    print(markdown(agg, len(seeds)))


if __name__ == "__main__":
    main()
