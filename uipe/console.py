"""What a person sees: stage headers, one live progress display per fit and per search, warnings, the result.

Everything else (Ray's forwarded worker output, its C++ core logs, Tune's status boxes, transformers' bars) goes to a
log file in the run folder: `quiet(log_file)` points file descriptors 1 and 2 at the log, so even output written
below Python lands there, and this module keeps a handle on the real terminal. `--verbose` (or UIPE_VERBOSE=1) leaves
the descriptors alone and shows all of it, as before. A command's `--json` (`quiet(..., data=True)`) keeps standard
output for the JSON alone (`data(text)`): uipe's own lines, progress included, then go to standard error.

On a terminal the progress is a rich display that redraws in place; in a file (CI, `| tee`) it is plain lines, a few
per task (at each third of the work and at least every PLAIN_EVERY_S seconds), never cursor codes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from uipe.errors import UipeError
from uipe.io import is_disk_full

PLAIN_EVERY_S = 300.0
WIDTH = 150  # tables stay readable in logs and CI output


class _Terminal:
    """The one console of the process; re-pointed at the saved terminal while output is quiet."""

    def __init__(self) -> None:
        self.console = Console(highlight=False, width=WIDTH)
        self.errors: IO[str] | None = None  # the terminal's stderr while output is quiet; else sys.stderr
        self.data: IO[str] | None = None  # where `data` writes (the terminal's stdout) in --json mode; else sys.stdout
        self.log_file: Path | None = None
        self.live: bool = False
        self._progress: Progress | None = None
        self._open_tasks = 0
        self._lock = threading.Lock()

    def point_at(self, out: IO[str], err: IO[str], log_file: Path | None) -> None:
        self.live = out.isatty()
        self.console = Console(file=out, highlight=False, width=None if self.live else WIDTH,
                               force_terminal=self.live, no_color=not self.live)
        self.errors, self.log_file = err, log_file

    def progress(self) -> Progress:
        with self._lock:
            if self._progress is None:
                self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[text]}"), console=self.console,
                                          redirect_stdout=False, redirect_stderr=False)
                self._progress.start()
            self._open_tasks += 1
            return self._progress

    def task_done(self) -> None:
        with self._lock:
            self._open_tasks -= 1
            if self._open_tasks == 0 and self._progress is not None:
                self._progress.stop()
                self._progress = None


TERMINAL = _Terminal()


def say(text: str) -> None:
    TERMINAL.console.print(text, markup=False, highlight=False, soft_wrap=True)


def data(text: str) -> None:
    """Output for scripts (a command's --json): on standard output, with nothing of uipe's own beside it."""
    print(text, file=TERMINAL.data or sys.stdout, flush=True)


def error(text: str) -> None:
    """The one line a failed command leaves on the console."""
    print(text, file=TERMINAL.errors or sys.stderr, flush=True)


def stage(name: str) -> None:
    TERMINAL.console.print(f"[bold cyan]== {name}[/]")


def warn(text: str) -> None:
    """A warning that concerns the user: on the console (and in the log)."""
    TERMINAL.console.print(f"[yellow]warning:[/] {text}")
    if TERMINAL.log_file is not None:
        print(f"uipe warning: {text}", file=sys.stderr, flush=True)


def show_table(table: object) -> None:
    TERMINAL.console.print(table)


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("UIPE_VERBOSE", "") not in ("", "0", "false")


def eta(elapsed: float, done: float, total: float) -> str:
    if done <= 0:
        return "ETA ?"
    return f"ETA {elapsed / done * max(0.0, total - done):.0f}s"


class Task:
    """One live progress display: `update(done, text)` as work advances, `finish(text)` once."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.start = label, max(1, total), time.monotonic()
        self.last_line, self.next_third = self.start, 1
        self._progress = TERMINAL.progress() if TERMINAL.live else None
        self._id = self._progress.add_task(f"[{label}]", total=self.total, text="") if self._progress else None

    def update(self, done: int, text: str, eta_s: float | None = None) -> None:
        """`eta_s`: the caller's estimate (a resumed fit knows its s/epoch better than the elapsed time does)."""
        elapsed = time.monotonic() - self.start
        line = f"{text} | {elapsed:.0f}s, " + (eta(elapsed, done, self.total) if eta_s is None else f"ETA {eta_s:.0f}s")
        if self._progress is not None:
            self._progress.update(self._id, completed=done, text=line)
            return
        crossed = done * 3 >= self.next_third * self.total  # a third of the work (the last one: done)
        if crossed or self.start + elapsed - self.last_line >= PLAIN_EVERY_S:
            while self.next_third <= 3 and done * 3 >= self.next_third * self.total:
                self.next_third += 1
            self.last_line = self.start + elapsed
            say(f"[{self.label}] {line}")

    def finish(self, text: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._id, completed=self.total, text=text)
            TERMINAL.task_done()
            self._progress = None
        elif text:
            say(f"[{self.label}] {text}")


class _Log:
    """The log file as the process's stdout and stderr. A write that fails (its disk full) drops the text and says so
    once on the terminal, instead of raising in whatever was printing: an error handler about to name the real
    failure, Ray's log forwarding, or the interpreter's last flush, which turns a failed flush into a silent exit 120.
    """

    def __init__(self, file: IO[str], terminal: IO[str]) -> None:
        self.file, self.terminal, self.lost = file, terminal, False

    def write(self, text: str) -> int:
        try:
            return self.file.write(text)
        except OSError as e:
            self._drop(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self._drop(e)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            self._drop(e)

    def _drop(self, e: OSError) -> None:
        if not self.lost:
            self.lost = True
            with contextlib.suppress(OSError):
                print(f"uipe warning: cannot write the log {self.file.name} ({e.strerror or e}); its output is "
                      "dropped from here on", file=self.terminal, flush=True)

    def __getattr__(self, name: str):  # fileno, isatty, encoding...: the file's own
        return getattr(self.file, name)


@contextlib.contextmanager
def quiet(log_file: Path, verbose: bool = False, until_exit: bool = False, data: bool = False) -> Iterator[None]:
    """Run the block with the process's output in `log_file` and only uipe's own lines on the console.

    An unexpected exception is written to the log with its traceback and re-raised as one line (exit 1) that says
    where the log is; a UipeError keeps its own line. `until_exit` (the CLI) leaves the output in the log after the
    block too: Ray forwards its workers' last lines asynchronously, up to its own shutdown at exit. `data` (--json):
    standard output holds only what `data()` writes; uipe's own lines go to standard error.
    """
    if verbose:
        if not data:
            yield
            return
        previous = (TERMINAL.console, TERMINAL.errors, TERMINAL.log_file, TERMINAL.live, TERMINAL.data)
        TERMINAL.point_at(sys.stderr, sys.stderr, None)
        TERMINAL.data = sys.stdout
        try:
            yield
        finally:  # nothing was redirected, so nothing of Ray's can arrive late: restore now
            TERMINAL.console, TERMINAL.errors, TERMINAL.log_file, TERMINAL.live, TERMINAL.data = previous
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    previous = (TERMINAL.console, TERMINAL.errors, TERMINAL.log_file, TERMINAL.live, TERMINAL.data)
    streams = sys.stdout, sys.stderr
    out = os.fdopen(saved_out, "w", buffering=1, encoding="utf-8")
    err = os.fdopen(saved_err, "w", buffering=1, encoding="utf-8")
    # closed when output is restored
    log = _Log(open(log_file, "a", buffering=1, encoding="utf-8"), err)  # noqa: SIM115
    os.dup2(log.fileno(), 1)  # below Python: C++ core logs, subprocesses
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log  # Python's own streams, even where something replaced them
    TERMINAL.point_at(err if data else out, err, log_file)
    TERMINAL.data = out if data else None
    say(f"log: {log_file}")
    try:
        yield
    except UipeError as e:
        print(f"uipe: error: {e}", file=log, flush=True)
        raise
    except KeyboardInterrupt:
        log.write(traceback.format_exc())
        raise Interrupted(log_file) from None
    except Exception as e:
        log.write(traceback.format_exc())
        if is_disk_full(e):  # where no atomic write named its file (a training worker's, say): bad input, exit 2
            raise UipeError(f"{_last_line(e)}: the disk is full (or a size limit was hit); free space and run the same "
                            f"command again (full traceback in {log_file}, where it could be written)") from None
        raise UnexpectedError(f"{_last_line(e)} (full traceback in {log_file})") from None
    finally:
        log.flush()
        if not until_exit:
            sys.stdout, sys.stderr = streams
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            TERMINAL.console, TERMINAL.errors, TERMINAL.log_file, TERMINAL.live, TERMINAL.data = previous
            out.close()
            err.close()
            log.close()


class UnexpectedError(UipeError):
    """A failure that is not bad input (a crashed fit, a lost worker): exit 1, the traceback in the log."""

    exit_code = 1


class Interrupted(UipeError):
    """Ctrl+C, or a SIGTERM (uipe.signals), outside a search's trials (there Tune stops them and the search says how
    far it got): exit 130, as a shell reports an interrupted command."""

    exit_code = 130

    def __init__(self, log_file: Path | None = None) -> None:
        where = f" (its log: {log_file})" if log_file else ""
        super().__init__(f"interrupted{where}; run the same command again to go on (a search by itself: with --resume)")


def _last_line(e: BaseException) -> str:
    """The innermost error of a (possibly multi-line, Ray-wrapped) exception message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()
