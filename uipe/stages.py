"""Identity in, output out: the one rule by which every stage skips work whose inputs have not changed.

A stage's output (a model folder, the benchmark, a cached evaluation, a search) carries a record of the inputs it was
made from: a JSON object whose keys include the stage's identity. On the next run the stage compares:
- the same identity: reuse the output, do no work;
- no record: build (into a temporary path, renamed when complete: uipe.io);
- another identity: rebuild it when it is cheap derived data (`on_change="rebuild"`), or refuse with one line naming
  the output and the first input that differs when it is an expensive result someone must delete on purpose
  (`on_change="refuse"`: trained models, unlearning runs, searches).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from uipe.errors import UipeError
from uipe.io import atomic_dir, atomic_write_json

META_FILE = "uipe_meta.json"  # the record in every model folder uipe writes
OnChange = Literal["rebuild", "refuse"]


def recorded(record: Path) -> dict[str, Any] | None:
    """The record at `record`, or None when there is none (a record that is not JSON is an error, not a miss)."""
    if not record.is_file():
        return None
    try:
        value = json.loads(record.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UipeError(f"{record}: not valid JSON ({e}); delete it to rebuild") from None
    if not isinstance(value, dict):
        raise UipeError(f"{record}: expected a JSON object; delete it to rebuild")
    return value


def first_difference(have: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """The first identity key (sorted) whose recorded value differs, or None when every key matches."""
    for key in sorted(want):
        if _plain(have.get(key)) != _plain(want[key]):
            return key
    return None


def reusable(have: Mapping[str, Any] | None, want: Mapping[str, Any], where: str | Path, what: str = "",
             on_change: OnChange = "rebuild") -> bool:
    """True: `where` was made from `want` (reuse it). False: nothing there, or another identity to rebuild.
    UipeError: another identity with on_change="refuse", saying `where`, `what` (how it differs, in words) and the
    first identity key that differs."""
    if have is None:
        return False
    key = first_difference(have, want)
    if key is None:
        return True
    if on_change == "rebuild":
        return False
    raise UipeError(f"{where}: {what} ({key} differs); use a new run folder or delete it")


def reuse_or_build(folder: Path, want: Mapping[str, Any], build: Callable[[Path], object],
                   record: str = META_FILE) -> Path:
    """`folder` if its record names `want`; else `build(tmp)` fills a temporary folder, `want` is merged into its
    record, and the folder replaces `folder` whole."""
    if reusable(recorded(folder / record), want, folder):
        return folder
    with atomic_dir(folder, overwrite=True) as tmp:
        build(tmp)
        atomic_write_json(tmp / record, {**(recorded(tmp / record) or {}), **_plain(want)})
    return folder


def cached_value(path: Path, want: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
    """A computed JSON value stored as {"identity": want, "value": ...}: reused while the identity matches."""
    have = recorded(path)
    if reusable(have.get("identity") if have else None, want, path):
        return have["value"]  # type: ignore[index]
    value = compute()
    atomic_write_json(path, {"identity": _plain(want), "value": value})
    return value


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists, pydantic models as dicts), so a record read back compares equal."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.loads(json.dumps(value, sort_keys=True, default=str))
