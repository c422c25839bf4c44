"""Benchmark: CMA-ES against multivariate TPE for a form beyond one alpha (issue 26: "whichever the benchmark
favours"), on a finished `uipe study`'s own seeds and checkpoints.

    uipe study --seeds 5 --run-dir runs/forms-study --set "study.forms=[groups]"          # TPE's groups arm
    .venv/bin/python scripts/bench_form_sampler.py runs/forms-study --form groups          # + CMA-ES, compared

Per seed and method: the study's search of the form (multivariate TPE, in search/<method>-<form>/) against the same
search with `sampler: cmaes` (search/<method>-<form>-cmaes/, written beside it in the seed's folder; reused when
it has finished): the same space file, trial budget, warm start, selection fold and in-order telling, the study's
seed. Each arm is read as the study reads an arm (uipe/study/arms.py): the chosen point's cross-fitted log10 forget
quality at each floor, hypervolume, utility at matched forgetting against the longer base run. Printed: per method,
CMA-ES - TPE with a 95% t interval over seeds and the seeds CMA-ES wins, and each search's wall time. Writes
<study>/form-sampler-<form>.json. MLflow: the searches log to <study>/bench-form-sampler.db, not the study's store.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from uipe.config import ExperimentConfig
from uipe.paths import RunPaths
from uipe.report import from_csv
from uipe.search.driver import run_search
from uipe.search.pool import shared_trial_pool
from uipe.search.space import default_space_path
from uipe.study.aggregate import log10_fq, t_interval
from uipe.study.arms import method_record
from uipe.study.driver import IDENTITY_FILE, longer_trajectory, seed_config

TPE, CMAES = "tpe", "cmaes"


def _seed_cfg(study: Path, seed: int, form: str) -> ExperimentConfig:
    raw = json.loads((study / IDENTITY_FILE).read_text())
    raw["study"]["seeds"] = [seed]
    cfg = ExperimentConfig.model_validate(raw)
    seeded = seed_config(cfg, seed, f"sqlite:///{study.resolve()}/bench-form-sampler.db", "bench-form-sampler", None)
    raw = seeded.model_dump(mode="json")
    raw["search"]["form"] = form
    raw["tracking"]["register_model"] = False
    return ExperimentConfig.model_validate(raw)


def _cmaes_space(method: str, space_dir: str, form: str, folder: Path) -> Path:
    """The method's space file with `sampler: cmaes` and the form: everything else, the trial budget included, as the
    study's."""
    text = default_space_path(method, space_dir).read_text()
    lines = [line for line in text.splitlines() if not line.startswith(("sampler:", "form:"))]
    lines += ["sampler: cmaes", f"form: {form}"]
    path = folder / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _one(study: Path, seed: int, method: str, form: str, folder: Path) -> dict:
    cfg = _seed_cfg(study, seed, form)
    paths = RunPaths.of(study / f"seed-{seed}")
    run_search(cfg, paths, method, _cmaes_space(method, cfg.search.space_dir, form, folder), resume=True)
    labels = {TPE: f"{method}-{form}", CMAES: f"{method}-{form}-cmaes"}
    rows = {arm: from_csv((paths.search(label) / "results.csv").read_text()) for arm, label in labels.items()}
    result = {arm: json.loads((paths.search(label) / "result.json").read_text()) for arm, label in labels.items()}
    glob = json.loads((paths.search(method) / "result.json").read_text())
    longer = longer_trajectory(cfg, paths, method) if cfg.study.more_baseline else []
    rec = method_record(from_csv((paths.search(method) / "results.csv").read_text()), longer, glob["theta_ini"],
                        glob["utility_threshold"], cfg.study.floors, cfg.unlearn.epochs,
                        cfg.unlearn.epochs * cfg.study.longer_factor, forms=rows)
    out = {"seed": seed, "hypervolume": {arm: rec.hypervolume[arm] for arm in rows},
           "seconds": {arm: result[arm]["search_seconds"] for arm in rows},
           "trials": {arm: result[arm]["trials"] for arm in rows}}
    for f in cfg.study.floors:
        fq = {arm: rec.arms[arm][f].forget_quality_crossfit if rec.arms[arm][f] else math.nan for arm in rows}
        out[f"crossfit@{f}"] = {arm: log10_fq(x) if math.isfinite(x) else None for arm, x in fq.items()}  # None:
        # no point above the floor
        out[f"matched@{f}"] = {arm: rec.matched_forms[arm].get(f) for arm in rows}
    return out


def _compare(runs: list[dict], key: str) -> str:
    diffs = [r[key][CMAES] - r[key][TPE] for r in runs if None not in (r[key][CMAES], r[key][TPE])]
    t = t_interval(diffs)
    if t["mean"] is None:
        return "-"
    spread = f" [{t['low']:+.3f}, {t['high']:+.3f}]" if t["low"] is not None else ""
    return f"{t['mean']:+.3f}{spread} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--form", default="groups", choices=["groups", "weighted"])
    ap.add_argument("--methods", default=None, help="comma-separated; default: the study's")
    ap.add_argument("--seeds", default=None, help="comma-separated; default: every seed of the study")
    args = ap.parse_args()
    study = args.study.resolve()
    raw = json.loads((study / IDENTITY_FILE).read_text())
    methods = args.methods.split(",") if args.methods else raw["unlearn"]["methods"]
    seeds = sorted(int(p.name.split("-")[1]) for p in study.glob("seed-*") if (p / "search").is_dir())
    seeds = [s for s in seeds if args.seeds is None or str(s) in args.seeds.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="uipe-bench-sampler-"))
    report: dict[str, list[dict]] = {}
    with shared_trial_pool():  # one pool of trial processes for every search, as in the study
        for method in methods:
            for seed in seeds:
                if (study / f"seed-{seed}" / "search" / f"{method}-{args.form}" / "result.json").is_file():
                    report.setdefault(method, []).append(_one(study, seed, method, args.form, folder))
    (study / f"form-sampler-{args.form}.json").write_text(json.dumps(report, indent=1))
    floors = ExperimentConfig.model_validate({**raw, "study": {**raw["study"], "seeds": [0]}}).study.floors
    head = ["method", "seeds", "hypervolume", *[f"crossfit log10 FQ @{f}" for f in floors],
            *[f"matched utility @{f}" for f in floors], "seconds TPE / CMA-ES", "trials"]
    print(f"{args.form}: CMA-ES - multivariate TPE, mean [95% t interval] (seeds where CMA-ES is higher / seeds)")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for method, runs in report.items():
        cells = [method, str(len(runs)), _compare(runs, "hypervolume"),
                 *[_compare(runs, f"crossfit@{f}") for f in floors], *[_compare(runs, f"matched@{f}") for f in floors],
                 f"{statistics.fmean(r['seconds'][TPE] for r in runs):.0f} / "
                 f"{statistics.fmean(r['seconds'][CMAES] for r in runs):.0f}",
                 f"{runs[0]['trials'][TPE]} / {runs[0]['trials'][CMAES]}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
