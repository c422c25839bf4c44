"""Tune's saved state of a search, checked whole before a resume, and a restore that fails instead of starting over.

Tune keeps a search's state in `<search>/tune/` as one set of files per driver session: experiment_state-<s>.json
(the trials), searcher-state-<s>.pkl (the Optuna study), search_gen_state-<s>.json and callback-states-<s>.pkl. A
background thread copies them there from Ray's session folder after every step, in place. A copy cut short (the disk
full, the driver killed mid-copy) leaves a truncated file, and Tune's restore of it fails, logs "Failed to restore the
run state" and *restarts the experiment* in the same folder: measured with scripts/chaos.py (disk-full), a zero-byte
experiment state made the resumed search end after 1 trial of 8, every later resume too. So before a resume uipe
sets aside the newest sessions whose files are not whole (Tune then restores the one before: the trials it lacks run
again, and outcome.finish replaces their MLflow runs), starts anew where no session is whole, and turns any restore
failure Tune would swallow into an error.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from uipe.errors import UipeError
from uipe.io import file_flaw, move_aside

# Tune writes the experiment state as JSON and pickles the rest (search_gen_state's ".json" included)
TEMPLATES = ("experiment_state-{}.json", "searcher-state-{}.pkl", "search_gen_state-{}.json", "callback-states-{}.pkl")
SET_ASIDE = "unreadable-state"  # where a session's unreadable files go, inside the tune folder
_PARTS = [t.split("{}") for t in TEMPLATES]  # (prefix, suffix) of each: the session name sits between
_SESSION = re.compile("^(?:" + "|".join(re.escape(a) for a, _ in _PARTS) + ")(.+)(?:"
                      + "|".join(sorted({re.escape(b) for _, b in _PARTS})) + ")$")
RESTORE_FAILED = "Failed to restore the run state."  # Tune's own words (ray/tune/execution/tune_controller.py)


def flaw(path: Path) -> str:
    """'' if one of Tune's state files reads whole; else why not (uipe.io.file_flaw: its pickles by their STOP
    opcode, never loaded here; Tune's restore loads them)."""
    return file_flaw(path, pickled=not path.name.startswith(_PARTS[0][0]))


def sessions(tune_dir: Path) -> list[str]:
    """The driver sessions that left state in `tune_dir`, oldest first (Tune's session names sort by time)."""
    found = {m.group(1) for p in tune_dir.iterdir() if p.is_file() and (m := _SESSION.match(p.name))}
    return sorted(found)


def set_aside_unreadable(tune_dir: Path) -> list[str]:
    """Move the files of the newest sessions that are not whole into `tune/unreadable-state/`, until the newest left
    is whole (Tune restores the newest file of each kind, so a whole older session must not sit behind a newer broken
    one). Returns what was set aside and why, one line each; the session files left then restore as a set."""
    moved = []
    for session in reversed(sessions(tune_dir)):
        files = [tune_dir / t.format(session) for t in TEMPLATES if (tune_dir / t.format(session)).is_file()]
        flaws = [(f, flaw(f)) for f in files]
        bad = [f"{f.name}: {why}" for f, why in flaws if why]
        if not bad and (tune_dir / TEMPLATES[0].format(session)).is_file():
            break
        aside = tune_dir / SET_ASIDE
        aside.mkdir(exist_ok=True)
        for f in files:
            shutil.move(str(f), aside / f.name)
        moved += bad or [f"session {session}: no experiment state"]
    return moved


def restorable(tune_dir: Path) -> bool:
    return tune_dir.is_dir() and any((tune_dir / TEMPLATES[0].format(s)).is_file() for s in sessions(tune_dir))


def prepare_resume(tune_dir: Path, label: str) -> None:
    """Before Tune restores `tune_dir`: its unreadable newest sessions set aside, or, where no session is whole, the
    folder itself (moved beside it: kept for a post-mortem) so that the trials start anew; each said on the console."""
    from uipe.console import warn

    for line in set_aside_unreadable(tune_dir):
        warn(f"{label}: Tune's saved state {line}: set aside in {tune_dir / SET_ASIDE}; the trials only it held run "
             "again")
    if not restorable(tune_dir):
        aside = move_aside(tune_dir)
        warn(f"{label}: no whole saved state of Tune's (moved to {aside}): the trials start anew; the MLflow parent "
             "run is kept and its trial runs are replaced when the search finishes")


class _RaiseOnRestoreFailure(logging.Handler):
    def __init__(self, tune_dir: Path) -> None:
        super().__init__(logging.ERROR)
        self.tune_dir = tune_dir

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == RESTORE_FAILED:
            cause = record.exc_info[1] if record.exc_info else None
            raise UipeError(f"{self.tune_dir}: Tune could not restore the search's saved state "
                            f"({type(cause).__name__}: {cause}); move that folder away to run its trials anew")


@contextlib.contextmanager
def restore_or_fail(tune_dir: Path) -> Iterator[None]:
    """While a Tuner runs: Tune's "Failed to restore the run state" raises (inside Tune's handler of the failure,
    before it would restart the experiment in the same folder) instead of starting over."""
    log = logging.getLogger("ray.tune.execution.tune_controller")
    guard = _RaiseOnRestoreFailure(tune_dir)
    log.addHandler(guard)
    try:
        yield
    finally:
        log.removeHandler(guard)
