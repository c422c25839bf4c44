"""UIPE parameter extrapolation: theta_uipe = theta_un + alpha * (theta_un - theta_ini).

UIPE (arXiv 2503.04693) scales the update of a base unlearning run, v = theta_un - theta_ini, so that it also
removes the related knowledge the model could use to rebuild forgotten facts:
    theta_uipe = theta_un + alpha * v = theta_ini + (1 + alpha) * v.

Two forms share one per-tensor function, `extrapolate_tensor`, so they agree bit for bit:
- `extrapolate_folder`: Hugging Face safetensors folder -> new folder, streamed one output shard at a time
  (peak memory about one shard, never the whole model);
- `UpdateVector`: theta_un and v held in memory, re-applied to a live model per search trial (no disk reads).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uipe.errors import UipeError
from uipe.io import atomic_dir, atomic_write_json

OPERATOR = "theta_un + alpha*(theta_un - theta_ini)"
META_FILE = "uipe_meta.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files never copied from theta_un's folder: other weight formats (they would hold theta_un, not theta_uipe) and
# training state (optimizer.pt, rng_state.pth, ...) that does not belong to the extrapolated model.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".pkl")
# Elements per arithmetic step: small fp32 scratch buffers, reused, instead of whole-tensor fp32 temporaries.
_CHUNK = 1 << 18


def _open(path: Path) -> safe_open:
    # The default mmap backend: get_tensor gives a view of the page cache, no copy (pread allocates and copies).
    return safe_open(path, framework="pt")


def _keys_in_file_order(f: safe_open) -> list[str]:
    return list(f.offset_keys()) if hasattr(f, "offset_keys") else sorted(f.keys())


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors model folder: which shard holds each tensor, and each tensor's dtype and shape."""

    folder: Path
    shards: tuple[str, ...]
    weight_map: dict[str, str]
    specs: dict[str, tuple[str, tuple[int, ...]]]


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read the index (or the single file's header) of a safetensors folder; tensor data is not loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UipeError(f"{folder}: not a model folder")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise UipeError(f"{index}: not a safetensors index with a weight_map ({e})") from e
    elif (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            weight_map = {k: SINGLE_FILE for k in f.keys()}
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in _SKIP_SUFFIXES)) or "no weights"
        raise UipeError(f"{folder}: safetensors weights are required ({SINGLE_FILE} or {INDEX_FILE}); found {found}")
    shards = tuple(dict.fromkeys(sorted(weight_map.values())))
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise UipeError(f"{folder / shard}: shard listed in {INDEX_FILE} is missing")
        with safe_open(folder / shard, framework="pt") as f:
            present = set(f.keys())
            for key in (k for k, s in weight_map.items() if s == shard):
                if key not in present:
                    raise UipeError(f"{folder / shard}: tensor {key!r} listed in the index is not in the shard")
                sl = f.get_slice(key)
                specs[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return Checkpoint(folder, shards, weight_map, specs)


def validate_pair(ini: Checkpoint, un: Checkpoint) -> None:
    """Same tensor names, shapes and dtypes in both models; the error names the first bad tensor in sorted order."""
    both = f"init {ini.folder} vs unlearned {un.folder}"
    for key in sorted(set(ini.specs) | set(un.specs)):
        if key not in un.specs:
            raise UipeError(f"tensor {key!r} is in init but missing from unlearned ({both})")
        if key not in ini.specs:
            raise UipeError(f"tensor {key!r} is in unlearned but missing from init ({both})")
        (di, si), (du, su) = ini.specs[key], un.specs[key]
        if si != su:
            raise UipeError(f"tensor {key!r}: shape {list(si)} in init, {list(su)} in unlearned ({both})")
        if di != du:
            raise UipeError(f"tensor {key!r}: dtype {di} in init, {du} in unlearned ({both})")


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UipeError(f"alpha must be a finite number, got {alpha!r}")
    return value


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 arithmetic for bf16/fp16/fp32 weights; fp64 weights keep fp64 rather than lose precision.
    return torch.promote_types(dtype, torch.float32)


def _combine(un: torch.Tensor, v: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """theta_un + alpha * v (UIPE, arXiv 2503.04693) as alpha*v, then + theta_un: one rounding per op, no fused
    multiply-add, so every element comes out the same whatever the chunking, threads or form. `out` may be `v`."""
    return torch.mul(v, alpha, out=out).add_(un)


def _chunk_buffer(like: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor | None:
    return None if like.dtype == dtype else torch.empty(min(_CHUNK, n), dtype=dtype, device=like.device)


def extrapolate_tensor(
    theta_ini: torch.Tensor, theta_un: torch.Tensor, alpha: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor of theta_un + alpha*(theta_un - theta_ini), computed in fp32, cast back to theta_un's dtype.

    alpha == 0 and non-float tensors (int/bool) give theta_un itself (or a copy into `out`): no arithmetic, so
    bit-identical. The inputs are never modified. `out` (contiguous, theta_un's shape and dtype) lets the folder
    form reuse its buffers; work goes in chunks with small fp32 scratch buffers, never a whole-tensor fp32 copy.
    """
    if alpha == 0 or not theta_un.dtype.is_floating_point:
        return theta_un if out is None else out.copy_(theta_un)
    if out is None:
        out = torch.empty(theta_un.shape, dtype=theta_un.dtype, device=theta_un.device)
    dt = _compute_dtype(theta_un.dtype)
    un, ini, dst = theta_un.reshape(-1), theta_ini.reshape(-1), out.view(-1)
    n = un.numel()
    un_buf, ini_buf, v_buf = _chunk_buffer(un, dt, n), _chunk_buffer(ini, dt, n), _chunk_buffer(dst, dt, n)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        u = un[s:e] if un_buf is None else un_buf[: e - s].copy_(un[s:e])
        i = ini[s:e] if ini_buf is None else ini_buf[: e - s].copy_(ini[s:e])
        v = torch.sub(u, i, out=dst[s:e] if v_buf is None else v_buf[: e - s])  # v = theta_un - theta_ini
        _combine(u, v, alpha, out=v)
        if v_buf is not None:
            dst[s:e].copy_(v)  # round to theta_un's dtype once, at the end
    return out


def _apply_into(un: torch.Tensor, v: torch.Tensor, alpha: float, param: torch.Tensor) -> None:
    """param <- theta_un + alpha*v with the same per-element ops as extrapolate_tensor (then one cast on copy_)."""
    if not param.is_contiguous():
        param.copy_(_combine(un, v, alpha, out=torch.empty_like(v)))
        return
    dst, un, v = param.view(-1), un.reshape(-1), v.reshape(-1)
    buf = None if dst.dtype == v.dtype and dst.device == v.device else torch.empty(min(_CHUNK, v.numel()),
                                                                                   dtype=v.dtype, device=v.device)
    for s in range(0, v.numel(), _CHUNK):
        e = min(s + _CHUNK, v.numel())
        r = _combine(un[s:e], v[s:e], alpha, out=dst[s:e] if buf is None else buf[: e - s])
        if buf is not None:
            dst[s:e].copy_(r)


class _OutputPool:
    """Output buffers reused from shard to shard: fresh allocations cost page faults (~20 ms per 32 MiB here)."""

    def __init__(self) -> None:
        self.free: dict[tuple[str, tuple[int, ...]], list[torch.Tensor]] = {}

    def keep_only(self, needs: Counter[tuple[str, tuple[int, ...]]]) -> None:
        """Free what the next shard will not use, so live outputs never exceed one shard."""
        self.free = {k: bufs[: needs[k]] for k, bufs in self.free.items() if needs[k]}

    def take(self, spec: tuple[str, tuple[int, ...]], like: torch.Tensor) -> torch.Tensor:
        bufs = self.free.get(spec)
        return bufs.pop() if bufs else torch.empty(like.shape, dtype=like.dtype, device=like.device)

    def give_back(self, spec: tuple[str, tuple[int, ...]], t: torch.Tensor) -> None:
        self.free.setdefault(spec, []).append(t)


def _copy_other_files(src: Path, dst: Path, shards: tuple[str, ...]) -> None:
    """Copy config, tokenizer, index, ... (not weights of any format, not uipe's own metadata, not sub-folders)."""
    for p in sorted(src.iterdir()):
        name = p.name
        skip = (
            not p.is_file() or name.startswith(".") or name in shards or name == META_FILE
            or name.endswith(_SKIP_SUFFIXES) or (name.endswith(".index.json") and name != INDEX_FILE)
        )
        if not skip:
            shutil.copy2(p, dst / name)


def _progress_line(i: int, n: int, shard: str, nbytes: int, seconds: float) -> None:
    mbs = nbytes / 1e6 / max(seconds, 1e-9)
    print(f"uipe extrapolate: shard {i}/{n} {shard} {nbytes / 1e6:.1f} MB read+written in {seconds:.2f} s "
          f"({mbs:.0f} MB/s)", file=sys.stderr, flush=True)


class _ShardReader:
    """Open a checkpoint's shards on demand (theta_ini's layout may differ from theta_un's); close them together."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.files: dict[str, safe_open] = {}

    def get(self, key: str) -> torch.Tensor:
        shard = self.ckpt.weight_map[key]
        if shard not in self.files:
            self.files[shard] = _open(self.ckpt.folder / shard)
        return self.files[shard].get_tensor(key)

    def close(self) -> None:
        for f in self.files.values():
            f.__exit__(None, None, None)
        self.files.clear()


def _is_float(spec: tuple[str, tuple[int, ...]]) -> bool:
    return spec[0].startswith(("F", "BF"))  # safetensors dtype names: F64, F32, F16, BF16, F8_E4M3, ...


def _write_shard(ini: Checkpoint, un: Checkpoint, shard: str, alpha: float, dst: Path, pool: _OutputPool) -> int:
    """Extrapolate every tensor of one theta_un shard into dst/shard; returns bytes read + written."""
    keys = [k for k, s in un.weight_map.items() if s == shard]
    computed = [k for k in keys if alpha != 0 and _is_float(un.specs[k])]
    pool.keep_only(Counter(un.specs[k] for k in computed))
    tensors: dict[str, torch.Tensor] = {}
    moved = 0
    # mmap: theta_un's tensors are views of the page cache; copied ones are written straight from it, so the
    # file stays open until save_file is done.
    with _open(un.folder / shard) as f:
        ini_reader = _ShardReader(ini)
        try:
            for key in (k for k in _keys_in_file_order(f) if un.weight_map.get(k) == shard):
                t_un = f.get_tensor(key)
                if key in computed:
                    t_ini = ini_reader.get(key)
                    tensors[key] = extrapolate_tensor(t_ini, t_un, alpha, out=pool.take(un.specs[key], t_un))
                    moved += t_ini.nbytes
                    del t_ini
                else:
                    tensors[key] = t_un
                moved += 2 * t_un.nbytes
                del t_un
        finally:
            ini_reader.close()
        save_file(tensors, dst / shard, metadata=f.metadata())
    for key in computed:
        pool.give_back(un.specs[key], tensors.pop(key))
    return moved


def extrapolate_folder(
    init: str | Path, unlearned: str | Path, alpha: float, out: str | Path,
    overwrite: bool = False, progress: bool = True,
) -> Path:
    """Write theta_un + alpha*(theta_un - theta_ini) as a model folder at `out` (shards and index as theta_un's).

    Everything is validated before anything is written; the folder appears at `out` only when complete.
    """
    alpha = _check_alpha(alpha)
    init, unlearned, out = Path(init), Path(unlearned), Path(out)
    if out.resolve() in (init.resolve(), unlearned.resolve()):
        raise UipeError(f"{out}: output folder must differ from the init and unlearned folders")
    if out.exists() and not overwrite:
        raise UipeError(f"{out}: already exists (pass overwrite=True to replace it)")
    ini, un = read_checkpoint(init), read_checkpoint(unlearned)
    validate_pair(ini, un)
    pool = _OutputPool()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i, shard in enumerate(un.shards, start=1):
            t0 = time.perf_counter()
            moved = _write_shard(ini, un, shard, alpha, tmp, pool)
            if progress:
                _progress_line(i, len(un.shards), shard, moved, time.perf_counter() - t0)
        _copy_other_files(un.folder, tmp, un.shards)
        atomic_write_json(tmp / META_FILE, {
            "init": str(init.resolve()), "unlearned": str(unlearned.resolve()), "alpha": alpha, "operator": OPERATOR,
        })
    return out
