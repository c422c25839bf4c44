"""UIPE parameter extrapolation: theta_uipe = theta_un + alpha * (theta_un - theta_ini).

UIPE (arXiv 2503.04693) scales the update of a base unlearning run, v = theta_un - theta_ini, so that it also
removes the related knowledge the model could use to rebuild forgotten facts:
    theta_uipe = theta_un + alpha * v = theta_ini + (1 + alpha) * v.

Three paths share one chunked kernel, `extrapolate_into`, so they agree bit for bit:
- `extrapolate_folder`: Hugging Face safetensors folder -> new folder, streamed shard by shard with reads, arithmetic
  and writes overlapped (peak memory about three shards, never the whole model);
- `uipe.update_vector.UpdateVector`: streams both mmap'ed checkpoints into a live model's weights per search trial;
- `uipe.train.sharding.load_own_shards`: each FSDP2 rank extrapolates its own rows (a sharded trial).
Each takes a plain alpha or per-tensor coefficients (uipe.coefficients: the groups form's alpha per tensor, the
weighted form's per-element scales from an importance folder, `Importance`); theta_ini may be an earlier epoch's
checkpoint (the anchor form).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from uipe.coefficients import Coefficients, check_coefficient
from uipe.errors import UipeError
from uipe.io import atomic_dir, atomic_write_json
from uipe.safetensors_io import (INDEX_FILE, Checkpoint, ShardReader, Spec, carried_files, read_checkpoint,
                                 validate_pair)
from uipe.shard_pipeline import Shard, ShardPipeline, ShardPlan
from uipe.stages import META_FILE

OPERATOR = "theta_un + alpha*(theta_un - theta_ini)"
# Elements per arithmetic step: small fp32 scratch buffers, reused, instead of whole-tensor fp32 temporaries.
CHUNK = 1 << 18


def check_alpha(alpha: float) -> float:
    """alpha as a finite float, or a UipeError naming the bad value."""
    return check_coefficient(alpha)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for bf16/fp16/fp32 weights; fp64 weights keep fp64 rather than lose precision."""
    return torch.promote_types(dtype, torch.float32)


class Scratch:
    """Chunk-sized buffers for `extrapolate_into`, allocated once per (role, dtype, device) and reused.

    Fresh whole-tensor temporaries would cost page faults (~20 ms per 32 MiB here) and memory that grows with the
    model; these stay at a few MB whatever the model. For a CUDA output, host chunks go through pinned staging
    buffers (page-locked memory the GPU's DMA engine reads directly).
    """

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk or CHUNK
        self.buffers: dict[tuple[str, torch.dtype, str, bool], torch.Tensor] = {}
        self._copied: dict[str, torch.cuda.Event] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held in buffers (host, pinned and device together)."""
        return sum(b.nbytes for b in self.buffers.values())

    def buffer(self, role: str, dtype: torch.dtype, device: torch.device | str, pinned: bool = False) -> torch.Tensor:
        key = (role, dtype, str(device), pinned)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.chunk, dtype=dtype, device=device, pin_memory=pinned)
        return self.buffers[key]

    def load(self, role: str, src: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """One chunk `src` as `dtype` on `device`: src itself when it already is, else a copy in a reused buffer."""
        n = src.numel()
        if src.device != device:
            src = self._to_device(role, src, device)
        if src.dtype == dtype:
            return src
        return self.buffer(role, dtype, device)[:n].copy_(src)  # bf16/fp16 -> fp32 is exact

    def _to_device(self, role: str, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Host -> accelerator in the source dtype (half the bytes of fp32). For CUDA through pinned staging: the
        host waits only until the previous transfer from the same staging buffer is done, so copies overlap the
        arithmetic (a copy from pageable memory, such as the mmap'ed file, would make the host wait for each one)."""
        n = src.numel()
        raw = self.buffer(role + ".raw", src.dtype, device)[:n]
        if device.type != "cuda" or not torch.cuda.is_available():
            return raw.copy_(src)
        stage = self.buffer(role + ".pinned", src.dtype, "cpu", pinned=True)[:n]
        if role in self._copied:
            self._copied[role].synchronize()
        stage.copy_(src)
        raw.copy_(stage, non_blocking=True)
        self._copied.setdefault(role, torch.cuda.Event()).record(torch.cuda.current_stream(device))
        return raw


def extrapolate_into(
    theta_ini: torch.Tensor, theta_un: torch.Tensor, alpha: float, out: torch.Tensor, scratch: Scratch | None = None,
    importance: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """out <- theta_un + alpha*(theta_un - theta_ini) (UIPE, arXiv 2503.04693, eq. 4), chunk by chunk; return out.

    Per element, in compute_dtype (fp32 for bf16/fp16/fp32): v = un - ini; alpha*v; then + un; one rounding per op,
    never a fused multiply-add, so every element comes out the same whatever the chunking, device or form; one cast
    to out's dtype at the end. alpha == 0 and int/bool tensors: out <- theta_un, no arithmetic (bit-identical).
    out must be contiguous, theta_un's shape; it may be another dtype or device (a CUDA model's weights).
    `importance` (f_forget, f_retain, retain_lambda), theta_un's shape: the weighted form, alpha*v times
    s = f_forget / (f_forget + retain_lambda*f_retain) per element (0 where both are 0; `weighted_scale`).
    theta_ini may be any earlier checkpoint (the anchor form: theta_e + alpha*(theta_e - theta_e')).
    """
    scratch = scratch or Scratch()
    un, ini, dst = theta_un.reshape(-1), theta_ini.reshape(-1), out.view(-1)
    copy_only = alpha == 0 or not theta_un.dtype.is_floating_point
    if copy_only and un.device == dst.device:
        return out.copy_(theta_un)
    dt = theta_un.dtype if copy_only else compute_dtype(theta_un.dtype)
    for s in range(0, un.numel(), scratch.chunk):
        e = min(s + scratch.chunk, un.numel())
        u = scratch.load("un", un[s:e], dt, dst.device)
        if copy_only:
            dst[s:e].copy_(u)
            continue
        i = scratch.load("ini", ini[s:e], dt, dst.device)
        direct = dst.dtype == dt  # fp32 out: compute in place, no cast needed
        v = dst[s:e] if direct else scratch.buffer("v", dt, dst.device)[: e - s]
        torch.sub(u, i, out=v)  # v = theta_un - theta_ini
        torch.mul(v, alpha, out=v)
        if importance is not None:
            v.mul_(weighted_scale(importance, s, e, dt, dst.device, scratch))
        v.add_(u)  # theta_un + alpha * v, as separately rounded ops (no FMA)
        if not direct:
            dst[s:e].copy_(v)  # round to out's dtype once, at the end
    return out


def weighted_scale(importance: tuple[torch.Tensor, torch.Tensor, float], s: int, e: int, dt: torch.dtype,
                   device: torch.device, scratch: Scratch) -> torch.Tensor:
    """Elements [s, e) of s = f_forget / (f_forget + retain_lambda * f_retain), in [0, 1]: near 1 where the forget
    loss's Fisher dominates, near 0 where the retain loss's does, 0 where neither loss moves the element."""
    f_forget, f_retain, lam = importance
    ff = scratch.load("f_forget", f_forget.reshape(-1)[s:e], dt, device)
    fr = scratch.load("f_retain", f_retain.reshape(-1)[s:e], dt, device)
    scale = scratch.buffer("scale", dt, device)[: e - s]
    torch.mul(fr, lam, out=scale).add_(ff)  # the denominator
    torch.div(ff, scale, out=scale)
    return scale.nan_to_num_(0.0)  # 0/0: an element neither loss moves stays at theta_un


def extrapolate_tensor(
    theta_ini: torch.Tensor, theta_un: torch.Tensor, alpha: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor of theta_un + alpha*(theta_un - theta_ini), computed in fp32, in theta_un's dtype.

    alpha == 0 and non-float tensors (int/bool) give theta_un itself (or a copy into `out`). The inputs are never
    modified. `out` (contiguous, theta_un's shape and dtype) lets the folder form reuse its buffers.
    """
    if out is None:
        if alpha == 0 or not theta_un.dtype.is_floating_point:
            return theta_un
        out = torch.empty(theta_un.shape, dtype=theta_un.dtype, device=theta_un.device)
    return extrapolate_into(theta_ini, theta_un, alpha, out)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, ... and theta_un's index (the output keeps theta_un's shard names)."""
    for p in carried_files(src) + [p for p in [src / INDEX_FILE] if p.is_file()]:
        shutil.copy2(p, dst / p.name)


def _progress_line(shard: Shard, n: int, seconds: float) -> None:
    mbs = shard.moved / 1e6 / max(seconds, 1e-9)
    print(f"uipe extrapolate: shard {shard.index + 1}/{n} {shard.plan.name} {shard.moved / 1e6:.1f} MB read+written "
          f"in {seconds:.2f} s ({mbs:.0f} MB/s)", file=sys.stderr, flush=True)


def _is_float(spec: Spec) -> bool:
    return spec[0].startswith(("F", "BF"))  # safetensors dtype names: F64, F32, F16, BF16, F8_E4M3, ...


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n for the block, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def as_coefficients(alpha: float | Coefficients) -> Coefficients:
    """A plain alpha as the global form's coefficients; coefficients checked finite."""
    if isinstance(alpha, Coefficients):
        for value in [alpha.alpha, *(alpha.alphas or {}).values()]:
            check_alpha(value)
        return alpha
    return Coefficients(check_alpha(alpha))


IMPORTANCE_KEYS = ("f_forget.", "f_retain.")  # an importance folder's tensors: f_forget.<name>, f_retain.<name>


class Importance:
    """The weighted form's per-element estimates (uipe.search.importance writes them), mmap'ed from an importance
    folder. `get(key)` is the kernel's `importance` argument for one tensor (None: not the weighted form)."""

    def __init__(self, coef: Coefficients, folder: Checkpoint | str | Path | None, un: Checkpoint) -> None:
        self.lam = coef.retain_lambda
        self.ckpt: Checkpoint | None = None
        self.reader: ShardReader | None = None
        if self.lam is None:
            return
        if folder is None:
            raise UipeError("the weighted form needs an importance folder (f_forget / f_retain of every tensor)")
        self.ckpt = folder if isinstance(folder, Checkpoint) else read_checkpoint(folder)
        for key in sorted(k for k, spec in un.specs.items() if _is_float(spec)):
            for name in (p + key for p in IMPORTANCE_KEYS):
                if name not in self.ckpt.specs:
                    raise UipeError(f"{self.ckpt.folder}: importance tensor {name!r} is missing")
                if self.ckpt.specs[name][1] != un.specs[key][1]:
                    raise UipeError(f"{self.ckpt.folder}: importance tensor {name!r} has shape "
                                    f"{list(self.ckpt.specs[name][1])}, {key!r} has {list(un.specs[key][1])}")

    def __enter__(self) -> Importance:
        if self.ckpt is not None:
            self.reader = ShardReader(self.ckpt).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def get(self, key: str, cut: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
            ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.reader is None or self.lam is None:
            return None
        return cut(self.reader.get(IMPORTANCE_KEYS[0] + key)), cut(self.reader.get(IMPORTANCE_KEYS[1] + key)), self.lam


def extrapolate_folder(
    init: str | Path, unlearned: str | Path, alpha: float | Coefficients, out: str | Path,
    overwrite: bool = False, progress: bool = True, overlap: bool = True, importance: str | Path | None = None,
    record: dict | None = None,
) -> Path:
    """Write theta_un + alpha*(theta_un - theta_ini) as a model folder at `out` (shards and index as theta_un's);
    `alpha` may be per-tensor coefficients (uipe.coefficients; the weighted form also reads `importance`) and
    `init` any earlier checkpoint (the anchor form). `record`: what the form was, written into the folder's record.

    Everything is validated before anything is written; the folder appears at `out` only when complete. Shards are
    read, computed and written by overlapped stages (`uipe.shard_pipeline`); overlap=False runs them one after the
    other, with the same result bit for bit.
    """
    coef = as_coefficients(alpha)
    init, unlearned, out = Path(init), Path(unlearned), Path(out)
    if out.resolve() in (init.resolve(), unlearned.resolve()):
        raise UipeError(f"{out}: output folder must differ from the init and unlearned folders")
    if out.exists() and not overwrite:
        raise UipeError(f"{out}: already exists (use --overwrite to replace it)")
    ini, un = read_checkpoint(init), read_checkpoint(unlearned)
    validate_pair(ini, un)
    weights = Importance(coef, importance, un)
    plans = [ShardPlan.of(un, shard, lambda k: coef.of(k) != 0 and _is_float(un.specs[k])) for shard in un.shards]
    scratch = Scratch()
    # One torch thread: the reader and writer threads keep the other core busy copying bytes; a second intra-op
    # thread on 1 MB chunks only fights them (measured: docs/BENCHMARKS.md, "Extrapolation").
    with atomic_dir(out, overwrite=overwrite) as tmp, torch_threads(1), weights, \
            ShardPipeline(ini, un, plans, tmp, overlap, _progress_line if progress else None) as pipe:
        for tensors in pipe:
            for key, t_out, t_un in tensors:
                if t_un is not None:  # t_out holds theta_ini; each chunk is read before its result is written
                    extrapolate_into(t_out, t_un, coef.of(key), t_out, scratch, weights.get(key))
        _copy_other_files(un.folder, tmp)
        atomic_write_json(tmp / META_FILE, {
            "init": str(init.resolve()), "unlearned": str(unlearned.resolve()), "alpha": coef.alpha,
            "operator": OPERATOR, **(record or {}),
        })
    return out
