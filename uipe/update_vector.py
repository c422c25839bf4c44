"""UIPE's operator for search trials: `apply(model, alpha)` sets a live model's weights in place to
theta_un + alpha*(theta_un - theta_ini) (arXiv 2503.04693), streamed from the two safetensors checkpoints.

Memory: theta_ini and theta_un stay in their files, opened read-only with mmap, so their pages live in the page
cache, shared by every trial on a node and reclaimable; a trial's own memory is the live model plus chunk buffers
(`UpdateVector.nbytes`: 3 MiB on CPU; on CUDA 64 MiB on the GPU and 16 MiB pinned on the host), whatever the model's
size. The per-element arithmetic is the folder form's
(`uipe.extrapolate.extrapolate_into`), so both give identical weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from uipe.errors import UipeError
from uipe.coefficients import Coefficients
from uipe.extrapolate import Importance, Scratch, as_coefficients, extrapolate_into
from uipe.safetensors_io import INDEX_FILE, Checkpoint, ShardReader, read_checkpoint, validate_pair

# Elements per host -> GPU chunk: bigger than the CPU chunk, so per-copy latency does not dominate (still 16 MiB
# per fp32 buffer).
CUDA_CHUNK = 1 << 22


class UpdateVector:
    """v = theta_un - theta_ini, kept as the two checkpoints' headers (validated once) and applied by streaming.

    Holds no tensor data; the files are opened for each `apply` and closed after it.
    """

    def __init__(self, init: Checkpoint, unlearned: Checkpoint, device: str | torch.device = "cpu",
                 importance: Checkpoint | None = None) -> None:
        validate_pair(init, unlearned)
        self.init, self.unlearned, self.importance = init, unlearned, importance
        self.scratch = Scratch(CUDA_CHUNK if torch.device(device).type == "cuda" else None)
        self._lock = threading.Lock()  # one set of scratch buffers: one apply at a time

    @classmethod
    def from_folders(cls, init: str | Path, unlearned: str | Path, device: str | torch.device = "cpu",
                     importance: str | Path | None = None) -> UpdateVector:
        """Read and check both folders' headers (names, shapes, dtypes, file sizes); no tensor data is read.
        `importance`: the weighted form's estimates for theta_un (uipe.search.importance)."""
        return cls(read_checkpoint(init), read_checkpoint(unlearned), device=device,
                   importance=read_checkpoint(importance) if importance else None)

    @property
    def nbytes(self) -> int:
        """The trial's working set beyond the model: the chunk buffers (the checkpoints are page cache)."""
        return self.scratch.nbytes

    def _check_model(self, state: dict[str, torch.Tensor]) -> None:
        for key in sorted(self.unlearned.specs):  # check every key before touching any weight
            shape = self.unlearned.specs[key][1]
            if key not in state:
                raise UipeError(f"tensor {key!r} from {self.unlearned.folder} is not in the model's state_dict")
            if tuple(state[key].shape) != shape:
                raise UipeError(f"tensor {key!r}: shape {list(shape)} in {self.unlearned.folder}, "
                                f"{list(state[key].shape)} in the model")

    def apply(self, model: torch.nn.Module, alpha: float | Coefficients) -> None:
        """Set the model's parameters and buffers in place to theta_un + alpha*(theta_un - theta_ini) (UIPE, arXiv
        2503.04693); `alpha` may be per-tensor coefficients (uipe.coefficients). The result depends only on the
        coefficients (never accumulates). Every key and shape is checked before any weight is written. Each weight is
        cast once, to its own dtype, at the end; a CUDA model's chunks go through pinned staging buffers."""
        coef = as_coefficients(alpha)
        state = model.state_dict()
        self._check_model(state)
        weights = Importance(coef, self.importance, self.unlearned)
        with self._lock, torch.no_grad(), ShardReader(self.init) as ini, ShardReader(self.unlearned) as un, weights:
            for shard in self.unlearned.shards:
                for key in un.keys(shard):  # file order: sequential reads of theta_un
                    self._apply_one(ini.get(key), un.get(key), coef.of(key), state[key], weights.get(key))

    def _apply_one(self, t_ini: torch.Tensor, t_un: torch.Tensor, alpha: float, param: torch.Tensor,
                   importance: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        if param.is_contiguous():
            extrapolate_into(t_ini, t_un, alpha, param, self.scratch, importance)
        else:  # rare (no Hugging Face model has one): a whole-tensor temporary, then copy
            tmp = torch.empty_like(param, memory_format=torch.contiguous_format)
            param.copy_(extrapolate_into(t_ini, t_un, alpha, tmp, self.scratch, importance))


_CACHE_SIZE = 2
_cache: OrderedDict[tuple[object, ...], UpdateVector] = OrderedDict()
_cache_lock = threading.Lock()


def _fingerprint(folder: str | Path) -> tuple[object, ...]:
    """The resolved folder plus name, size and mtime of its weight files and index: changes when weights change."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_FILE)
    return (str(folder), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def cached_update_vector(init: str | Path, unlearned: str | Path, device: str | torch.device = "cpu",
                         importance: str | Path | None = None) -> UpdateVector:
    """`UpdateVector.from_folders`, memoised per process (Ray Tune's reused actors keep it across trials).

    Entries are headers and a few MB of scratch, so the cache is cheap; it saves re-reading and re-validating the
    headers each trial. At most `_CACHE_SIZE` entries, least recently used evicted first.
    """
    if not Path(init).is_dir() or not Path(unlearned).is_dir():
        raise UipeError(f"{init} / {unlearned}: model folders not found")
    key = (_fingerprint(init), _fingerprint(unlearned), device, _fingerprint(importance) if importance else None)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        while len(_cache) >= _CACHE_SIZE:
            _cache.popitem(last=False)
        uv = UpdateVector.from_folders(init, unlearned, device=device, importance=importance)
        _cache[key] = uv
        return uv


def clear_update_vector_cache() -> None:
    with _cache_lock:
        _cache.clear()
