"""UIPE's operator in memory, for search trials: theta_un and v = theta_un - theta_ini are held once per checkpoint,
and `apply(model, alpha)` sets a loaded model's weights in place to theta_un + alpha*v (arXiv 2503.04693), with the
same per-element arithmetic as the streaming folder form in uipe/extrapolate.py (so both give identical weights).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from uipe.errors import UipeError
from uipe.extrapolate import (
    INDEX_FILE,
    _apply_into,
    _check_alpha,
    _compute_dtype,
    _keys_in_file_order,
    _open,
    _ShardReader,
    read_checkpoint,
    validate_pair,
)


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
                        # copies: the mmap-backed tensors must not outlive their files
                        if not t_un.dtype.is_floating_point:
                            theta_un[key] = t_un.to(device, copy=True)
                            continue
                        dt = _compute_dtype(t_un.dtype)
                        un32 = t_un.to(device, dt, copy=True)
                        # same arithmetic as extrapolate_tensor: v = theta_un - theta_ini in the compute dtype
                        v[key] = torch.sub(un32, ini_reader.get(key).to(device, dt))
                        theta_un[key] = un32
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
                if alpha == 0 or key not in self.v:
                    state[key].copy_(un)  # copy_ casts to the parameter's dtype, as the folder form's final cast
                else:
                    _apply_into(un, self.v[key], alpha, state[key])


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
