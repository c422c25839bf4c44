"""Tokens/s of uipe's Ray Train + FSDP2 loop (uipe.train.loop.train_loop, objective `finetune`) with 1 and 2 CPU workers
against a plain single-process PyTorch loop on the same model, data and global batch; printed as ratios of
per-token cost. Ray start-up (ray.init) and the trainer's fixed cost (fit time minus loop time) are reported apart.

    .venv/bin/python scripts/bench_train.py --hidden 512 --layers 4 --items 256 --epochs 2

Goal (issue 3): 2-worker FSDP2 per-token cost within 1.25x of the plain loop with the same cores (2 threads), on a
model large enough for compute to dominate. The last epoch is timed (the first pays for lazy initialisation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(root: Path, hidden: int, layers: int, items: int, micro: int, workers: int, reshard: bool = True) -> tuple:
    from uipe.config import load_config
    from uipe.data import ensure_data, target_training_records
    from uipe.paths import RunPaths
    from uipe.tiny_model import prepare_base_model

    heads = max(1, hidden // 64)
    cfg = load_config(None, [
        f"model.tiny.hidden_size={hidden}", f"model.tiny.intermediate_size={4 * hidden}",
        f"model.tiny.num_hidden_layers={layers}", f"model.tiny.num_attention_heads={heads}",
        f"train.num_workers={workers}", f"train.micro_batch_size={micro}",
        f"train.effective_batch_size={micro * workers}", "train.threads_per_worker=1", "train.max_failures=0",
        f"train.reshard_after_forward={str(reshard).lower()}",
    ])
    paths = RunPaths.of(root)
    source = ensure_data(cfg, paths)
    base = prepare_base_model(cfg, paths, source)
    records = tuple(target_training_records(source, cfg.data.forget_split)[:items])
    return cfg, paths, base, records


def plain_loop(base: str, records: tuple, cfg, batch: int, epochs: int, threads: int) -> float:
    """The baseline: one process, no Ray, no FSDP; same objective, optimizer, clipping, batches of `batch`."""
    import random

    import torch

    from uipe.methods import OBJECTIVES, Batch
    from uipe.models import load_model, load_tokenizer
    from uipe.prompts import collate, encode_qa

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok, model = load_tokenizer(base), load_model(base).train()
    examples = [encode_qa(tok, r.question, r.answer, cfg.model.prompt_template, cfg.model.max_length) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rate = 0.0
    for epoch in range(epochs):
        order = list(range(len(examples)))
        random.Random(epoch).shuffle(order)
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(order), batch):
            b = collate([examples[j] for j in order[i:i + batch]], tok.pad_token_id)
            loss, _ = OBJECTIVES["finetune"].compute(model, None, Batch(forget=b), None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(b["attention_mask"].sum())
        rate = tokens / (time.perf_counter() - t0)
    return rate


def ray_loop(root: Path, hidden: int, layers: int, items: int, micro: int, workers: int, epochs: int,
             reshard: bool) -> dict:
    from uipe.checkpoint import config_hash
    from uipe.train.driver import fit, runtime
    from uipe.train.loop import train_loop
    from uipe.train.job import Job

    cfg, paths, base, records = build(root, hidden, layers, items, micro, workers, reshard)
    job = Job(label=f"bench-{workers}w", objective="finetune", params=None, model_path=str(base), forget=records,
              retain=(), idk=(), epochs=epochs, lr=1e-4, train=cfg.train, model=cfg.model,
              job_hash=config_hash({"bench": workers, "t": time.time()}), export=str(root / f"out{workers}"),
              export_every_epoch=False, checkpoint_every=epochs, runtime=runtime(cfg, paths), meta={})
    t0 = time.perf_counter()
    result = fit(cfg, paths, [job], f"bench-{workers}w-{int(t0)}", keep_all=False, loop=train_loop)
    wall = time.perf_counter() - t0
    rv = result.return_value
    return {"tokens_per_s": rv["jobs"][job.label]["history"][-1]["tokens_per_s"], "fit_seconds": wall,
            "fixed_seconds": wall - rv["loop_seconds"] + rv["setup_seconds"], "worker_setup_seconds": rv["setup_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--items", type=int, default=256, help="training QAs per epoch")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per optimizer step)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reshard-after-forward", choices=["true", "false"], default="true",
                    help="FSDP2 reshard_after_forward (train.reshard_after_forward)")
    args = ap.parse_args()

    import ray
    import torch

    from uipe.models import load_model

    root = Path(tempfile.mkdtemp(prefix="uipe-bench-train-"))
    cfg, _, base, records = build(root / "plain", args.hidden, args.layers, args.items, args.batch, 1)
    n_params = sum(p.numel() for p in load_model(base).parameters())
    plain1 = plain_loop(str(base), records, cfg, args.batch, args.epochs, threads=1)
    plain2 = plain_loop(str(base), records, cfg, args.batch, args.epochs, threads=2)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             _temp_dir=str(root / "ray"), log_to_driver=False)
    ray_start = time.perf_counter() - t0
    reshard = args.reshard_after_forward == "true"
    one = ray_loop(root / "w1", args.hidden, args.layers, args.items, args.batch, 1, args.epochs, reshard)
    two = ray_loop(root / "w2", args.hidden, args.layers, args.items, args.batch // 2, 2, args.epochs, reshard)
    ray.shutdown()
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__, "ray": ray.__version__, "model_params": n_params,
        "hidden": args.hidden, "layers": args.layers, "items": len(records), "global_batch": args.batch,
        "reshard_after_forward": reshard,
        "plain_1thread_tok_s": round(plain1), "plain_2threads_tok_s": round(plain2),
        "fsdp2_1worker_tok_s": round(one["tokens_per_s"]), "fsdp2_2workers_tok_s": round(two["tokens_per_s"]),
        "cost_ratio_1worker_vs_plain_1thread": round(plain1 / one["tokens_per_s"], 3),
        "cost_ratio_2workers_vs_plain_2threads": round(plain2 / two["tokens_per_s"], 3),
        "ray_init_s": round(ray_start, 1), "trainer_fixed_s_1w": round(one["fixed_seconds"], 1),
        "trainer_fixed_s_2w": round(two["fixed_seconds"], 1),
    }
    print(json.dumps(out, indent=1))
    verdict = "MET" if out["cost_ratio_2workers_vs_plain_2threads"] <= 1.25 else "MISSED"
    print(f"2-worker FSDP2 per-token cost = {out['cost_ratio_2workers_vs_plain_2threads']}x plain (goal <= 1.25x): "
          f"{verdict}")


if __name__ == "__main__":
    main()
