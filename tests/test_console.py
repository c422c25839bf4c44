"""What a person sees: uipe's own lines on the console, everything else in the run folder's log."""

from __future__ import annotations

import io
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


def test_a_full_disk_in_a_worker_is_said_as_a_full_disk_with_exit_2(tmp_path: Path) -> None:
    """A training worker's ENOSPC reaches the driver as text inside Ray's error (seen in a chaos run: `uipe: error:
    WorkerGroupError: OSError: [Errno 28] No space left on device`, exit 1): it is said as what to do, exit 2."""
    from uipe.errors import UipeError

    with pytest.raises(UipeError) as err:
        with quiet(tmp_path / "x.log"):
            raise RuntimeError("Training failed:\n  worker 1 ...\nOSError: [Errno 28] No space left on device")
    assert err.value.exit_code == 2 and "the disk is full" in str(err.value) and "free space" in str(err.value)
    with pytest.raises(UnexpectedError):  # any other failure stays unexpected, exit 1
        with quiet(tmp_path / "x.log"):
            raise RuntimeError("OSError: [Errno 13] Permission denied")


def test_a_log_on_a_full_disk_still_lets_the_error_reach_the_terminal_with_its_exit_code(tmp_path: Path) -> None:
    """The run folder's disk filled up: every write to the log fails (/dev/full answers ENOSPC). Before, the error
    handler's own write to the log raised, and the interpreter's last flush made it a silent exit 120."""
    import subprocess
    import sys

    script = ("import sys\nfrom pathlib import Path\nfrom uipe.console import quiet, error\n"
              "from uipe.errors import UipeError\n"
              "try:\n"
              "    with quiet(Path('/dev/full'), until_exit=True):\n"
              "        print('Ray forwarding a worker line')\n"
              "        raise UipeError('search ga: no space left writing results.csv')\n"
              "except UipeError as e:\n"
              "    error(f'uipe: error: {e}')\n"
              "    sys.exit(e.exit_code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert lines[-1] == "uipe: error: search ga: no space left writing results.csv"
    assert sum("cannot write the log /dev/full" in ln for ln in lines) == 1  # said once, not per line


def test_an_interrupt_in_a_stage_is_one_line_with_exit_130_and_the_traceback_in_the_log(tmp_path: Path) -> None:
    from uipe.console import Interrupted

    log = tmp_path / "x.log"
    with pytest.raises(Interrupted) as err:
        with quiet(log):
            raise KeyboardInterrupt  # Ctrl+C, or a SIGTERM outside a fit (uipe.signals)
    assert err.value.exit_code == 130 and str(err.value).startswith(f"interrupted (its log: {log}); run the same")
    assert "KeyboardInterrupt" in log.read_text()


def test_plain_progress_prints_a_line_per_third(capsys: pytest.CaptureFixture) -> None:
    task = Task("fit", 9)
    for done in range(1, 10):
        task.update(done, f"epoch {done}/9")
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["[fit] epoch 3/9", "[fit] epoch 6/9", "[fit] epoch 9/9"]
    assert all(re.search(r"\| \d+s, ETA \d+s$", ln) for ln in lines)


# ---- the tables every command shows (uipe/tables.py), from summaries built by hand: no Ray --------------------------
def _render(table: object) -> str:
    from rich.console import Console

    console = Console(record=True, width=220, file=io.StringIO(), no_color=True)
    console.print(table)
    return console.export_text()


def _lines(text: str, first_cell: str) -> list[list[str]]:
    """The cells of each table row whose first cell is `first_cell`."""
    rows = [[c.strip() for c in re.split("[│┃]", ln.strip().strip("│┃"))] for ln in text.splitlines()]
    return [r for r in rows if r and r[0] == first_cell]


def _point(alpha: float, epoch: int, objective: float, utility: float, **metrics: float | None) -> dict:
    return {"alpha": alpha, "epoch": epoch, "feasible": True, "objective": objective, "utility": utility, **metrics}


def _reference_free(method: str = "ga", signal: str = "holdout_ks", named: bool = True) -> dict:
    """A search's summary (as result.json holds it) on a run without a retain model: no forget quality anywhere.
    `named`: the signal is a headline metric, so each point also carries it by name."""
    def point(alpha: float, epoch: int, obj: float, mu: float) -> dict:
        by_name = {signal: obj} if named else {}
        return _point(alpha, epoch, obj, mu, model_utility=mu, forget_quality=None, forget_prob=0.25,
                      related_prob=0.5, related_rougeL=0.625, related_forget_quality=None, **by_name)

    floors = {"0.95": {"base": point(0.0, 2, 0.125, 0.59), "uipe": point(0.5, 2, 0.375, 0.58)},
              "0.9": {"base": point(0.0, 3, 0.1875, 0.56), "uipe": point(1.5, 3, 0.4375, 0.55)},
              "0.85": {"base": None, "uipe": point(2.0, 3, 0.5625, 0.52)}}
    return {"method": method, "objective": signal, "utility_metric": "model_utility",
            "base": point(0.0, 3, 0.1875, 0.56), "chosen": point(0.5, 2, 0.375, 0.58), "floors": floors,
            "theta_ini": {"model_utility": 0.62}, "utility_threshold": 0.589, "feasible": True, "trials": 12}


def _with_forget_quality(method: str = "npo") -> dict:
    """A search's summary with a retain model: the objective is forget quality."""
    def point(alpha: float, epoch: int, fq: float, mu: float) -> dict:
        return _point(alpha, epoch, fq, mu, forget_quality=fq, model_utility=mu, forget_prob=0.25, related_prob=0.5,
                      related_rougeL=0.625, related_forget_quality=0.03125, holdout_ks=0.0625)

    return {"method": method, "objective": "forget_quality", "utility_metric": "model_utility",
            "base": point(0.0, 3, 0.0078125, 0.56), "chosen": point(1.0, 3, 0.09375, 0.57),
            "floors": {"0.95": {"base": point(0.0, 2, 0.00390625, 0.6), "uipe": point(0.5, 2, 0.046875, 0.59)}}}


CONTEXT = ("forget_quality", "forget_prob", "related_prob", "related_rougeL", "related_forget_quality")


def test_the_floors_table_of_a_reference_free_search_shows_its_objective() -> None:
    import uipe.benchmarks  # noqa: F401 - the catalogue's TOFU entries
    from uipe.tables import floors_table

    text = _render(floors_table([_reference_free()]))
    assert "base holdout KS" in text and "UIPE holdout KS" in text and "base MU" in text, text
    assert "FQ" not in text, text  # forget quality was neither the objective nor measured
    rows = {r[1]: r for r in _lines(text, "ga")}
    assert set(rows) == {"0.95", "0.9", "0.85"}, text
    #        method floor  base epoch, holdout KS, MU   UIPE alpha, epoch, holdout KS, MU
    assert rows["0.95"] == ["ga", "0.95", "2", "0.125", "0.590", "0.500", "2", "0.375", "0.580"], text
    assert rows["0.9"] == ["ga", "0.9", "3", "0.188", "0.560", "1.500", "3", "0.438", "0.550"], text
    assert rows["0.85"] == ["ga", "0.85", "-", "-", "-", "2.000", "3", "0.562", "0.520"], text  # no base point there


def test_a_signal_outside_the_headline_is_read_from_the_objective_entry() -> None:
    import uipe.benchmarks  # noqa: F401
    from uipe.tables import floors_table, results_table

    summary = _reference_free(signal="mia_loss_closeness", named=False)
    floors = _render(floors_table([summary]))
    assert "base MIA loss closeness" in floors and "UIPE MIA loss closeness" in floors, floors
    assert _lines(floors, "ga")[0][3] == "0.125", floors
    results = _render(results_table([summary], "tiny (forget05)", CONTEXT))
    assert "MIA loss closeness" in results and "objective: MIA loss closeness" in results, results
    assert [r[4] for r in _lines(results, "ga")] == ["0.188", "0.375"], results


def test_a_minimised_objective_is_shown_as_measured_not_as_the_search_negated_it() -> None:
    from uipe import metrics
    from uipe.tables import floors_table

    metrics.register(metrics.Metric("toy_leak", "a toy leak to minimise", "toy leak", direction="min", objective=True))
    try:
        point = _point(0.5, 2, -0.25, 0.6)  # the search maximised -toy_leak
        summary = {"method": "ga", "objective": "toy_leak", "utility_metric": "model_utility",
                   "floors": {"0.95": {"base": None, "uipe": point}}}
        rows = _lines(_render(floors_table([summary])), "ga")
        assert rows[0][-2:] == ["0.250", "0.600"], rows
    finally:
        metrics.unregister("toy_leak")


def test_the_results_table_names_each_objective_and_keeps_the_related_columns_the_data_has() -> None:
    import uipe.benchmarks  # noqa: F401
    from uipe.tables import floors_table, results_table

    summaries = [_with_forget_quality("npo"), _reference_free("ga")]
    text = _render(results_table(summaries, "tiny (forget05)", CONTEXT))
    assert _lines(text, "method") == [["method", "model", "alpha", "epoch", "FQ", "holdout KS", "MU", "forget prob",
                                       "related prob", "related ROUGE-L", "related FQ"]], text
    npo, ga = _lines(text, "npo"), _lines(text, "ga")
    assert [r[1] for r in npo] == ["base", "UIPE"] and [r[4:7] for r in npo][1] == ["0.094", "0.062", "0.570"], text
    assert [r[4:7] for r in ga] == [["-", "0.188", "0.560"], ["-", "0.375", "0.580"]], text  # no FQ without retain
    assert [r[-1] for r in ga] == ["-", "-"] and [r[-1] for r in npo] == ["0.031", "0.031"], text
    only_ga = _render(results_table([_reference_free("ga")], "tiny (forget05)", CONTEXT))
    assert "related FQ" not in only_ga and "related ROUGE-L" in only_ga, only_ga  # a column only where data is
    floors = _render(floors_table(summaries))
    assert "base FQ" in floors and "base holdout KS" in floors, floors  # a column per objective


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from typer.testing import CliRunner

    from uipe.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UIPE_VERBOSE", "1")  # no descriptor redirection inside the test process
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_the_search_command_shows_the_methods_rows_not_its_json(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    import json

    import uipe.search.driver

    from uipe.results import SearchOutcome

    summary = SearchOutcome(**_reference_free("ga"), failed=0, pareto_front=[], search_seconds=1.0,
                            trial_work_seconds=1.0, fidelity={}, tune_overhead=None, max_concurrent_trials=2,
                            parent_run_id="p").to_json()
    outcome = SearchOutcome.from_json(summary, "test")
    monkeypatch.setattr(uipe.search.driver, "run_search", lambda *a, **k: outcome)
    args = ["search", "--method", "ga", "--run-dir", str(tmp_path / "run")]
    shown = _cli(args, monkeypatch, tmp_path)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "UIPE on tiny" in out and "Best point at each utility floor" in out, out
    assert [r[1] for r in _lines(out, "ga")] == ["base", "UIPE", "0.95", "0.9", "0.85"], out
    assert "base holdout KS" in out and '"floors"' not in out, out
    assert f"summary: {tmp_path / 'run' / 'search' / 'ga' / 'result.json'}" in out, out
    scripted = _cli(args + ["--json"], monkeypatch, tmp_path)
    assert scripted.exit_code == 0 and json.loads(scripted.stdout) == summary, scripted.output


def test_the_evaluate_command_shows_a_table_and_prints_json_only_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    import json

    import uipe.evaluation

    result = {"forget_quality": 0.25, "model_utility": 0.5, "forget_prob": 0.125, "retain_prob": 0.75,
              "fidelity": "full", "per_item": {"forget": {"answer_nll": [1.0, 2.0]}}}
    monkeypatch.setattr(uipe.evaluation, "evaluate_model", lambda *a, **k: result)
    args = ["evaluate", "--model", "m", "--data", "d", "--out", str(tmp_path / "metrics.json"), "--run-dir",
            str(tmp_path / "run")]
    shown = _cli(args, monkeypatch, tmp_path)
    assert shown.exit_code == 0, shown.output
    rows = {name: _lines(shown.stdout, name)[0] for name in ("FQ", "MU", "forget prob")}
    assert rows["FQ"][1] == "0.250" and rows["FQ"][2].startswith("forget quality"), shown.stdout
    assert rows["MU"][1] == "0.500" and rows["forget prob"][1] == "0.125", shown.stdout
    assert "retain prob" not in shown.stdout and "{" not in shown.stdout, shown.stdout  # headline metrics only
    assert f"every metric and per-item value: {tmp_path / 'metrics.json'}" in shown.stdout, shown.stdout
    scripted = _cli(args + ["--json"], monkeypatch, tmp_path)
    assert json.loads(scripted.stdout) == {"forget_quality": 0.25, "model_utility": 0.5, "forget_prob": 0.125}


def test_the_gate_line_says_there_is_no_retain_model() -> None:
    from uipe.gate import summary_line

    target = {"gate_rouge_l": {"forget": 0.9, "retain": 0.8}, "model_utility": 0.6, "path": "t"}
    line = summary_line({"target": target})
    assert line == ("prepare gate passed: target: ROUGE-L >= 0.80 on 2 splits (lowest retain), utility 0.600; "
                    "retain: no retain model (prepare.retain: false)")
    given = summary_line({"target": {"path": "t", "trained": False}, "retain": {**target, "path": "r"}})
    assert "target: given, not gated" in given and "utility gap" not in given


# ---- the real thing: `uipe run` as a user runs it, output to a file (conftest.served_run) -------------------------
RAY_INTERNALS = ("pid=", "RayTrainWorker", "PlacementGroupCleaner", "PreemptionWatcher", "core_worker", "Tune",
                 "tensorboard", "Checkpoint successfully", "Loading weights", "Writing model shards")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
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
                  {"UIPE_FAULTS": f"train.step:raise,epoch=1,rank=0,marker={marker}"})
    lines = out.read_text().splitlines()
    assert rc == 1, lines
    errors = [ln for ln in lines if ln.startswith("uipe: error:")]
    assert len(errors) == 1 and "injected test fault in job kl on epoch 1 on rank 0" in errors[0], lines
    assert not [ln for ln in lines if any(s in ln for s in RAY_INTERNALS)], lines
    log = Path(lines[0].removeprefix("log: "))
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "injected test fault in job kl on epoch 1 on rank 0" in text


def test_the_floors_table_lists_the_highest_floor_first_whatever_order_the_json_kept() -> None:
    from uipe.tables import floors_table

    summary = _reference_free()
    summary["floors"] = dict(sorted(summary["floors"].items()))  # as a result.json read back holds them
    assert [r[1] for r in _lines(_render(floors_table([summary])), "ga")] == ["0.95", "0.9", "0.85"]


@pytest.mark.parametrize("sigint", ["ignored", "default", "tune"])
def test_a_sigterm_stops_the_driver_as_ctrl_c_would_even_where_sigint_is_ignored(sigint: str) -> None:
    """SIGTERM goes to SIGINT's handler (Tune's graceful stop during a fit, else KeyboardInterrupt). A process started
    in the background inherits SIGINT ignored: there the SIGTERM was swallowed and the search ran on (a chaos run)."""
    import subprocess
    import sys

    script = ("import os, signal, sys, time\nfrom uipe.signals import stop_on_sigterm\n"
              f"mode = {sigint!r}\n"
              "if mode == 'ignored':\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "if mode == 'tune':\n    signal.signal(signal.SIGINT, lambda s, f: sys.exit(7))  # stands for Tune's\n"
              "stop_on_sigterm()\n"
              "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n    sys.exit(0)\n"
              "except KeyboardInterrupt:\n    sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == (7 if sigint == "tune" else 2), done.stderr
