"""One-command GPU check (run by scripts/gpu_check.sh): uipe's own stages on a ~1B random Llama.

    bash scripts/gpu_check.sh             # on a CUDA machine: bf16, NCCL, FSDP2; about 5-8 minutes on one GPU
    bash scripts/gpu_check.sh --smoke     # the same path on CPU with a small model, to check the script itself

Steps: build a random Llama (~1.0B parameters; --smoke: ~10M) with the embedded world's tokenizer; one NPO unlearning
epoch with `uipe unlearn` (Ray Train, FSDP2, bf16 on CUDA); the retain reference from the same model (a systems
check: forget quality is meaningless here); 8 search trials with `uipe search`, 4 sharing the GPU. Prints tokens/s,
MFU, peak GPU memory per training rank and per trial, and seconds per trial, and writes them to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16, per GPU


def build_model(out: Path, data: Path, smoke: bool) -> int:
    """A random-init Llama with the embedded world's tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from uipe.tiny_model import corpus_from_data, train_tokenizer

    tokenizer = train_tokenizer(corpus_from_data(data), 1200)
    hidden, layers, inter, heads = (256, 4, 1024, 4) if smoke else (2048, 20, 5632, 16)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def uipe(*args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "uipe.cli", *args], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, small model: check the script, not the GPU")
    ap.add_argument("--work", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check/gpu_check.json"))
    args = ap.parse_args()

    import torch

    from uipe.data.synth import write_benchmark

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("gpu_check: no CUDA device; use --smoke to run the same steps on CPU")
    work = args.work.resolve()
    run_dir, model_dir, data_dir = work / "run", work / "model", work / "data"
    if not data_dir.exists():
        write_benchmark(data_dir, authors=40, facts=8, seed=0)
    params = build_model(model_dir, data_dir, args.smoke) if not (model_dir / "config.json").exists() else \
        json.loads((work / "params.json").read_text())["params"]
    (work / "params.json").write_text(json.dumps({"params": params}))

    sets = ["--run-dir", str(run_dir), "--set", f"data.source={data_dir}", "--set", f"model.base={model_dir}",
            "--set", f"model.target={model_dir}", "--set", "unlearn.epochs=1", "--set", "train.num_workers=1",
            "--set", "train.micro_batch_size=8", "--set", "train.effective_batch_size=32",
            "--set", f"train.use_gpu={'yes' if cuda else 'no'}", "--set", "model.dtype=auto",
            "--set", "eval.max_new_tokens=32", "--set", "eval.subset=40", "--set", "tracking.register_model=false"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t_unlearn = uipe("unlearn", "--method", "npo", *sets, env=env)
    manifest = json.loads((run_dir / "unlearn" / "npo" / "manifest.json").read_text())
    t_ref = uipe("reference", "--model", str(model_dir), *sets, env=env)
    search_sets = ["--set", "search.num_samples=8", "--set", f"search.gpus_per_trial={0.25 if cuda else 0}",
                   "--set", "search.cpus_per_trial=1"]
    t_search = uipe("search", "--method", "npo", *sets, *search_sets, env=env)
    result = json.loads((run_dir / "search" / "npo" / "result.json").read_text())
    rows = [r for r in _csv(run_dir / "search" / "npo" / "results.csv") if r["status"] == "ok"]

    epoch = manifest["epochs"][0]
    tokens_per_s = float(epoch.get("tokens_per_s", 0.0))
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)
    # MFU: 6 N flops per trained token (forward + backward) for the trained model; NPO's frozen reference adds a
    # forward (2 N) on the forget half of each batch, not counted, so this understates the work done.
    mfu = 6 * params * tokens_per_s / peak if peak else None
    report = {
        "device": name, "params": params, "unlearn_seconds": t_unlearn, "reference_seconds": t_ref,
        "search_seconds": t_search, "tokens_per_s": tokens_per_s, "mfu": mfu,
        "peak_memory_bytes_per_rank": epoch.get("peak_memory_bytes"),  # CUDA: allocated; CPU: peak RSS
        "peak_memory_bytes_per_trial": max((float(r["peak_memory_bytes"]) for r in rows), default=None),
        "seconds_per_trial": sorted(float(r["trial_seconds"]) for r in rows),
        "trials": result["trials"], "failed": result["failed"], "tune_overhead": result["tune_overhead"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
