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

Training part (issue 11, deliverable 3): per-rank peak memory of one FSDP2 unlearning step, old vs new loading.

    python scripts/bench_memory.py --train --sizes 50M,200M,800M --out bench_train_memory.json

For each size a random-init Llama checkpoint is written in bf16 (as released checkpoints are). Then, per method (GA:
the trainable model only; NPO: trainable + frozen reference) and design, a fresh group of `--world` processes (gloo,
CPU, one torch thread each) loads the model(s), takes one forward + backward + clip + AdamW step on one micro-batch
(2 x 48 tokens of forget and of retain data, uipe's own objective), and reports per rank the peak RssAnon (sampled
every millisecond) above the level before loading, once after loading and once after the step.
  old: the previous load_sharded, inline: from_pretrained in fp32 on every rank, then shard_model;
  new: uipe.train.sharding.load_sharded (meta device, shard, each rank reads only its own rows).
A case whose estimated peak (a line through the sizes already measured) would not fit in MemAvailable less 2 GiB
runs its loading only (if that fits) or is skipped, and is reported as such. Goal: per-rank peak at 800M on 2
workers <= 60% of the old one.
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


def random_llama(size: str):
    """A random-init bf16 Llama of one of SIZES (seed 0), untied, as released checkpoints are stored."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=VOCAB,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def make_pair(size: str, root: Path) -> None:
    import torch

    model = random_llama(size)
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


# ---- training memory (issue 11, deliverable 3) ---------------------------------------------------------------------
TRAIN_GOAL = 0.60  # new per-rank peak <= 60% of the old one, at 800M on 2 workers
TRAIN_METHODS = ("ga", "npo")


def make_train_base(size: str, root: Path) -> None:
    """theta_ini for the training benchmark: random-init Llama saved in bf16 (1 GB shards)."""
    random_llama(size).save_pretrained(root / "ini", max_shard_size="1GB")


def train_job(folder: Path):  # noqa: ANN201
    from uipe.config import load_config
    from uipe.train.job import Job, Runtime

    cfg = load_config(None, [])
    return Job(label="bench", objective="npo", params=None, model_path=str(folder), forget=(), retain=(), idk=(),
               epochs=1, lr=1e-5, train=cfg.train, model=cfg.model, job_hash="bench", export="",
               export_every_epoch=True, checkpoint_every=1, meta={}, runtime=Runtime(use_gpu=False))


def old_load_sharded(job, device, mesh, trainable: bool):  # noqa: ANN001, ANN201
    """The previous uipe.train.sharding.load_sharded (before issue 11), for the baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    from uipe.train.sharding import shard_model

    bf16 = device.type == "cuda" and job.model.dtype != "float32"
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=job.model.trust_remote_code).to(device)
    model = shard_model(model, mesh, bf16, job.train.reshard_after_forward)
    if trainable:
        return model.train()
    model.requires_grad_(False)
    return model.eval()


def train_batch(rank: int, seed: int):  # noqa: ANN201
    """One micro-batch of 2 sequences of 48 tokens; the first 16 are the prompt (label -100)."""
    import torch

    gen = torch.Generator().manual_seed(1000 * seed + rank)
    ids = torch.randint(3, VOCAB, (2, 48), generator=gen)
    labels = ids.clone()
    labels[:, :16] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_rank(design: str, method: str, root: Path, threads: int, load_only: bool = False) -> dict:
    """One rank of the group: load (model, and the reference for NPO), then one unlearning step (unless load_only);
    peak RssAnon above the level before loading, per rank."""
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    # Everything the loads import, imported before the baseline so both designs start from the same level.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from uipe.methods import Batch, get_objective
    from uipe.models import resolve_dtype  # noqa: F401
    from uipe.safetensors_io import read_checkpoint  # noqa: F401
    from uipe.train.sharding import load_sharded

    torch.set_num_threads(threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    device, job = torch.device("cpu"), train_job(root / "ini")
    objective = get_objective(method)
    load = load_sharded if design == "new" else old_load_sharded
    batch = Batch(forget=train_batch(rank, 1), retain=train_batch(rank, 2))
    dist.barrier()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    sampler = PeakAnon()
    base = sampler.mark()
    t0 = time.perf_counter()
    model = load(job, device, mesh, trainable=True)
    ref = load(job, device, mesh, trainable=False) if objective.needs_ref else None
    load_s = time.perf_counter() - t0
    sampler.mark()
    out = {"rank": rank, "params": sum(p.numel() for p in model.parameters()),  # global numel of the DTensors
           "base": base, "load_peak": sampler.peak - base, "load_s": load_s}
    if not load_only:
        t0 = time.perf_counter()
        optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.01)
        params = objective.params() if objective.params is not None else None
        loss, _ = objective.compute(model, ref, batch, params)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.update(loss=float(loss.detach()), step_s=time.perf_counter() - t0)
    peak = sampler.stop() - base
    if not load_only:
        out["peak"] = peak
    dist.destroy_process_group()
    return out


def run_group(design: str, method: str, root: Path, world: int, threads: int, load_only: bool) -> list[dict]:
    """`world` fresh processes (one rank each, gloo on 127.0.0.1), their results by rank."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "--threads", str(threads), "--train-rank", design, method, str(root)]
        procs.append(subprocess.Popen(cmd + (["--load-only"] if load_only else []), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for rank, proc in enumerate(procs):
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            for other in procs:
                other.kill()
            sys.exit(f"{design} {method} rank {rank}: failed (exit {proc.returncode})\n{stderr[-3000:]}")
        out.append(json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    return sorted(out, key=lambda c: c["rank"])


def mem_available() -> int:
    text = Path("/proc/meminfo").read_text()
    return 1024 * int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def llama_params(size: str) -> int:
    hidden, inter, layers = SIZES[size]
    return layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + 2 * VOCAB * hidden + hidden


def estimate(points: list[tuple[int, int]], params: int) -> float:
    """Bytes for `params` from the sizes measured so far: the least-squares line through 2+ points, else the one
    point's bytes per parameter (an overestimate: per-parameter figures fall with size); 15% margin."""
    if not points:
        return 0.0
    if len(points) == 1:
        return 1.15 * points[0][1] / points[0][0] * params
    a, b = fit([float(x) for x, _ in points], [float(y) for _, y in points])
    return 1.15 * (a + b * params)


def case_summary(ranks: list[dict]) -> dict:
    """Per-rank maxima over the group; the losses by rank (the designs must agree on them)."""
    out = {"params": ranks[0]["params"], "load_peak": max(c["load_peak"] for c in ranks),
           "load_s": max(c["load_s"] for c in ranks), "ranks": ranks}
    if "peak" in ranks[0]:
        out.update(peak=max(c["peak"] for c in ranks), step_s=max(c["step_s"] for c in ranks),
                   losses=[c["loss"] for c in ranks])
    return out


def train_report(rows: list[dict], world: int) -> dict:
    """Markdown table (per-rank maxima over ranks), per-variant least-squares fits."""
    print(f"Per-rank peaks, {world} ranks:")
    print("| size | params | method | design | load peak MB (B/param) | step peak MB (B/param) | new/old load "
          "| new/old step | load s | step s | loss, rank 0 |")
    print("| --- " * 11 + "|")
    for r in rows:
        for method in TRAIN_METHODS:
            cases = r.get(method, {})
            for design in ("old", "new"):
                c = cases.get(design)
                if c is None:
                    continue
                if "load_peak" not in c:
                    print(f"| {r['size']} | - | {method.upper()} | {design} | skipped: {c['skipped']} | | | | | | |")
                    continue
                old = cases.get("old", {})
                new_vs_old = design == "new" and "load_peak" in old
                load_ratio = f"{c['load_peak'] / old['load_peak']:.2f}" if new_vs_old else ""
                cells = [r["size"], f"{c['params'] / 1e6:.1f}M", method.upper(), design,
                         f"{c['load_peak'] / 1e6:.0f} ({c['load_peak'] / c['params']:.2f})"]
                if "peak" in c:
                    step_ratio = f"{c['peak'] / old['peak']:.2f}" if new_vs_old and "peak" in old else ""
                    cells += [f"{c['peak'] / 1e6:.0f} ({c['peak'] / c['params']:.2f})", load_ratio, step_ratio,
                              f"{c['load_s']:.1f}", f"{c['step_s']:.1f}", f"{c['losses'][0]:.4f}"]
                else:
                    cells += [f"not run: {c.get('skipped', '')}", load_ratio, "", f"{c['load_s']:.1f}", "", ""]
                print("| " + " | ".join(cells) + " |")
    fits: dict = {}
    for method in TRAIN_METHODS:
        for design in ("old", "new"):
            for phase, key in (("step", "peak"), ("load", "load_peak")):
                got = [r[method][design] for r in rows if key in r.get(method, {}).get(design, {})]
                if len(got) < 2:
                    continue
                a, b = fit([c["params"] for c in got], [c[key] for c in got])
                fits[f"{method}-{design}-{phase}"] = {"a_bytes": a, "b_bytes_per_param": b, "points": len(got)}
                print(f"fit {method.upper()} {design}, {phase} peak (world {world}, {len(got)} sizes): "
                      f"{a / 1e6:.0f} MB + {b:.2f} B/param x params")
    return fits


def written(size: str, flag: str) -> tuple[Path, float]:
    """Checkpoints of one size made in a fresh temporary folder by a subprocess (`flag`: --make or --make-train);
    returns the folder and the start time."""
    root, t0 = Path(tempfile.mkdtemp(prefix=f"bench_memory_{size}_")), time.perf_counter()
    try:
        run_sub([flag, size, str(root)])
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    print(f"{size}: checkpoints written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return root, t0


def train_main(args: argparse.Namespace, sizes: list[str]) -> None:
    methods = [m for m in args.methods.split(",") if m]
    rows: list[dict] = []
    seen: dict[tuple[str, str, str], list[tuple[int, int]]] = {}  # (method, design, phase) -> [(params, bytes)]
    for size in sizes:
        root, t0 = written(size, "--make-train")
        try:
            row: dict = {"size": size}
            for method in methods:
                row[method] = {}
                for design in ("new", "old"):
                    have = mem_available() - 2 * 2**30
                    step = estimate(seen.get((method, design, "step"), []), llama_params(size)) * args.world
                    load = estimate(seen.get((method, design, "load"), []), llama_params(size)) * args.world
                    why = f"estimated {step / 2**30:.1f} GiB for {args.world} ranks > {have / 2**30:.1f} GiB " \
                          f"available less 2 GiB"
                    if load > have:
                        row[method][design] = {"skipped": why}
                        print(f"{size} {method} {design}: skipped, {why}", file=sys.stderr, flush=True)
                        continue
                    t1 = time.perf_counter()
                    ranks = run_group(design, method, root, args.world, args.threads, load_only=step > have)
                    case = row[method][design] = case_summary(ranks)
                    if step > have:
                        case["skipped"] = f"step {why}"
                    for phase, key in (("step", "peak"), ("load", "load_peak")):
                        if key in case:
                            seen.setdefault((method, design, phase), []).append((case["params"], case[key]))
                    print(f"{size} {method} {design}: per-rank load peak {case['load_peak'] / 1e6:.0f} MB, step peak "
                          f"{case.get('peak', 0) / 1e6:.0f} MB, {time.perf_counter() - t1:.0f} s",
                          file=sys.stderr, flush=True)
                old, new = row[method].get("old", {}), row[method].get("new", {})
                if "losses" in old and "losses" in new:  # the same weights, hence the same loss on every rank
                    if any(abs(a - b) > 1e-5 * abs(a) for a, b in zip(old["losses"], new["losses"])):
                        sys.exit(f"{size} {method}: old and new loading gave different losses {old['losses']} "
                                 f"{new['losses']}")
            rows.append(row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    fits = train_report(rows, args.world)
    goals: dict = {}
    for method in methods:
        both = [r for r in rows if "load_peak" in r[method].get("old", {}) and "load_peak" in r[method].get("new", {})]
        if not both:
            continue
        r = both[-1]
        old, new = r[method]["old"], r[method]["new"]
        g = goals[method] = {"size": r["size"], "load_new_over_old": new["load_peak"] / old["load_peak"]}
        if "peak" in old and "peak" in new:
            g.update(step_new_over_old=new["peak"] / old["peak"], met=new["peak"] <= TRAIN_GOAL * old["peak"])
        print(f"goal at {r['size']}, {method.upper()}: per-rank peak new/old: load phase "
              f"{g['load_new_over_old']:.2f}; whole step "
              + (f"{g['step_new_over_old']:.2f} (goal <= {TRAIN_GOAL}): {'MET' if g['met'] else 'MISSED'}"
                 if "met" in g else "not measured for both designs"))
    if args.out:
        args.out.write_text(json.dumps({"world": args.world, "threads": args.threads, "rows": rows, "fits": fits,
                                        "goals": goals}, indent=2) + "\n")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {','.join(SIZES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared VM)")
    ap.add_argument("--out", type=Path, help="write every figure as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("DESIGN", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, metavar=("SIZE", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--train", action="store_true", help="training memory: an FSDP2 unlearning step, old vs new load")
    ap.add_argument("--methods", default=",".join(TRAIN_METHODS), help="--train: comma-separated subset of ga,npo")
    ap.add_argument("--world", type=int, default=2, help="--train: ranks (processes) per group")
    ap.add_argument("--make-train", nargs=2, metavar=("SIZE", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--train-rank", nargs=3, metavar=("DESIGN", "METHOD", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        return make_pair(args.make[0], Path(args.make[1]))
    if args.make_train:
        return make_train_base(args.make_train[0], Path(args.make_train[1]))
    if args.train_rank:
        result = train_rank(args.train_rank[0], args.train_rank[1], Path(args.train_rank[2]), args.threads,
                            args.load_only)
        return print("RESULT " + json.dumps(result), flush=True)
    if args.worker:
        result = worker(args.worker[0], Path(args.worker[1]), args.repeats, args.threads)
        return print("RESULT " + json.dumps(result), flush=True)
    sizes = [s for s in args.sizes.split(",") if s]
    if unknown := [s for s in sizes if s not in SIZES]:
        sys.exit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.train:
        return train_main(args, sizes)
    rows = []
    for size in sizes:
        root, t0 = written(size, "--make")
        try:
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
