"""Benchmark: items/s of a TOFU evaluation (scoring + greedy generation + ROUGE) across batch sizes.

Baseline = batch size 1, measured in the same run on the same model; printed as ratios. Two models, both random-init
(so generation always runs to max_new_tokens: the worst case for generation):
  tiny : the tiny preset's shape (hidden 64, 4 layers), full synthetic benchmark (forget05 + retain + real
         authors + world facts + related)
  100m : a ~115M-parameter Llama (hidden 768, 12 layers, ff 3072) on the same tokenizer, on a subset of items.

    TOKENIZERS_PARALLELISM=false .venv/bin/python scripts/bench_eval.py [--models tiny,100m] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from uipe.config import EvalConfig, TinyModelConfig  # noqa: E402
from uipe.data.synth import write_benchmark  # noqa: E402
from uipe.eval import Evaluator  # noqa: E402
from uipe.models import load_model, load_tokenizer  # noqa: E402
from uipe.tiny_model import build_tiny, corpus_from_data  # noqa: E402

SHAPES = {
    "tiny": TinyModelConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "100m": TinyModelConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or "unknown"


def run_one(evaluator: Evaluator, model: torch.nn.Module, repeats: int) -> tuple[float, float]:
    """(seconds for a full evaluate(), seconds for scoring alone), each the best of `repeats` (shared machine)."""
    full, score = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluator.evaluate(model, generate=False)
        t1 = time.perf_counter()
        evaluator.evaluate(model)
        full.append(time.perf_counter() - t1)
        score.append(t1 - t0)
    return min(full), min(score)


def bench(name: str, data: Path, work: Path, subset: int | None, max_new_tokens: int, batch_sizes: list[int],
          repeats: int) -> None:
    model_dir = build_tiny(work / name, corpus_from_data(data), SHAPES[name], seed=0)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, dtype="float32")
    params = sum(p.numel() for p in model.parameters())
    cfg = EvalConfig(batch_size=8, max_new_tokens=max_new_tokens, subset=subset)
    ev = Evaluator.from_source(str(data), "forget05", tok, "llama2", cfg)
    items = sum(ev.n_items(r) for r in ev.splits)
    print(f"\n== {name}: {params / 1e6:.1f}M params, {items} items ({ev.fidelity}), "
          f"{len(ev._tables.pairs)} distinct scored sequences, {len(ev._tables.prompts)} prompts generated "
          f"x {max_new_tokens} new tokens")
    Evaluator.from_source(str(data), "forget05", tok, "llama2", cfg.model_copy(update={"subset": 2})).evaluate(model)
    base = None
    print(f"{'batch':>6} {'total s':>8} {'items/s':>8} {'score s':>8} {'gen+rouge s':>11} {'x baseline':>10}")
    for bs in batch_sizes:
        ev.cfg = cfg.model_copy(update={"batch_size": bs})  # same pre-tokenised tables, new batch size
        total, score = run_one(ev, model, repeats)
        base = base or total
        print(f"{bs:>6} {total:8.2f} {items / total:8.1f} {score:8.2f} {total - score:11.2f} {base / total:10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,100m")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny-new-tokens", type=int, default=32)
    ap.add_argument("--big-subset", type=int, default=8, help="items per split for the 100M model")
    ap.add_argument("--big-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of N per point (tiny model only)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also through a pipe
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="uipe-bench-eval-") as tmp:
        work = Path(tmp)
        data = write_benchmark(work / "data", authors=100, facts=8, seed=0)
        for name in args.models.split(","):
            subset, new = (None, args.tiny_new_tokens) if name == "tiny" else (args.big_subset, args.big_new_tokens)
            bench(name, data, work, subset, new, batch_sizes, args.repeats if name == "tiny" else 1)


if __name__ == "__main__":
    main()
