"""Benchmark: uipe.extrapolate.extrapolate_folder against a plain safetensors read-and-write copy, same run.

    python scripts/bench_extrapolate.py --size-gb 1.0

Builds two random multi-shard checkpoints (ini and un, fp32 and bf16 tensors) in a temp dir, then times, each in a
fresh subprocess (so peak RSS is that operation's alone):
  (a) copy: every tensor of un read with safe_open and written with save_file, shard by shard;
  (b) extrapolate_folder(ini, un, alpha=1.5).
Throughput = tensor bytes read + written per second (copy: 2 x model, extrapolation: 3 x model: ini, un, out).
Goals: throughput ratio (b)/(a) >= 0.7; peak RSS of (b) <= 3 x largest shard + 300 MB. Temp files are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATIO_GOAL = 0.7


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_checkpoints(root: Path, size_gb: float, n_shards: int) -> int:
    """ini and un folders with identical layout; each shard alternates fp32 and bf16 32 MiB tensors."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    shard_bytes = int(size_gb * 1e9 / n_shards)
    tensor_bytes = 32 * 2**20
    for name in ("ini", "un"):
        (root / name).mkdir()
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(1, n_shards + 1):
        shard = f"model-{s:05d}-of-{n_shards:05d}.safetensors"
        ini_t: dict[str, torch.Tensor] = {}
        un_t: dict[str, torch.Tensor] = {}
        for i in range(max(1, round(shard_bytes / tensor_bytes))):
            dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
            cols = tensor_bytes // (1024 * dtype.itemsize)
            key = f"model.layers.{s}.w{i}"
            ini_t[key] = torch.randn(1024, cols).to(dtype)
            un_t[key] = (ini_t[key].float() + 0.01 * torch.randn(1024, cols)).to(dtype)
            weight_map[key] = shard
            total += ini_t[key].nbytes
        save_file(ini_t, root / "ini" / shard, metadata={"format": "pt"})
        save_file(un_t, root / "un" / shard, metadata={"format": "pt"})
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    for name in ("ini", "un"):
        (root / name / "model.safetensors.index.json").write_text(index)
        (root / name / "config.json").write_text('{"model_type": "llama"}')
    return total


def child(mode: str, root: Path) -> None:
    """One measured operation in this fresh process; prints {"seconds", "peak_rss_mb"} as JSON."""
    import torch

    torch.set_num_threads(1)  # 2 shared cores: keep the comparison single-threaded on both sides
    out = root / f"out_{mode}"
    t0 = time.perf_counter()
    if mode == "copy":
        from safetensors import safe_open
        from safetensors.torch import save_file

        out.mkdir()
        for shard in sorted((root / "un").glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata()
            save_file(tensors, out / shard.name, metadata=metadata)
            del tensors
    else:
        from uipe.extrapolate import extrapolate_folder

        extrapolate_folder(root / "ini", root / "un", 1.5, out, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def run_child(mode: str, root: Path) -> dict[str, float]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(root)], env=env,
                         capture_output=True, text=True, check=True)
    shutil.rmtree(root / f"out_{mode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (ini, un)")
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the fastest is reported")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--child", choices=["copy", "extrapolate"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dir)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_extrapolate.", dir=args.dir))
    try:
        t0 = time.perf_counter()
        total = make_checkpoints(root, args.size_gb, args.shards)
        largest = max(p.stat().st_size for p in (root / "un").glob("*.safetensors"))
        print(f"checkpoints: 2 x {total / 1e9:.2f} GB, {args.shards} shards, largest {largest / 1e6:.0f} MB "
              f"(built in {time.perf_counter() - t0:.0f} s)")
        runs: dict[str, list[dict[str, float]]] = {"copy": [], "extrapolate": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(run_child(mode, root))
        moved = {"copy": 2 * total, "extrapolate": 3 * total}
        speed: dict[str, float] = {}
        for mode, rs in runs.items():
            best = min(r["seconds"] for r in rs)
            speed[mode] = moved[mode] / best / 1e6
            print(f"{mode:12s} best {best:6.2f} s of {[round(r['seconds'], 2) for r in rs]}: "
                  f"{moved[mode] / 1e9:.2f} GB read+written, {speed[mode]:6.0f} MB/s, "
                  f"peak RSS {max(r['peak_rss_mb'] for r in rs):.0f} MB")
        ratio = speed["extrapolate"] / speed["copy"]
        rss_goal = 3 * largest / 2**20 + 300
        rss = max(r["peak_rss_mb"] for r in runs["extrapolate"])
        print(f"throughput ratio extrapolate/copy = {ratio:.2f} (goal >= {RATIO_GOAL}): "
              f"{'MET' if ratio >= RATIO_GOAL else 'MISSED'}")
        print(f"extrapolate peak RSS {rss:.0f} MB vs goal 3 x largest shard + 300 MB = {rss_goal:.0f} MB: "
              f"{'MET' if rss <= rss_goal else 'MISSED'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
