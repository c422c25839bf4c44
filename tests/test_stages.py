"""The one "skip work whose inputs match" rule (uipe/stages.py), on real folders and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uipe.errors import UipeError
from uipe.stages import META_FILE, cached_value, first_difference, recorded, reusable, reuse_or_build


def test_identity_comparison_by_hand() -> None:
    have = {"seed": 0, "lr": 0.001, "shape": [2, 3], "extra": "kept beside the identity"}
    assert first_difference(have, {"seed": 0, "shape": (2, 3)}) is None  # a tuple reads back as a list
    assert first_difference(have, {"seed": 1, "lr": 0.002}) == "lr"  # sorted: lr before seed
    assert reusable(have, {"seed": 0}, "f") and not reusable(None, {"seed": 0}, "f")
    assert not reusable(have, {"seed": 1}, "f")  # rebuild: cheap derived data
    with pytest.raises(UipeError, match=r"^f: trained on other data \(seed differs\); use a new run folder"):
        reusable(have, {"seed": 1}, "f", "trained on other data", "refuse")


def test_a_folder_is_built_once_reused_and_rebuilt_whole(tmp_path: Path) -> None:
    calls = []

    def build(value: str):
        def write(tmp: Path) -> None:
            calls.append(value)
            (tmp / "weights.txt").write_text(value)
            (tmp / META_FILE).write_text(json.dumps({"written_by_build": True}))
        return write

    folder = tmp_path / "model"
    reuse_or_build(folder, {"seed": 0}, build("a"))
    reuse_or_build(folder, {"seed": 0}, build("b"))  # same identity: reused, build not called
    assert calls == ["a"] and (folder / "weights.txt").read_text() == "a"
    assert recorded(folder / META_FILE) == {"written_by_build": True, "seed": 0}  # the build's record + identity
    reuse_or_build(folder, {"seed": 1}, build("c"))
    assert calls == ["a", "c"] and (folder / "weights.txt").read_text() == "c"

    def broken(tmp: Path) -> None:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        reuse_or_build(folder, {"seed": 2}, broken)
    assert (folder / "weights.txt").read_text() == "c"  # the last complete folder stands, no temp left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_cached_value_is_recomputed_only_when_its_inputs_change(tmp_path: Path) -> None:
    path, calls = tmp_path / "metrics.json", []

    def compute(x: float):
        return lambda: calls.append(x) or {"model_utility": x}

    assert cached_value(path, {"model": "h1"}, compute(0.5)) == {"model_utility": 0.5}
    assert cached_value(path, {"model": "h1"}, compute(0.7)) == {"model_utility": 0.5}
    assert cached_value(path, {"model": "h2"}, compute(0.7)) == {"model_utility": 0.7}
    assert calls == [0.5, 0.7]
    path.write_text("{not json")
    with pytest.raises(UipeError, match="metrics.json: not valid JSON"):
        cached_value(path, {"model": "h2"}, compute(0.9))


def test_atomic_files_get_open_s_mode_and_leave_nothing_when_the_write_fails(tmp_path: Path) -> None:
    import os

    from uipe.io import atomic_file, atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    out = atomic_write_text(tmp_path / "a" / "x.json", "{}\n")
    # mkstemp's private 0o600 would keep a results file from the rest of a team on shared storage
    assert out.read_text() == "{}\n" and out.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a" / "y.png") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer died")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]
