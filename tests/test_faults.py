"""Faults a running service meets, each injected for real: a full disk (a file-size limit, RLIMIT_FSIZE, on the
writing process) and two writers on one run folder. Nothing may be lost or left half-written.
(A truncated safetensors file: tests/test_extrapolate.py and test_search.py; a killed trial and a tracking server
that stops mid-search: test_search.py; a failing training rank: test_train.py and test_console.py. Those inject
their faults in Ray workers through uipe/faults.py, whose spec and fault points are tested at the end of this file.)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from uipe.io import exclusive

LIMIT = 256 * 1024  # bytes any one file may reach in the limited process


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _model_folder(folder: Path, seed: int) -> Path:
    """A two-tensor safetensors model folder of 1 MB, with a config.json as a Hugging Face folder has."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({"a.weight": torch.randn(256, 512, generator=g), "b.weight": torch.randn(256, 512, generator=g)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".tmp"))


def test_extrapolate_on_a_full_disk_says_so_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    ini, un = _model_folder(tmp_path / "ini", 0), _model_folder(tmp_path / "un", 1)
    out = tmp_path / "models" / "out"
    cmd = [sys.executable, "-m", "uipe.cli", "extrapolate", "--init", str(ini), "--unlearned", str(un),
           "--alpha", "1.0", "--out", str(out)]
    full = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limited, timeout=300)
    assert full.returncode == 2, full.stderr
    lines = [ln for ln in full.stderr.splitlines() if ln.strip() and not ln.startswith("uipe extrapolate: shard")]
    assert len(lines) == 1 and "disk is full" in lines[0] and str(out) in lines[0], full.stderr
    assert not out.exists() and _leftovers(out.parent) == []
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # space freed: the same command works
    assert again.returncode == 0, again.stderr
    assert (out / "model.safetensors").stat().st_size > LIMIT


def test_an_epoch_export_on_a_full_disk_keeps_the_earlier_epochs(tmp_path: Path) -> None:
    """What rank 0 runs to export an epoch (uipe.train.export: atomic_dir + write_hf_folder), under the limit."""
    source = _model_folder(tmp_path / "theta_ini", 0)
    method = tmp_path / "unlearn" / "ga"
    earlier = _model_folder(method / "epoch_01", 2)
    before = (earlier / "model.safetensors").read_bytes()
    script = textwrap.dedent("""
        import sys, torch
        from pathlib import Path
        from uipe.checkpoint import write_hf_folder
        from uipe.errors import UipeError
        from uipe.io import atomic_dir
        state = {"a.weight": torch.ones(256, 512), "b.weight": torch.zeros(256, 512)}
        try:
            with atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:
                write_hf_folder(tmp, state, sys.argv[2], torch.float32, {"epoch": 2})
        except UipeError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
    """)
    full = subprocess.run([sys.executable, "-c", script, str(method / "epoch_02"), str(source)], capture_output=True, text=True, preexec_fn=_limited,
                          timeout=300)
    assert full.returncode == 2 and "disk is full" in full.stderr and "epoch_02" in full.stderr, full.stderr
    assert sorted(p.name for p in method.iterdir()) == ["epoch_01"]  # no partial epoch_02, no temp folder
    assert (earlier / "model.safetensors").read_bytes() == before


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "search" / "npo"
    with exclusive(folder, "a search of npo"):
        probe = textwrap.dedent(f"""
            from uipe.io import exclusive
            with exclusive({str(folder)!r}, "a search of npo"):
                pass
        """)
        second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"{folder}: a search of npo is already running there (pid {os.getpid()})" in second.stderr
    with exclusive(folder, "a search of npo"):  # released at the end of the block (and by the kernel on a crash)
        pass


@pytest.mark.slow
def test_the_cli_refuses_a_second_search_on_the_same_run_folder(unlearned_run, tmp_path: Path) -> None:
    """`uipe search` while another process holds the method's search folder: one line, exit 2, nothing written."""
    from conftest import copy_run

    paths = copy_run(unlearned_run, tmp_path / "run", methods=("ga",))
    lock_dir = paths.search("ga")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from uipe.io import exclusive
        with exclusive({str(lock_dir)!r}, "a search of ga"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "uipe.cli", "search", "--method", "ga", "--run-dir",
                                 str(paths.root)], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"uipe: error: {lock_dir}: a search of ga is already running there (pid {holder.pid}); wait for it, or use "
            "another --run-dir"], second.stderr
        assert sorted(p.name for p in lock_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


# ---- uipe/faults.py: the fault points tests use to fail a trial or a training rank inside Ray workers ----

def test_the_fault_spec_parses_sites_actions_conditions_and_markers_and_refuses_a_malformed_one() -> None:
    from uipe import faults

    spec = faults.parse("trial:kill,alpha=0.5,marker=/tmp/m; train.step:raise,epoch=2,rank=1")
    assert spec == faults.Faults((faults.Fault("trial", "kill", (("alpha", "0.5"),), "/tmp/m"),
                                  faults.Fault("train.step", "raise", (("epoch", "2"), ("rank", "1")))))
    assert faults.parse("") == faults.NONE and not faults.NONE.faults
    for bad in ("trial", "trial:explode", ":kill", "trial:kill,alpha", "trial:raise,=1", "trial:delay,epoch=1",
                "trial:raise,seconds=2", "trial:delay,seconds=soon"):
        with pytest.raises(ValueError, match="UIPE_FAULTS"):
            faults.parse(bad)


def test_a_delay_slows_the_points_it_matches_and_goes_on() -> None:
    import time

    from uipe import faults

    spec = faults.parse("trial:delay,seconds=0.3,epoch=1")
    assert spec.faults[0].when == (("epoch", "1"),) and spec.faults[0].seconds == 0.3  # seconds is no condition
    t0 = time.perf_counter()
    spec.point("trial", alpha=0.5, epoch=2)
    unmatched = time.perf_counter() - t0
    spec.point("trial", alpha=0.5, epoch=1)  # returns, 0.3 s later
    assert unmatched < 0.1 and time.perf_counter() - t0 >= 0.3


def test_the_environment_is_read_only_when_asked_and_no_spec_means_no_fault(monkeypatch) -> None:
    from uipe import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env() == faults.NONE
    faults.NONE.point("trial", alpha=0.5, epoch=2)  # inert: returns
    monkeypatch.setenv(faults.ENV, "train.step:raise,epoch=1")
    assert faults.from_env().faults[0].site == "train.step"


def test_a_fault_point_fires_where_its_conditions_hold_and_once_with_a_marker(tmp_path: Path) -> None:
    from uipe import faults

    marker = tmp_path / "failed_once"
    spec = faults.parse(f"train.step:raise,epoch=2,rank=1,marker={marker}")
    spec.point("train.step", epoch=1, rank=1)  # another epoch
    spec.point("train.step", epoch=2, rank=0)  # another rank
    spec.point("trial", epoch=2, rank=1)  # another site
    spec.point("train.step", epoch=2)  # a condition the point has no value for never holds
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="^injected test fault in epoch 2 on rank 1$"):
        spec.point("train.step", epoch=2, rank=1)
    assert faults.fired(marker) == {"epoch": "2", "rank": "1"}
    spec.point("train.step", epoch=2, rank=1)  # the marker disarmed it
    again = faults.parse("trial:raise,alpha=0.25")  # no marker: every time
    for _ in range(2):
        with pytest.raises(RuntimeError, match="in alpha 0.25000000001 on epoch 3$"):
            again.point("trial", alpha=0.25000000001, epoch=3)


def test_a_kill_fault_ends_the_process_with_status_137_once(tmp_path: Path) -> None:
    """As the OOM killer would: no exception, no clean-up, the process is gone (run in a child process here)."""
    from uipe import faults

    marker = tmp_path / "killed"
    code = textwrap.dedent(f"""
        from uipe import faults
        spec = faults.parse("trial:kill,alpha=0.5,marker={marker}")
        spec.point("trial", alpha=1.0, epoch=2)
        spec.point("trial", alpha=0.5, epoch=3)
        print("survived", flush=True)
    """)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert first.returncode == 137 and "survived" not in first.stdout, first.stderr
    assert faults.fired(marker) == {"alpha": "0.5", "epoch": "3"}
    # the marker remembers: it fires once across processes
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.strip() == "survived", second.stderr
