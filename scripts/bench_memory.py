"""Benchmark (issue 11): a search trial's memory beyond the live model, new streamed `UpdateVector` vs the old one.

    python scripts/bench_memory.py --sizes 50M,200M,800M --out bench_memory.json

For each size, random-init Llama checkpoints (bf16, save_pretrained) theta_ini and theta_un = theta_ini + noise are
written to a temp dir; then, each in a fresh subprocess (so peaks never mix), with the model loaded by
from_pretrained in bf16 and made private memory (the baseline: the live model a trial keeps):
  new: UpdateVector.from_folders(ini, un) + apply(model, 1.5) x repeats (files mmap'ed, chunked fp32 arithmetic);
  old: the previous design, inline: theta_un and v = theta_un - theta_ini held in fp32 dicts, then applied;
  and, in the new design's process after its measurement, a plain
  `model.load_state_dict(safetensors.torch.load_file(shard))` of theta_un's shards (the time baseline).
Peak anonymous memory (RssAnon: not file pages, which VmHWM would include) is sampled every millisecond by a thread
and read after every step. Goals: memory beyond the model <= 10% of its bytes + 64 MB; apply <= 3 x plain load.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ALPHA = 1.5
VOCAB = 32000
# hidden, intermediate, layers (heads of 64 dims, no GQA, untied lm_head): ~52M, ~204M, ~789M parameters
SIZES = {"50M": (512, 1376, 6), "200M": (1024, 2752, 11), "800M": (2048, 5504, 13)}
MEM_GOAL_FRACTION, MEM_GOAL_BYTES, TIME_GOAL = 0.10, 64e6, 3.0


def rss_anon() -> int:
    text = Path("/proc/self/status").read_text()
    return 1024 * int(re.search(r"^RssAnon:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


class PeakAnon:
    """Peak RssAnon over a window: a thread samples every millisecond; `mark` adds a reading after each step."""

    def __init__(self) -> None:
        self.peak, self._stop = rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.mark()

    def mark(self) -> int:
        now = rss_anon()
        self.peak = max(self.peak, now)
        return now

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.mark()
        return self.peak


def make_pair(size: str, root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=VOCAB,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "ini", max_shard_size="1GB")
    with torch.no_grad():  # a stand-in unlearning update: small noise on every weight
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    model.save_pretrained(root / "un", max_shard_size="1GB")


class OldUpdateVector:
    """The previous design (uipe/update_vector.py before issue 11), for the baseline: fp32 theta_un and v."""

    def __init__(self, ini: Path, un: Path) -> None:
        import torch
        from safetensors import safe_open

        index = {}
        for path in sorted(ini.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                index.update(dict.fromkeys(f.keys(), path))
        self.theta_un, self.v = {}, {}
        for shard in sorted(un.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    un32 = f.get_tensor(key).to(torch.float32, copy=True)
                    with safe_open(index[key], framework="pt") as g:
                        self.v[key] = torch.sub(un32, g.get_tensor(key).to(torch.float32))
                    self.theta_un[key] = un32

    def apply(self, model, alpha: float) -> None:  # noqa: ANN001
        import torch

        state = model.state_dict()
        with torch.no_grad():
            for key, un in self.theta_un.items():
                dst, un, v = state[key].view(-1), un.reshape(-1), self.v[key].reshape(-1)
                buf = torch.empty(min(1 << 18, v.numel()))
                for s in range(0, v.numel(), 1 << 18):
                    e = min(s + (1 << 18), v.numel())
                    dst[s:e].copy_(torch.mul(v[s:e], alpha, out=buf[: e - s]).add_(un[s:e]))


def load_live_model(folder: Path):  # noqa: ANN201
    """from_pretrained in bf16, weights then copied into private memory: transformers leaves them as mmap views of
    the file until first written, and a trial's first apply turns them into private memory anyway."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed loading buffers back to the OS: the baseline is the model
    return model


def digest(model) -> str:  # noqa: ANN001
    """A hash of every weight's bytes: both designs must give bit-identical models."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(design: str, root: Path, repeats: int, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from uipe.update_vector import UpdateVector

    torch.set_num_threads(threads)
    model = load_live_model(root / "ini")
    params = sum(t.numel() for t in model.state_dict().values())
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    sampler = PeakAnon()
    base = sampler.mark()
    t0 = time.perf_counter()
    uv = UpdateVector.from_folders(root / "ini", root / "un") if design == "new" else OldUpdateVector(
        root / "ini", root / "un")
    setup_s, times = time.perf_counter() - t0, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        uv.apply(model, ALPHA)
        times.append(time.perf_counter() - t0)
        sampler.mark()
    kept = sampler.mark() - base  # what a cached entry costs between trials
    peak = sampler.stop() - base
    out = {"design": design, "params": params, "model_bytes": model_bytes, "peak_beyond_model": peak,
           "kept_beyond_model": kept, "setup_s": setup_s, "apply_s": statistics.median(times), "apply_all_s": times,
           "digest": digest(model)}
    if design == "new":
        del uv
        out.update(plain_load(model, root / "un", repeats, load_file))
    return out


def plain_load(model, un: Path, repeats: int, load_file) -> dict:  # noqa: ANN001
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    sampler, times = PeakAnon(), []
    base = sampler.mark()
    for _ in range(repeats):
        t0 = time.perf_counter()
        for shard in sorted(un.glob("*.safetensors")):
            model.load_state_dict(load_file(shard), strict=False)
        times.append(time.perf_counter() - t0)
        sampler.mark()
    return {"load_s": statistics.median(times), "load_all_s": times, "load_peak_beyond_model": sampler.stop() - base}


def run_sub(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{args}: failed\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b*x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def report(rows: list[dict]) -> dict:
    print("| size | params | model MB | new: beyond model MB (B/param), kept | old: beyond model MB (B/param), kept "
          "| goal MB | new apply s | old apply s | plain load s | new/load | memory goal | time goal |")
    print("| --- " * 12 + "|")
    for r in rows:
        new, old = r["new"], r["old"]
        goal = MEM_GOAL_FRACTION * new["model_bytes"] + MEM_GOAL_BYTES
        ratio = new["apply_s"] / new["load_s"]
        r.update(goal_bytes=goal, time_ratio=ratio, memory_met=new["peak_beyond_model"] <= goal,
                 time_met=ratio <= TIME_GOAL, old_over_new_apply=old["apply_s"] / new["apply_s"])
        print(f"| {r['size']} | {new['params'] / 1e6:.1f}M | {new['model_bytes'] / 1e6:.0f} | "
              f"{new['peak_beyond_model'] / 1e6:.1f} ({new['peak_beyond_model'] / new['params']:.3f}), "
              f"{new['kept_beyond_model'] / 1e6:.1f} | "
              f"{old['peak_beyond_model'] / 1e6:.0f} ({old['peak_beyond_model'] / old['params']:.2f}), "
              f"{old['kept_beyond_model'] / 1e6:.0f} | {goal / 1e6:.0f} | {new['apply_s']:.2f} | "
              f"{old['apply_s']:.2f} (+{old['setup_s']:.1f} setup) | {new['load_s']:.2f} | {ratio:.2f}x | "
              f"{'MET' if r['memory_met'] else 'MISSED'} | {'MET' if r['time_met'] else 'MISSED'} |")
    fits = {}
    if len(rows) >= 2:
        for design in ("new", "old"):
            a, b = fit([r[design]["params"] for r in rows], [r[design]["peak_beyond_model"] for r in rows])
            fits[design] = {"a_bytes": a, "b_bytes_per_param": b}
            print(f"fit {design}: memory beyond model = {a / 1e6:.1f} MB + {b:.3f} B/param x params")
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {','.join(SIZES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared VM)")
    ap.add_argument("--out", type=Path, help="write every figure as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("DESIGN", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, metavar=("SIZE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        return make_pair(args.make[0], Path(args.make[1]))
    if args.worker:
        result = worker(args.worker[0], Path(args.worker[1]), args.repeats, args.threads)
        return print("RESULT " + json.dumps(result), flush=True)
    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := [s for s in sizes if s not in SIZES]:
        sys.exit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    rows = []
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"bench_memory_{size}_"))
        try:
            t0 = time.perf_counter()
            run_sub(["--make", size, str(root)])
            print(f"{size}: checkpoints written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            sub = ["--repeats", str(args.repeats), "--threads", str(args.threads), "--worker"]
            row = {"size": size, **{d: run_sub([*sub, d, str(root)]) for d in ("new", "old")}}
            if row["new"]["digest"] != row["old"]["digest"]:
                sys.exit(f"{size}: the two designs gave different weights")
            print(f"{size}: done ({time.perf_counter() - t0:.0f} s); same weights from both designs",
                  file=sys.stderr, flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    fits = report(rows)
    if args.out:
        args.out.write_text(json.dumps({"alpha": ALPHA, "threads": args.threads, "rows": rows, "fits": fits},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
