"""A safetensors folder streamed shard by shard through overlapped stages: read, compute, write.

`uipe extrapolate` (theta_un + alpha*(theta_un - theta_ini), UIPE arXiv 2503.04693) moves 3 bytes per byte of model:
it reads theta_ini and theta_un and writes the result. Run one after the other, the reads, the arithmetic and the
writes wait for each other. Here a reader thread reads shard i tensor by tensor while the caller computes the
tensors already read, and a writer thread saves shard i-1 meanwhile (file reads, torch ops and safetensors'
save_file all release the GIL, so the three share two cores).

Memory: three shard-sized buffers, allocated once and reused, so pages are faulted in once, not per shard:
- two "out" buffers: theta_ini's bytes are read into one and the caller overwrites them with the result in place
  (each element of theta_ini is read before its result is written); the writer saves shard i-1 from one while
  shard i is read and computed in the other;
- one "un" buffer for theta_un's bytes, free again once the caller has computed the shard.
Tensors copied unchanged (ints, alpha = 0) are read from theta_un straight into the out buffer. Peak: 3 x the
largest shard plus the interpreter and torch; a fourth buffer would let shard i+1 be read during shard i's
arithmetic, but breaks that bound.

Explicit reads (pread into the reused buffers) replace mmap views: mapping costs a page fault per 4 KiB page of
both inputs, every shard.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uipe.safetensors_io import Checkpoint, unreadable

ALIGN = 64  # each tensor's slot starts on a cache line, so any dtype can view it
POLL_S = 0.05  # how often a blocked stage checks whether the pipeline was stopped
# safetensors dtype names -> torch dtype attribute names (as safetensors.torch maps them)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U64": "uint64", "U32": "uint32",
          "U16": "uint16", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
          "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz"}


class _Stopped(Exception):
    """Another stage failed: this one leaves quietly; the caller re-raises the first error."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ShardPlan:
    """One theta_un shard: its tensors in file order (sequential reads), where each lives in the buffers, and which
    are computed (read from both checkpoints) rather than copied from theta_un."""

    name: str
    keys: tuple[str, ...]
    out_slot: dict[str, int]
    un_slot: dict[str, int]  # computed tensors only

    @classmethod
    def of(cls, un: Checkpoint, shard: str, computed: Callable[[str], bool]) -> ShardPlan:
        """The plan for one shard; a dtype torch cannot hold is refused here, before anything is written."""
        keys = tuple(sorted((k for k, s in un.weight_map.items() if s == shard), key=lambda k: un.spans[k]))
        out_slot, un_slot, out_end, un_end = {}, {}, 0, 0
        for k in keys:
            torch_dtype(un, k)
            n = _aligned(un.spans[k][1] - un.spans[k][0])
            out_slot[k], out_end = out_end, out_end + n
            if computed(k):
                un_slot[k], un_end = un_end, un_end + n
        return cls(shard, keys, out_slot, un_slot)

    def nbytes(self, un: Checkpoint, slots: dict[str, int]) -> int:
        return max((slots[k] + _aligned(un.spans[k][1] - un.spans[k][0]) for k in slots), default=0)


class _Buffer:
    """Anonymous memory, as bytes to read into and as a uint8 tensor to view. MAP_POPULATE faults every page in with
    one call (256 MiB: 0.12 s of system time here, against 0.20 s for 65,536 separate first-touch faults; huge pages
    via madvise were not granted on this VM)."""

    def __init__(self, nbytes: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.mem = mmap.mmap(-1, max(nbytes, 1), flags=flags)
        self.bytes = memoryview(self.mem)
        self.tensor = torch.frombuffer(self.mem, dtype=torch.uint8)


class _Files:
    """Read-only file descriptors, opened on demand, each checked against the size its header was checked at."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def read_into(self, ckpt: Checkpoint, key: str, dst: memoryview) -> None:
        path = ckpt.folder / ckpt.weight_map[key]
        begin, end = ckpt.spans[key]
        try:
            fd = self._open(path, ckpt.sizes[ckpt.weight_map[key]])
            done = 0
            while done < end - begin:  # preadv may return less than asked (signals, > 2 GiB)
                n = os.preadv(fd, [dst[done:end - begin]], begin + done)
                if n == 0:
                    raise unreadable(path, f"ends inside tensor {key!r}: truncated since its header was checked")
                done += n
        except OSError as e:
            raise unreadable(path, e) from e

    def _open(self, path: Path, size: int) -> int:
        if path not in self.fds:
            fd = os.open(path, os.O_RDONLY)
            if os.fstat(fd).st_size != size:
                os.close(fd)
                raise unreadable(path, f"{os.stat(path).st_size} bytes, {size} when its header was checked")
            self.fds[path] = fd
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def torch_dtype(ckpt: Checkpoint, key: str) -> torch.dtype:
    name = ckpt.specs[key][0]
    dtype = getattr(torch, DTYPES.get(name, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise unreadable(ckpt.folder / ckpt.weight_map[key], f"tensor {key!r} has dtype {name}, not supported")
    return dtype


def _view(buf: _Buffer, offset: int, un: Checkpoint, key: str) -> torch.Tensor:
    nbytes = un.spans[key][1] - un.spans[key][0]
    return buf.tensor.narrow(0, offset, nbytes).view(torch_dtype(un, key)).view(un.specs[key][1])


@dataclass
class Shard:
    """A shard in flight: its plan, its buffers, and the (key, out, un) tensors the reader has finished so far."""

    index: int
    plan: ShardPlan
    out: _Buffer
    un: _Buffer | None
    arrived: queue.Queue = field(default_factory=queue.Queue)  # keys, then None after the last
    started: float = field(default_factory=time.perf_counter)
    moved: int = 0  # bytes read + written


Progress = Callable[[Shard, int, float], None]  # (shard, shards in all, seconds from its first read to written)


class ShardPipeline:
    """Iterate for the shards of theta_un in order; iterate each for (key, out, un) as its tensors are read.

    un is None for a tensor to copy (out already holds theta_un's bytes); otherwise out holds theta_ini's bytes, to
    be overwritten in place with the result. A shard goes to the writer when its tensors are exhausted. The first
    error of any stage stops the others and is raised, as it was, in the caller's thread.
    `overlap=False` runs the same stages one after the other in the caller's thread (the reference for tests).
    """

    def __init__(self, ini: Checkpoint, un: Checkpoint, plans: list[ShardPlan], dst: Path, overlap: bool = True,
                 progress: Progress | None = None) -> None:
        self.ini, self.un, self.plans, self.dst = ini, un, plans, dst
        self.overlap, self.progress = overlap, progress
        self.files = _Files()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.free_out, self.free_un, self.started, self.to_write = (queue.Queue() for _ in range(4))
        self.out_bytes = max(p.nbytes(un, p.out_slot) for p in plans)
        self.un_bytes = max(p.nbytes(un, p.un_slot) for p in plans)
        for _ in range(2 if overlap else 1):
            self.free_out.put(None)  # allocated by the reader when first needed, off the caller's thread
        self.free_un.put(None)
        self.threads = [threading.Thread(target=self._run, args=(stage,), name=f"uipe-{stage.__name__}", daemon=True)
                        for stage in (self._read_all, self._write_all)] if overlap else []

    def __enter__(self) -> ShardPipeline:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.stop.set()  # after success the threads are done already; after a failure this frees them
        for t in self.threads:
            t.join()  # before the caller removes the output folder: no thread writes into it any more
        self.files.close()
        if self.errors and (exc is None or isinstance(exc, _Stopped)):
            raise self.errors[0] from None

    def __iter__(self) -> Iterator[Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]]:
        for i, plan in enumerate(self.plans):
            if self.overlap:
                shard = self._get(self.started)
            else:
                self._read(shard := self._start(i, plan))
            tensors = self._tensors(shard)
            yield tensors
            for _ in tensors:  # whatever the caller left: the shard must be complete before it is written
                pass
            if shard.un is not None:
                self.free_un.put(shard.un)
            if self.overlap:
                self.to_write.put(shard)
            else:
                self._write(shard)
        if self.overlap:
            self.to_write.put(None)
            self.threads[-1].join()  # a writer's error is raised on leaving the with block

    def _tensors(self, shard: Shard) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        plan = shard.plan
        while (key := self._get(shard.arrived)) is not None:
            un = _view(shard.un, plan.un_slot[key], self.un, key) if key in plan.un_slot else None
            yield key, _view(shard.out, plan.out_slot[key], self.un, key), un

    def _get(self, q: queue.Queue):  # noqa: ANN202 (whatever the queue holds)
        """q.get, given up when another stage has failed."""
        while True:
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

    def _run(self, stage: Callable[[], None]) -> None:
        try:
            stage()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread, raised there)
            self.errors.append(e)
            self.stop.set()

    def _read_all(self) -> None:
        for i, plan in enumerate(self.plans):
            shard = self._start(i, plan)
            self.started.put(shard)
            self._read(shard)

    def _start(self, i: int, plan: ShardPlan) -> Shard:
        """Buffers for shard i: the out buffer frees when shard i-2 is written, the un buffer when i-1 is computed."""
        out = self._get(self.free_out) or _Buffer(self.out_bytes)
        return Shard(i, plan, out, (self._get(self.free_un) or _Buffer(self.un_bytes)) if plan.un_slot else None)

    def _read(self, shard: Shard) -> None:
        plan = shard.plan
        for key in plan.keys:
            n = self.un.spans[key][1] - self.un.spans[key][0]
            out = shard.out.bytes[plan.out_slot[key]:][:n]
            if key in plan.un_slot:
                self.files.read_into(self.ini, key, out)
                self.files.read_into(self.un, key, shard.un.bytes[plan.un_slot[key]:][:n])
            else:
                self.files.read_into(self.un, key, out)
            shard.moved += (3 if key in plan.un_slot else 2) * n
            shard.arrived.put(key)
        shard.arrived.put(None)

    def _write_all(self) -> None:
        while (shard := self._get(self.to_write)) is not None:
            self._write(shard)

    def _write(self, shard: Shard) -> None:
        from safetensors.torch import save_file

        plan = shard.plan
        tensors = {k: _view(shard.out, plan.out_slot[k], self.un, k) for k in plan.keys}
        save_file(tensors, self.dst / plan.name, metadata=self.un.metadata[plan.name])
        del tensors
        self.free_out.put(shard.out)
        if self.progress:
            self.progress(shard, len(self.plans), time.perf_counter() - shard.started)
