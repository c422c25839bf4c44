"""What a person sees: uipe's own lines on the console, everything else in the run folder's log."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import run_uipe
from uipe.console import Task, UnexpectedError, _last_line, quiet, say


def test_quiet_sends_fd_level_output_to_the_log(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    log = tmp_path / "logs" / "x.log"
    with quiet(log):
        os.write(1, b"raw fd 1 line\n")  # as a C++ core log or a subprocess would
        os.write(2, b"raw fd 2 line\n")
        print("a python print")
        say("uipe line")
    out, err = capfd.readouterr()
    assert out.splitlines() == [f"log: {log}", "uipe line"]
    assert err == ""
    text = log.read_text()
    assert "raw fd 1 line" in text and "raw fd 2 line" in text and "a python print" in text
    assert "uipe line" not in text
    print("after")  # the descriptors are restored
    assert capfd.readouterr().out == "after\n"


def test_quiet_turns_a_crash_into_one_line_and_keeps_the_traceback(tmp_path: Path) -> None:
    log = tmp_path / "x.log"

    def deep() -> None:
        raise RuntimeError("Training failed:\n  worker traceback ...\nRuntimeError: injected fault")

    with pytest.raises(UnexpectedError) as err:
        with quiet(log):
            deep()
    assert str(err.value) == f"RuntimeError: RuntimeError: injected fault (full traceback in {log})"
    assert err.value.exit_code == 1
    assert "Traceback (most recent call last)" in log.read_text() and "in deep" in log.read_text()
    assert _last_line(ValueError("")) == "ValueError:"


def test_plain_progress_prints_a_line_per_third(capsys: pytest.CaptureFixture) -> None:
    task = Task("fit", 9)
    for done in range(1, 10):
        task.update(done, f"epoch {done}/9")
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["[fit] epoch 3/9", "[fit] epoch 6/9", "[fit] epoch 9/9"]
    assert all(re.search(r"\| \d+s, ETA \d+s$", ln) for ln in lines)


# ---- the real thing: `uipe run` as a user runs it, output to a file (conftest.served_run) -------------------------
RAY_INTERNALS = ("pid=", "RayTrainWorker", "PlacementGroupCleaner", "PreemptionWatcher", "core_worker", "Tune",
                 "tensorboard", "Checkpoint successfully", "Loading weights", "Writing model shards")


@pytest.mark.ray
@pytest.mark.slow
def test_uipe_run_console_is_short_and_shows_stages_progress_and_table(served_run: dict) -> None:
    """The console holds the stages, progress for the fit and the search, the table; Ray's own output is in the run
    folder's log."""
    lines = served_run["lines"]
    assert served_run["rc"] == 0, "\n".join(lines[-20:])
    assert len(lines) <= 60, "\n".join(lines)
    assert not [ln for ln in lines if any(s in ln for s in RAY_INTERNALS)], "\n".join(lines)
    assert not [ln for ln in lines if "\x1b[" in ln]  # no cursor or colour codes in a file
    for header in ("== data", "== prepare", "== retain reference", "== unlearn graddiff", "== search graddiff"):
        assert any(ln.startswith(header) for ln in lines), header
    assert any(ln.startswith("prepare gate passed: target: ROUGE-L") for ln in lines)
    assert any(re.match(r"\[graddiff\] epoch 2/2 step \d+/\d+ loss .* s/epoch \| \d+s, ETA 0s", ln) for ln in lines)
    assert any(re.match(r"\[search graddiff\] trial \d+/\d+ \| best feasible FQ", ln) for ln in lines)
    assert any("UIPE on tiny" in ln for ln in lines) and any(ln.lstrip("│| ").startswith("graddiff") for ln in lines)
    log = Path(lines[0].removeprefix("log: "))
    assert log.parent == served_run["paths"].root / "logs"
    text = log.read_text()
    assert "RayTrainWorker" in text  # Ray's worker output is kept, in the log
    # the cause, not a filter: Ray Train V2's PlacementGroupCleaner needs the State API (the dashboard)
    assert "Failed to query Ray Train Controller actor state" not in text


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_fit_is_one_line_on_the_console_and_a_traceback_in_the_log(unlearned_run, ray_session,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    marker = tmp_path / "fault-marker"
    rc = run_uipe(["unlearn", "--method", "kl", "--run-dir", str(unlearned_run.root), "--set", "unlearn.epochs=2",
                   "--set", "train.max_failures=0"], ray_session, out,
                  {"UIPE_TEST_FAULT": f"epoch=1,rank=0,marker={marker}"})
    lines = out.read_text().splitlines()
    assert rc == 1, lines
    errors = [ln for ln in lines if ln.startswith("uipe: error:")]
    assert len(errors) == 1 and "injected test fault in epoch 1 on rank 0" in errors[0], lines
    assert not [ln for ln in lines if any(s in ln for s in RAY_INTERNALS)], lines
    log = Path(lines[0].removeprefix("log: "))
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "injected test fault in epoch 1 on rank 0" in text
