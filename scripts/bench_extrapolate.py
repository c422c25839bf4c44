"""Benchmark: `uipe extrapolate` as a user runs it, against a plain read+write copy and a naive merge, one run.

    python scripts/bench_extrapolate.py --size-gb 1.0 --shards 4 --repeats 3

Builds a bf16 pair (ini, un: Llama-like shapes, Hugging Face shards + index) in a temp dir, then times, each run in a
fresh subprocess (so its wall time includes start-up and its peak RSS is its own), in alternating order:
  cli:   `python -m uipe.cli extrapolate --init ini --unlearned un --alpha 1.5 --out C`, this checkout's code
         (PYTHONPATH), with no thread settings from this script;
  floor: every byte of un's shards read into one buffer and written out (plain Python): a copy's speed;
  floor_io: the bytes the extrapolation itself must move, ini's and un's shards read and one output written (plain
         Python): the disk's speed for this operation;
  naive: per shard, safetensors load_file of ini and un, un + 1.5*(un - ini) on whole fp32 tensors, cast back,
         save_file (torch's default threads).
Optional variants (--variants) run extrapolate_folder in-process to measure a choice: serial (overlap=False),
threads2 (two torch threads); cli_base is the same command on another checkout (--base-code, e.g. the previous
commit's `git archive`), for a before/after in one run.
Cache modes: cold drops the page cache before each run (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only; said
so when refused), warm reads the inputs once before each run. Goals: floor_time / cli_time >= 1.0 (stretch 1.3),
reported against both floors;
naive_time / cli_time >= 3; cli peak RSS <= 3 x largest shard + 300 MiB. Temp files are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"floor": (1.0, 1.3), "floor_io": (1.0, 1.3), "naive": (3.0, None)}
HIDDEN, INTER, VOCAB = 1024, 2816, 32000


def make_checkpoints(root: Path, size_gb: float, n_shards: int) -> None:
    """ini and un (= ini + 0.01 noise), bf16, Llama-shaped layers, cut into n_shards like save_pretrained."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}
    layer = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
             "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
             "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    per_layer = 2 * sum(a * b for a, b in layer.values())
    for i in range(max(1, round((size_gb * 1e9 - 4 * VOCAB * HIDDEN) / per_layer))):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in layer.items()})
        shapes.update({f"model.layers.{i}.{n}.weight": (HIDDEN,) for n in ("input_layernorm",
                                                                           "post_attention_layernorm")})
    total = sum(2 * a * (b[0] if b else 1) for a, *b in shapes.values())
    shard_of, acc = {}, 0
    for k, s in shapes.items():  # consecutive tensors, each shard about total / n_shards
        shard_of[k] = min(n_shards, 1 + acc * n_shards // total)
        acc += 2 * s[0] * (s[1] if len(s) > 1 else 1)
    names = {i: f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)}
    for d in ("ini", "un"):
        (root / d).mkdir()
    for i, name in names.items():
        ini = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items() if shard_of[k] == i}
        save_file(ini, root / "ini" / name, metadata={"format": "pt"})
        un = {k: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).bfloat16() for k, t in ini.items()}
        save_file(un, root / "un" / name, metadata={"format": "pt"})
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": {k: names[shard_of[k]] for k in shapes}})
    for d in ("ini", "un"):
        (root / d / "model.safetensors.index.json").write_text(index)
        (root / d / "config.json").write_text('{"model_type": "llama"}')


def floor(root: Path, out: Path, inputs: tuple[str, ...] = ("un",)) -> None:
    """A copy's speed: read each shard file of `inputs` into one reused buffer per input, write un's out."""
    out.mkdir()
    shards = sorted((root / "un").glob("*.safetensors"))
    size = max(p.stat().st_size for d in inputs for p in (root / d).glob("*.safetensors"))
    bufs = {d: memoryview(bytearray(size)) for d in inputs}
    for p in shards:
        n = 0
        for d in inputs:
            with open(root / d / p.name, "rb", buffering=0) as f:
                n = f.readinto(bufs[d])
        with open(out / p.name, "wb", buffering=0) as g:
            g.write(bufs["un"][:n])


def naive(root: Path, out: Path) -> None:
    """The obvious merge: whole shards loaded, whole-tensor fp32 arithmetic, cast back, saved."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for p in sorted((root / "un").glob("*.safetensors")):
        ini, un = load_file(root / "ini" / p.name), load_file(p)
        merged = {k: (u.float() + 1.5 * (u.float() - ini[k].float())).to(u.dtype) for k, u in un.items()}
        save_file(merged, out / p.name, metadata={"format": "pt"})
        del ini, un, merged
    del torch


def in_process(variant: str, root: Path, out: Path) -> None:
    """extrapolate_folder with one choice changed: overlap off, or two torch threads."""
    import contextlib

    import uipe.extrapolate as ex

    if variant == "threads2":
        threads = ex.torch_threads
        ex.torch_threads = lambda n: threads(2)  # type: ignore[assignment]
    with contextlib.redirect_stdout(sys.stderr):
        ex.extrapolate_folder(root / "ini", root / "un", 1.5, out, progress=False, overlap=variant != "serial")


def command(variant: str, root: Path) -> list[str]:
    out = str(root / f"out_{variant}")
    if variant in ("cli", "cli_base"):
        return [sys.executable, "-m", "uipe.cli", "extrapolate", "--init", str(root / "ini"), "--unlearned",
                str(root / "un"), "--alpha", "1.5", "--out", out]
    return [sys.executable, __file__, "--child", variant, "--dir", str(root)]


def prepare_cache(mode: str, root: Path) -> None:
    subprocess.run(["sync"], check=True)
    if mode == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        for p in sorted(root.glob("*/*.safetensors")):
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def run(variant: str, root: Path, mode: str, base_code: Path | None) -> dict[str, float]:
    """One timed run in a fresh process: wall seconds, peak RSS (MiB) and CPU seconds from the kernel's rusage."""
    prepare_cache(mode, root)
    code = base_code if variant == "cli_base" else ROOT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(variant, root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed ({proc.returncode}):\n{err}")
    shutil.rmtree(root / f"out_{variant}")
    return {"wall": wall, "rss": usage.ru_maxrss / 1024, "user": usage.ru_utime, "sys": usage.ru_stime}


def drop_caches_allowed() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError as e:
        print(f"cannot drop the page cache ({e}): cold runs skipped")
        return False


def report(mode: str, runs: dict[str, list[dict[str, float]]], largest: int) -> None:
    med = {v: statistics.median(r["wall"] for r in rs) for v, rs in runs.items()}
    print(f"\n[{mode} cache] medians of {len(runs['cli'])} runs each")
    for v, rs in runs.items():
        print(f"  {v:9s} {med[v]:6.2f} s  runs {[round(r['wall'], 2) for r in rs]}  peak RSS "
              f"{max(r['rss'] for r in rs):5.0f} MiB  user {statistics.median(r['user'] for r in rs):5.2f} s  "
              f"sys {statistics.median(r['sys'] for r in rs):5.2f} s")
    for other, (goal, stretch) in GOALS.items():
        if other in med:
            ratio = med[other] / med["cli"]
            verdict = "MET" if ratio >= goal else "MISSED"
            if stretch:
                verdict += f", stretch {stretch}: {'MET' if ratio >= stretch else 'MISSED'}"
            print(f"  {other}_time / cli_time = {ratio:.2f} (goal >= {goal}: {verdict})")
    bound = 3 * largest / 2**20 + 300
    rss = max(r["rss"] for r in runs["cli"])
    print(f"  cli peak RSS {rss:.0f} MiB vs 3 x largest shard + 300 MiB = {bound:.0f} MiB: "
          f"{'MET' if rss <= bound else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (ini, un)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant per cache mode, order alternating")
    ap.add_argument("--cache", choices=["cold", "warm", "both"], default="both")
    ap.add_argument("--variants", default="cli,floor,floor_io,naive", help="also: serial, threads2, cli_base")
    ap.add_argument("--base-code", type=Path, default=None, help="checkout (folder holding uipe/) for cli_base")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        make_checkpoints(args.dir, args.size_gb, args.shards)
        return
    if args.child:
        child = {"floor": floor, "floor_io": lambda r, o: floor(r, o, ("ini", "un")), "naive": naive}.get(args.child)
        out = args.dir / f"out_{args.child}"
        child(args.dir, out) if child else in_process(args.child, args.dir, out)
        return
    variants = args.variants.split(",")
    threads_env = {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}
    modes = [m for m in (["cold", "warm"] if args.cache == "both" else [args.cache])
             if m == "warm" or drop_caches_allowed()]
    root = Path(tempfile.mkdtemp(prefix="bench_extrapolate.", dir=args.dir))
    try:
        t0 = time.perf_counter()
        # built in a child: a child forked from a parent holding torch and tensors would count them in its peak RSS
        subprocess.run([sys.executable, __file__, "--child", "build", "--dir", str(root), "--size-gb",
                        str(args.size_gb), "--shards", str(args.shards)], check=True)
        total = json.loads((root / "un" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        largest = max(p.stat().st_size for p in (root / "un").glob("*.safetensors"))
        print(f"checkpoints: 2 x {total / 1e9:.2f} GB bf16, {args.shards} shards, largest {largest / 1e6:.0f} MB "
              f"(built in {time.perf_counter() - t0:.0f} s); thread variables in the environment: {threads_env or 'none'}"
              f"; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
        for mode in modes:
            runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for r in range(args.repeats):
                for v in variants if r % 2 == 0 else variants[::-1]:
                    runs[v].append(run(v, root, mode, args.base_code))
            report(mode, runs, largest)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end; total {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
