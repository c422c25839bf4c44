"""The development scripts' own arithmetic and arguments (suite_profile.py, process_cpu.py, bench_search_stage.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

import pytest

from conftest import REPO, script_module


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


def test_process_cpu_sorts_processes_by_kind_and_sums_their_cpu_seconds() -> None:
    cpu = script_module("process_cpu")
    assert cpu.kind("ray::TrainContr", "ray::TrainController.run") == "Ray Train: controller"
    assert cpu.kind("raylet", "/x/ray/core/src/ray/raylet/raylet --foo").startswith("Ray's daemons")
    assert cpu.kind("python3", "python -u /x/ray/_private/log_monitor.py").startswith("Ray's daemons")
    assert cpu.kind("ray::Whatever", "") == "other Ray workers"
    assert cpu.kind("mlflow", "/x/bin/mlflow server --port 5000") == "MLflow servers"
    assert cpu.kind("python", "python -m pytest") == "the command and its children"
    seen = {"1:10": ["ray::TrialWorker", "", 4.0, False], "2:11": ["ray::TrialWorker", "", 6.5, False],
            "3:12": ["python", "pytest", 2.0, False], "4:1": ["postgres", "postgres", 9.0, True]}
    # two trial processes: 4.0 + 6.5 = 10.5 s; the one that ran before the command is a row of its own
    assert cpu.table(seen) == [("trial process (uipe TrialWorker)", 2, 10.5),
                               (cpu.BEFORE, 1, 9.0),
                               ("the command and its children", 1, 2.0)]
    assert "12.5         the command's processes" in cpu.report(seen, None)  # 10.5 + 2.0, not the 9.0


def test_process_cpu_counts_a_commands_own_cpu_time(tmp_path) -> None:
    # a child that spins for ~1.5 s of CPU: its time is the command's, within the one-second sampling
    out = tmp_path / "cpu.json"
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "process_cpu.py"), "--out", str(out), "--",
                           sys.executable, "-c", spin], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    mine = [row for row in doc["processes"].values() if not row[3] and "process_time" in row[1]]
    assert len(mine) == 1 and 0.4 <= mine[0][2] <= 2.0  # at least a sample in; no more than it spent (+ start-up)
    assert "the command and its children" in proc.stderr and not list(tmp_path.glob(".*.tmp"))
