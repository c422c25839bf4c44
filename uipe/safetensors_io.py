"""Reading Hugging Face safetensors model folders without loading them: headers, shapes, mmap-backed tensors.

Every file is checked before any tensor is read, and every safetensors/OS error becomes one `UipeError` naming the
file ("<path>: not a readable safetensors file (...)"), which the CLI prints on one line with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from uipe.errors import UipeError
from uipe.stages import META_FILE

if TYPE_CHECKING:  # torch is not imported here: `uipe extrapolate` reads headers and warms the cache before it
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weight files of any format: never taken as config files, and listed when a folder has no safetensors weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".pkl")

Spec = tuple[str, tuple[int, ...]]  # (safetensors dtype name such as "BF16", shape)


def carried_files(src: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """The files a new model folder takes from the one it was made from: config, tokenizer, generation settings.
    Never weights of any format, weight indexes, uipe's record of how a folder was made, hidden files or folders."""
    return [p for p in sorted(Path(src).iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in (META_FILE, *exclude)
            and not p.name.endswith((*WEIGHT_SUFFIXES, ".index.json"))]


def unreadable(path: Path, reason: object) -> UipeError:
    return UipeError(f"{path}: not a readable safetensors file ({reason})")


@contextlib.contextmanager
def readable(path: Path) -> Iterator[None]:
    """Turn safetensors' errors (bad header, short file) and OS errors inside the block into one `UipeError`."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError) as e:
        raise unreadable(path, e) from e


@dataclass(frozen=True)
class Header:
    """What one safetensors file's header says: each tensor's spec and absolute byte span in the file, the file's
    size, and its text metadata (None when it has none, as safe_open's metadata() gives it)."""

    specs: dict[str, Spec]
    spans: dict[str, tuple[int, int]]
    size: int
    metadata: dict[str, str] | None


def read_header(path: Path) -> Header:
    """The header, parsed here (u64 little-endian length, then JSON), and the file's size.

    The size must be exactly 8 + header length + the largest data end offset: a file cut short in its data part
    is refused here, before any read (reading a mapped page past the end of a file raises SIGBUS).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if not 0 < n <= size - 8:
                raise unreadable(path, f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise unreadable(path, e) from e
    except ValueError as e:  # JSON and UTF-8 decoding errors
        raise unreadable(path, f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise unreadable(path, "header is not a JSON object")
    specs: dict[str, Spec] = {}
    spans: dict[str, tuple[int, int]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            specs[key] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise unreadable(path, f"bad header entry for tensor {key!r}: {e!r}") from e
        spans[key] = (8 + n + begin, 8 + n + stop)
    end = max((max(span) for span in spans.values()), default=8 + n)
    if size != end:
        raise unreadable(path, f"{size} bytes, but its header describes {end}: truncated or padded")
    metadata = header.get("__metadata__")
    return Header(specs, spans, size, metadata if isinstance(metadata, dict) else None)


def open_safetensors(path: Path, expected_size: int | None = None, framework: str = "pt") -> safe_open:
    """Open with the default mmap backend: get_tensor gives a read-only view of the page cache, no copy, so every
    process reading the same file shares one copy in memory. `expected_size` (from `read_header`) guards against a
    file rewritten or truncated since its header was checked. framework="numpy" runs the same header checks
    without importing torch."""
    with readable(path):
        if expected_size is not None and path.stat().st_size != expected_size:
            raise unreadable(path, f"{path.stat().st_size} bytes, {expected_size} when its header was checked")
        return safe_open(path, framework=framework)


def keys_in_file_order(f: safe_open) -> list[str]:
    return list(f.offset_keys()) if hasattr(f, "offset_keys") else sorted(f.keys())


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors model folder: which shard holds each tensor, each tensor's dtype and shape, each shard's size."""

    folder: Path
    shards: tuple[str, ...]
    weight_map: dict[str, str]
    specs: dict[str, Spec]
    sizes: dict[str, int]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> absolute byte range in its shard
    metadata: dict[str, dict[str, str] | None] = field(default_factory=dict)  # shard -> header metadata


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise UipeError(f"{index}: not a safetensors index with a weight_map ({e})") from e
    if (folder / SINGLE_FILE).is_file():
        return {k: SINGLE_FILE for k in read_header(folder / SINGLE_FILE).specs}
    found = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)) or "no weights"
    raise UipeError(f"{folder}: safetensors weights are required ({SINGLE_FILE} or {INDEX_FILE}); found {found}")


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read the index (or the single file's header) and every shard's header; tensor data is not read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UipeError(f"{folder}: not a model folder")
    weight_map = _weight_map(folder)
    shards = tuple(dict.fromkeys(sorted(weight_map.values())))
    ckpt = Checkpoint(folder, shards, weight_map, {}, {})
    for shard in shards:
        if not (folder / shard).is_file():
            raise UipeError(f"{folder / shard}: shard listed in {INDEX_FILE} is missing")
        header = read_header(folder / shard)
        ckpt.sizes[shard], ckpt.metadata[shard] = header.size, header.metadata
        with open_safetensors(folder / shard, header.size, framework="numpy"):
            pass  # safetensors' own checks too (offsets, dtype sizes): every file is refused before any writing
        for key in (k for k, s in weight_map.items() if s == shard):
            if key not in header.specs:
                raise UipeError(f"{folder / shard}: tensor {key!r} listed in the index is not in the shard")
            ckpt.specs[key], ckpt.spans[key] = header.specs[key], header.spans[key]
    return ckpt


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


def warm_page_cache(folders: list[Path], stop: threading.Event, chunk: int = 1 << 24) -> None:
    """Read the folders' safetensors files, shard by shard in turn, into the OS page cache until `stop` is set.

    Run in a thread while something slow and CPU-bound happens first (importing torch takes seconds): the disk works
    meanwhile, and the real reads then come from memory. posix_fadvise(WILLNEED) was tried instead and read far
    less. Errors are ignored: the real reads report them.
    """
    files = [sorted(Path(f).glob("*.safetensors")) for f in folders]
    buf = bytearray(chunk)
    for group in zip(*files):  # unequal counts: the rest is left to the real reads
        for path in group:
            with contextlib.suppress(OSError), open(path, "rb", buffering=0) as f:
                while not stop.is_set() and f.readinto(buf):
                    pass
            if stop.is_set():
                return


class ShardReader:
    """A checkpoint's shards, opened on demand (theta_ini's layout may differ from theta_un's), closed together.

    Tensors are mmap views: valid only while the reader is open.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.files: dict[str, safe_open] = {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def file(self, shard: str) -> safe_open:
        if shard not in self.files:
            self.files[shard] = open_safetensors(self.ckpt.folder / shard, self.ckpt.sizes[shard])
        return self.files[shard]

    def get(self, key: str) -> torch.Tensor:
        shard = self.ckpt.weight_map[key]
        with readable(self.ckpt.folder / shard):
            return self.file(shard).get_tensor(key)

    def keys(self, shard: str) -> list[str]:
        """The shard's tensors in file order (sequential reads), as listed for it in the weight map."""
        return [k for k in keys_in_file_order(self.file(shard)) if self.ckpt.weight_map.get(k) == shard]

    def close(self) -> None:
        for f in self.files.values():
            f.__exit__(None, None, None)
        self.files.clear()
