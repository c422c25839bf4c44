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
import threading
import time
from collections import OrderedDict
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
# "pread" reads tensor bytes into the tensor directly; the default mmap would also keep each touched page of the
# input files resident (counted in RSS) until the file is closed.
_BACKEND = "pread"


def _open(path: Path) -> safe_open:
    try:
        return safe_open(path, framework="pt", backend=_BACKEND)
    except TypeError:  # safetensors < 0.8 has no backend argument (mmap only)
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


def _combine(un: torch.Tensor, v: torch.Tensor, alpha: float, reuse_v: bool = False) -> torch.Tensor:
    """theta_un + alpha * v (UIPE, arXiv 2503.04693), as (alpha*v) then + theta_un: the one op order both forms use."""
    out = v.mul_(alpha) if reuse_v else torch.mul(v, alpha)
    return out.add_(un)


def extrapolate_tensor(theta_ini: torch.Tensor, theta_un: torch.Tensor, alpha: float) -> torch.Tensor:
    """One tensor of theta_un + alpha*(theta_un - theta_ini), computed in fp32 and cast back to theta_un's dtype.

    alpha == 0 and non-float tensors (int/bool) return theta_un itself: no arithmetic, so bit-identical.
    """
    if alpha == 0 or not theta_un.dtype.is_floating_point:
        return theta_un
    dt = _compute_dtype(theta_un.dtype)
    un = theta_un.to(dt)
    v = torch.sub(un, theta_ini.to(dt))  # v = theta_un - theta_ini, a fresh buffer reused for the result
    return _combine(un, v, alpha, reuse_v=True).to(theta_un.dtype)


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


def _write_shard(ini: Checkpoint, un: Checkpoint, shard: str, alpha: float, dst: Path) -> int:
    """Extrapolate every tensor of one theta_un shard into dst/shard; returns bytes read + written."""
    moved = 0
    tensors: dict[str, torch.Tensor] = {}
    ini_reader = _ShardReader(ini)
    try:
        with _open(un.folder / shard) as f:
            metadata = f.metadata()
            for key in _keys_in_file_order(f):  # file order: sequential reads
                if key not in un.weight_map or un.weight_map[key] != shard:
                    continue
                t_un = f.get_tensor(key)
                t_ini = t_un
                if alpha != 0 and t_un.dtype.is_floating_point:
                    t_ini = ini_reader.get(key)
                    moved += t_ini.nbytes
                tensors[key] = extrapolate_tensor(t_ini, t_un, alpha)
                del t_ini, t_un
                moved += 2 * tensors[key].nbytes
    finally:
        ini_reader.close()
    save_file(tensors, dst / shard, metadata=metadata)
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
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i, shard in enumerate(un.shards, start=1):
            t0 = time.perf_counter()
            moved = _write_shard(ini, un, shard, alpha, tmp)
            if progress:
                _progress_line(i, len(un.shards), shard, moved, time.perf_counter() - t0)
        _copy_other_files(un.folder, tmp, un.shards)
        atomic_write_json(tmp / META_FILE, {
            "init": str(init.resolve()), "unlearned": str(unlearned.resolve()), "alpha": alpha, "operator": OPERATOR,
        })
    return out


@dataclass
class UpdateVector:
    """theta_un and v = theta_un - theta_ini in memory, keyed by safetensors key, for repeated `apply`.

    Float tensors are held in fp32 (both theta_un and v); int/bool tensors as theta_un's.
    """

    init: Path
    unlearned: Path
    theta_un: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]

    @classmethod
    def from_folders(cls, init: str | Path, unlearned: str | Path, device: str = "cpu") -> UpdateVector:
        ini, un = read_checkpoint(init), read_checkpoint(unlearned)
        validate_pair(ini, un)
        theta_un: dict[str, torch.Tensor] = {}
        v: dict[str, torch.Tensor] = {}
        ini_reader = _ShardReader(ini)
        try:
            for shard in un.shards:
                with _open(un.folder / shard) as f:
                    for key in (k for k in _keys_in_file_order(f) if un.weight_map.get(k) == shard):
                        t_un = f.get_tensor(key)
                        if not t_un.dtype.is_floating_point:
                            theta_un[key] = t_un.to(device)
                            continue
                        dt = _compute_dtype(t_un.dtype)
                        un32 = t_un.to(dt)
                        # same arithmetic as extrapolate_tensor: v = theta_un - theta_ini in the compute dtype
                        v[key] = torch.sub(un32, ini_reader.get(key).to(dt)).to(device)
                        theta_un[key] = un32.to(device)
        finally:
            ini_reader.close()
        return cls(Path(init), Path(unlearned), theta_un, v)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.theta_un.values()) + sum(t.nbytes for t in self.v.values())

    def apply(self, model: torch.nn.Module, alpha: float) -> None:
        """Set the model's parameters and buffers in place to theta_un + alpha*v (never accumulates)."""
        alpha = _check_alpha(alpha)
        state = model.state_dict()
        for key in sorted(self.theta_un):  # check every key before touching any weight
            if key not in state:
                raise UipeError(f"tensor {key!r} from {self.unlearned} is not in the model's state_dict")
            if tuple(state[key].shape) != tuple(self.theta_un[key].shape):
                raise UipeError(f"tensor {key!r}: shape {list(self.theta_un[key].shape)} in {self.unlearned}, "
                                f"{list(state[key].shape)} in the model")
        with torch.no_grad():
            for key, un in self.theta_un.items():
                value = un if alpha == 0 or key not in self.v else _combine(un, self.v[key], alpha)
                state[key].copy_(value)  # copy_ casts to the parameter's dtype, as the folder form's final .to()


_CACHE_SIZE = 2
_cache: OrderedDict[tuple[object, ...], UpdateVector] = OrderedDict()
_cache_lock = threading.Lock()


def _fingerprint(folder: str | Path) -> tuple[object, ...]:
    """The resolved folder plus name, size and mtime of its weight files and index: changes when weights change."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_FILE)
    return (str(folder), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def cached_update_vector(init: str | Path, unlearned: str | Path, device: str = "cpu") -> UpdateVector:
    """`UpdateVector.from_folders`, memoised per process (Ray Tune's reused actors keep it across trials).

    At most `_CACHE_SIZE` entries, least recently used evicted first (before loading, to bound the peak).
    """
    if not Path(init).is_dir() or not Path(unlearned).is_dir():
        raise UipeError(f"{init} / {unlearned}: model folders not found")
    key = (_fingerprint(init), _fingerprint(unlearned), device)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        while len(_cache) >= _CACHE_SIZE:
            _cache.popitem(last=False)
        uv = UpdateVector.from_folders(init, unlearned, device=device)
        _cache[key] = uv
        return uv


def clear_update_vector_cache() -> None:
    with _cache_lock:
        _cache.clear()
