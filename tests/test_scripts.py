"""The development scripts' own arithmetic and arguments (scripts/suite_profile.py, bench_search_stage.py)."""

from __future__ import annotations

import json
import re
import sys
import tempfile

import pytest

from conftest import script_module


def test_the_suite_profile_sums_wall_and_idle_seconds_per_file(tmp_path) -> None:
    profile = script_module("suite_profile")
    rows = [{"test": "tests/a.py::t1", "phase": "setup", "wall": 10.0, "idle": 0.5},
            {"test": "tests/a.py::t1", "phase": "call", "wall": 2.0, "idle": 0.0},
            {"test": "tests/b.py::t2", "phase": "call", "wall": 20.0, "idle": 0.1}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert profile.load(path) == rows
    # b: 20 s wall, 20 x 0.1 = 2 s idle; a: 10 + 2 = 12 s wall, 10 x 0.5 + 2 x 0 = 5 s idle
    [(b, b_wall, b_idle), (a, a_wall, a_idle)] = profile.by_file(rows)
    assert (b, a) == ("tests/b.py", "tests/a.py")
    assert (b_wall, b_idle, a_wall, a_idle) == pytest.approx((20.0, 2.0, 12.0, 5.0))


@pytest.mark.parametrize("args, words", [
    ([], "--baseline or --vary"),
    (["--baseline", "{tmp}", "--vary", "eval.max_new_tokens=200"], "--baseline or --vary"),
    (["--baseline", "{tmp}"], "no uipe package in it"),
])
def test_the_search_stage_bench_compares_against_one_thing_and_says_what_is_missing(tmp_path, monkeypatch, args,
                                                                                     words) -> None:
    bench = script_module("bench_search_stage")
    argv = ["bench_search_stage.py", "--world", str(tmp_path), *[a.format(tmp=tmp_path) for a in args]]
    monkeypatch.setattr(sys, "argv", argv)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where its work folder would go
    with pytest.raises(SystemExit, match=re.escape(words)):
        bench.main()
    assert not list((tmp_path / "tmp").iterdir())  # refused before any work folder was made
