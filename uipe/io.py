"""Crash-safe file output and content hashes.

Everything uipe writes goes to a temporary sibling first and is renamed into place, so a crash never leaves a
file or folder that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uipe.errors import UipeError


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def is_disk_full(e: BaseException) -> bool:
    """No space left, a quota, or a file-size limit: from Python's I/O, from a Rust writer (safetensors), which
    reports the OS error only in its message, or from a Ray worker, whose error reaches the driver as text."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(e)
    return any(f"os error {n})" in text or f"code: {n}," in text or f"[Errno {n}]" in text for n in _DISK_FULL_ERRNOS)


def file_flaw(path: Path, pickled: bool = False) -> str:
    """'' if a saved-state file reads whole; else why not: empty, not JSON, or (`pickled`) a pickle without its
    closing STOP opcode. A pickle is never loaded here: whoever saved it loads it."""
    data = path.read_bytes()
    if not data:
        return "empty"
    if pickled:
        return "" if data.endswith(b".") else "a truncated pickle"
    try:
        json.loads(data)
    except ValueError as e:
        return f"not JSON ({e})"
    return ""


def move_aside(path: Path) -> Path:
    """Rename a file or folder whose saved state cannot be read to `<name>.unreadable-<time>` beside it (kept for a
    post-mortem, out of the way of the run that goes on); returns the new path."""
    import time

    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(path), aside)
    return aside


def disk_full_error(target: Path, e: BaseException) -> UipeError:
    return UipeError(f"{target}: the disk is full (or a size limit was hit) while writing it; nothing was kept and "
                     f"earlier results are intact: free space and run the same command again ({type(e).__name__})")


def _process_umask() -> int:
    mask = os.umask(0)  # read it the only way there is, once, at import (no other thread runs yet)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()  # what open() would give a new file; mkstemp's is 0o600


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` for the block to write; renamed to `path` (with open()'s mode) only if the
    block succeeds, else removed. A full disk becomes one line naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(final, e) from e
        raise


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.lock` file, flock) for the block; refuse at once if another process
    holds it. The kernel drops the lock when its process dies, so a crash never leaves a stale lock."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UipeError(f"{folder}: {what} is already running there ({holder}); wait for it, or use another "
                            "--run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    """One sha256 over (relative name, content) of each file, in sorted order: a data or model identity."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def hash_dir(folder: str | Path, pattern: str = "*") -> str:
    folder = Path(folder)
    return hash_files([p for p in folder.rglob(pattern) if p.is_file()], root=folder)


def code_version() -> str:
    """The package version plus the git commit when run from a checkout (for manifests and MLflow tags)."""
    from uipe import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return __version__
