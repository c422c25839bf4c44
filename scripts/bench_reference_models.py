"""The spread of the tiny world's reference models over training seeds, data seeds and torch threads per worker.

TOFU's forget quality is measured against the retain model, so a recipe that converges on one machine and not on
another changes the benchmark itself. Each cell runs the real `uipe prepare` (Ray Train, FSDP2) in a run folder of
its own and reports prepare's gate figures (greedy ROUGE-L per training split, model utility) and the bar the test
suite holds the pair to (target vs retain forget quality < 0.01, utilities within 10%):

    python scripts/bench_reference_models.py --train-seeds 0 1 2 3 4 --data-seeds 0 1 --threads 1 2 \
        --out runs/bench_reference            # the shipped recipe
    python scripts/bench_reference_models.py ... --set prepare.epochs=20 --set prepare.lr=1e-2 \
        --set prepare.schedule=linear         # the recipe before (gate off so its figures are recorded)

Cells already done (a summary.json in their folder) are skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path


def run_cell(out: Path, train_seed: int, data_seed: int, threads: int, overrides: list[str]) -> dict:
    from uipe.config import load_config
    from uipe.errors import UipeError
    from uipe.eval.evaluate import Evaluator
    from uipe.eval.reference import compute_reference
    from uipe.models import load_model, load_tokenizer
    from uipe.paths import RunPaths
    from uipe.train.recipe import prepare

    folder = out / f"train{train_seed}-data{data_seed}-threads{threads}"
    done = folder / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    # The gate is recorded, never enforced here: a failing cell is a result of the sweep, not an error.
    cfg = load_config(None, [f"train.seed={train_seed}", f"data.synth.seed={data_seed}",
                             f"train.threads_per_worker={threads}", *overrides,
                             "prepare.min_rouge=0", "prepare.max_utility_gap=null"])
    t0 = time.perf_counter()
    try:
        models = prepare(cfg, folder)
    except UipeError as e:
        return {"cell": folder.name, "error": str(e)}
    seconds = time.perf_counter() - t0
    paths = RunPaths.of(folder)
    evaluator = Evaluator.from_source(str(paths.data), cfg.data.forget_split, load_tokenizer(paths.retain_model),
                                      cfg.model.prompt_template, cfg.eval, cfg.model.max_length)
    evaluator.set_reference(compute_reference(evaluator, load_model(paths.retain_model)))
    target = evaluator.evaluate(load_model(paths.target_model), generate=False).aggregates
    row = {"cell": folder.name, "train_seed": train_seed, "data_seed": data_seed, "threads": threads,
           "prepare_seconds": seconds, "fq_target_vs_retain": target["forget_quality"]}
    for role in ("target", "retain"):
        row[role] = {"rouge_l": models[role]["gate_rouge_l"], "model_utility": models[role]["model_utility"]}
    done.write_text(json.dumps(row, indent=1) + "\n")
    return row


def verdict(row: dict, min_rouge: float = 0.9, max_gap: float = 0.1) -> str:
    if "error" in row:
        return "error"
    rouge_ok = all(v >= min_rouge for role in ("target", "retain") for v in row[role]["rouge_l"].values())
    mu_t, mu_r = row["target"]["model_utility"], row["retain"]["model_utility"]
    gap_ok = abs(mu_t - mu_r) < max_gap * mu_r
    return "pass" if rouge_ok and gap_ok and row["fq_target_vs_retain"] < 0.01 else "FAIL"


def table(rows: list[dict]) -> str:
    splits = ("forget05", "related", "retain95", "real_authors", "world_facts")
    head = ("| train seed | data seed | threads | target ROUGE-L (" + " / ".join(splits) + ") | retain ROUGE-L ("
            + " / ".join(splits[2:]) + ") | MU target | MU retain | gap | FQ target vs retain | gate + test |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cell']} | error: {r['error']} |")
            continue
        t, k = r["target"], r["retain"]
        gap = abs(t["model_utility"] - k["model_utility"]) / k["model_utility"]
        lines.append(
            f"| {r['train_seed']} | {r['data_seed']} | {r['threads']} | "
            + " / ".join(f"{t['rouge_l'].get(s, float('nan')):.2f}" for s in splits) + " | "
            + " / ".join(f"{k['rouge_l'].get(s, float('nan')):.2f}" for s in splits[2:])
            + f" | {t['model_utility']:.3f} | {k['model_utility']:.3f} | {gap:.1%} | "
            f"{r['fq_target_vs_retain']:.1e} | {verdict(r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cells", nargs="*", default=None,
                    help="only these cells, as TRAIN:DATA:THREADS (a fractional design instead of the full grid)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, key=value")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_reference"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cells:
        cells = [tuple(int(x) for x in c.split(":")) for c in args.cells]
    else:
        cells = list(itertools.product(args.train_seeds, args.data_seeds, args.threads))
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for train_seed, data_seed, threads in cells:
        row = run_cell(args.out, train_seed, data_seed, threads, args.overrides)
        rows.append(row)
        print(f"{row['cell']}: {verdict(row)} ({row.get('prepare_seconds', 0):.0f} s)", flush=True)
    text = table(rows)
    (args.out / "table.md").write_text(f"overrides: {args.overrides}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
