"""The folder form's overlapped read/compute/write stages (uipe.shard_pipeline) against the same stages run one after
the other, and what a failing stage leaves: theta_un + alpha*(theta_un - theta_ini) (UIPE, arXiv 2503.04693).

Real safetensors files in tmp_path; faults injected for real (a file truncated after validation, a file-size limit).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import uipe.extrapolate as ex
from uipe.errors import UipeError
from uipe.extrapolate import extrapolate_folder
from uipe.safetensors_io import read_checkpoint
from uipe.shard_pipeline import ShardPipeline, ShardPlan

torch.set_num_threads(1)
SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]


def _tensors(g: torch.Generator, shard: int) -> dict[str, torch.Tensor]:
    """fp32 and bf16 weights, an int buffer, a scalar and an empty tensor: every path the stages take."""
    return {f"l{shard}.a": torch.randn(301, 67, generator=g), f"l{shard}.b": torch.randn(97, 130, generator=g).bfloat16(),
            f"l{shard}.h": torch.randn(33, generator=g).half(), f"l{shard}.n": torch.arange(6) * (shard + 1),
            f"l{shard}.s": torch.tensor(0.5 * shard), f"l{shard}.e": torch.zeros(0, 3)}


def _pair(tmp_path: Path, sizes: tuple[int, ...] = (1, 1, 1)) -> tuple[Path, Path]:
    """theta_ini in one file, theta_un in three shards (the reader finds each tensor by key across layouts)."""
    g = torch.Generator().manual_seed(0)
    ini = {k: t for i in range(len(sizes)) for k, t in _tensors(g, i).items()}
    ini.update({f"big{i}": torch.randn(n * 256, 256, generator=g) for i, n in enumerate(sizes) if n > 1})
    un = {k: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t + 1
          for k, t in ini.items()}
    (tmp_path / "ini").mkdir()
    save_file(ini, tmp_path / "ini" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "un").mkdir()
    weight_map = {k: SHARDS[int(k[1]) if k[0] == "l" else int(k[3:])] for k in un}
    for shard in SHARDS:
        save_file({k: t for k, t in un.items() if weight_map[k] == shard}, tmp_path / "un" / shard,
                  metadata={"format": "pt"})
    (tmp_path / "un" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path / "ini", tmp_path / "un"


@pytest.mark.parametrize("alpha", [1.5, 0.0, -1.0])
def test_overlapped_equals_serial_bit_for_bit(tmp_path: Path, alpha: float) -> None:
    ini, un = _pair(tmp_path)
    fast = extrapolate_folder(ini, un, alpha, tmp_path / "fast", progress=False)
    slow = extrapolate_folder(ini, un, alpha, tmp_path / "slow", progress=False, overlap=False)
    for shard in SHARDS:  # whole files: header, layout and every tensor's bytes
        assert (fast / shard).read_bytes() == (slow / shard).read_bytes(), shard
    got = {k: t for shard in SHARDS for k, t in load_file(fast / shard).items()}
    un_t = {k: t for shard in SHARDS for k, t in load_file(un / shard).items()}
    ini_t = load_file(ini / "model.safetensors")
    assert got.keys() == un_t.keys()
    for k, t in got.items():
        if alpha == 0 or not t.is_floating_point():  # copied: theta_un exactly
            assert torch.equal(t.reshape(-1).view(torch.uint8), un_t[k].reshape(-1).view(torch.uint8)), k
        else:  # the whole-tensor fp32 formula (v = un - ini, alpha*v, + un, one cast), as the in-memory form gives
            u, i = un_t[k].float(), ini_t[k].float()
            assert torch.equal(t, ((u - i) * alpha + u).to(t.dtype)), k


def test_buffers_stay_within_three_shards(tmp_path: Path) -> None:
    ini, un = _pair(tmp_path, sizes=(1, 3, 1))  # the middle shard is the largest
    ck = read_checkpoint(un)
    plans = [ShardPlan.of(ck, s, lambda k: True) for s in ck.shards]
    largest = max(ck.sizes.values())
    with ShardPipeline(read_checkpoint(ini), ck, plans, tmp_path) as pipe:
        for tensors in pipe:
            for _ in tensors:
                pass
        buffers = [b for q in (pipe.free_out, pipe.free_un) for b in list(q.queue)]
    # three shards went through two out buffers and one un buffer, together no more than 3 x the largest shard
    assert len({id(b) for b in buffers if b is not None}) == 3
    assert sum(len(b.mem) for b in buffers) <= 3 * largest


def _truncate_after_validation(monkeypatch: pytest.MonkeyPatch, victim: Path) -> None:
    """The shard passes every check, then loses its last bytes before the reader gets to it."""
    real = ex.read_checkpoint

    def read_then_truncate(folder: Path) -> object:
        ckpt = real(folder)
        if Path(folder) == victim.parent:
            victim.write_bytes(victim.read_bytes()[:-8])
        return ckpt

    monkeypatch.setattr(ex, "read_checkpoint", read_then_truncate)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("victim", ["un", "ini"])  # a shard of theta_un, or theta_ini's single file
def test_reader_error_is_the_same_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             overlap: bool, victim: str) -> None:
    ini, un = _pair(tmp_path)
    bad = un / SHARDS[2] if victim == "un" else ini / "model.safetensors"
    _truncate_after_validation(monkeypatch, bad)
    before = threading.active_count()
    with pytest.raises(UipeError) as e:
        extrapolate_folder(ini, un, 1.5, tmp_path / "out", progress=False, overlap=overlap)
    assert str(e.value) == f"{bad}: not a readable safetensors file ({bad.stat().st_size} " \
                           f"bytes, {bad.stat().st_size + 8} when its header was checked)"
    assert "\n" not in str(e.value)
    assert threading.active_count() == before  # reader and writer joined
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ini", "un"]  # no out, no .out.*.tmp


def test_compute_error_stops_the_threads_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ini, un = _pair(tmp_path)
    calls = []

    def fail_on_the_fourth(*args: object) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise UipeError("injected")
        ex_kernel(*args)

    ex_kernel = ex.extrapolate_into
    monkeypatch.setattr(ex, "extrapolate_into", fail_on_the_fourth)
    before = threading.active_count()
    with pytest.raises(UipeError, match="^injected$"):
        extrapolate_folder(ini, un, 1.5, tmp_path / "out", progress=False)
    assert threading.active_count() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ini", "un"]


def test_writer_error_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    # A file-size limit the middle shard exceeds: the writer thread fails while the reader and compute go on.
    ini, un = _pair(tmp_path, sizes=(1, 4, 1))
    limit = (un / SHARDS[1]).stat().st_size - 1
    assert max((un / SHARDS[0]).stat().st_size, (un / SHARDS[2]).stat().st_size) < limit
    out = tmp_path / "models" / "out"
    cmd = [sys.executable, "-m", "uipe.cli", "extrapolate", "--init", str(ini), "--unlearned", str(un),
           "--alpha", "1.5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("uipe extrapolate: shard")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"uipe: error: {out}: the disk is full"), proc.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []
