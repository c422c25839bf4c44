"""UIPE extrapolation (arXiv 2503.04693): theta_un + alpha*(theta_un - theta_ini), folder and in-memory forms.

Real safetensors files in tmp_path, a real tiny transformers Llama; no mocks.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from uipe.errors import UipeError
from uipe.extrapolate import CHUNK, OPERATOR, extrapolate_folder, extrapolate_tensor
from uipe.update_vector import UpdateVector, cached_update_vector, clear_update_vector_cache

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def write_model(folder: Path, shards: dict[str, dict[str, torch.Tensor]], extra: dict[str, str] | None = None) -> Path:
    """A Hugging Face style folder: one model.safetensors, or several shards plus model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name, metadata={"format": "pt"})
    if list(shards) != ["model.safetensors"]:
        weight_map = {k: name for name, tensors in shards.items() for k in tensors}
        total = sum(t.nbytes for tensors in shards.values() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def test_hand_checked_alpha_half_on_two_shards_with_other_init_layout(tmp_path: Path) -> None:
    # init is one file, unlearned two shards: tensors are found by key through each folder's own index.
    ini = write_model(tmp_path / "ini", {"model.safetensors": {
        "a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5, -1.0], [2.0, 4.0]]), "n": torch.tensor([7, 8])}})
    un = write_model(tmp_path / "un", {S1: {"a": torch.tensor([3.0, 1.0])},
                                       S2: {"b": torch.tensor([[1.5, -1.0], [0.0, 8.0]]), "n": torch.tensor([5, 6])}})
    out = extrapolate_folder(ini, un, 0.5, tmp_path / "out", progress=False)
    got = load_folder(out)
    # a: 3 + 0.5*(3-1) = 4;  1 + 0.5*(1-2) = 0.5
    assert torch.equal(got["a"], torch.tensor([4.0, 0.5]))
    # b: 1.5 + 0.5*(1.5-0.5) = 2;  -1 + 0.5*(-1-(-1)) = -1;  0 + 0.5*(0-2) = -1;  8 + 0.5*(8-4) = 10
    assert torch.equal(got["b"], torch.tensor([[2.0, -1.0], [-1.0, 10.0]]))
    # ints are copied from theta_un, not extrapolated (5 + 0.5*(5-7) would be 4)
    assert torch.equal(got["n"], torch.tensor([5, 6]))
    with safe_open(out / S1, framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == ["a"]


def _random_pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ini_t = {"w32": torch.randn(8, 5, generator=g), "w16": torch.randn(6, 4, generator=g).bfloat16(),
             "idx": torch.arange(4), "mask": torch.tensor([True, False])}
    un_t = {"w32": ini_t["w32"] + 0.1 * torch.randn(8, 5, generator=g),
            "w16": (ini_t["w16"].float() + 0.1 * torch.randn(6, 4, generator=g)).bfloat16(),
            "idx": torch.arange(4) * 3, "mask": torch.tensor([False, True])}
    ini = write_model(tmp_path / "ini", {S1: {"w32": ini_t["w32"], "idx": ini_t["idx"]},
                                         S2: {"w16": ini_t["w16"], "mask": ini_t["mask"]}})
    un = write_model(tmp_path / "un", {S1: {"w32": un_t["w32"], "w16": un_t["w16"]},
                                       S2: {"idx": un_t["idx"], "mask": un_t["mask"]}})
    return ini, un, ini_t, un_t


def test_alpha_zero_is_theta_un_bit_for_bit(tmp_path: Path) -> None:
    ini, un, _, un_t = _random_pair(tmp_path)
    # Values that arithmetic would change even at alpha = 0, so only a no-arithmetic copy passes:
    # -0 + 0*(-0 - (-1)) = -0 + 0 = +0 (sign bit lost); inf + 0*(inf - 1) = inf + nan = nan.
    special_un, special_ini = torch.tensor([-0.0, float("inf"), 2.5]), torch.tensor([-1.0, 1.0, 2.0])
    save_file({"special": special_ini}, ini / "special.safetensors")
    save_file({"special": special_un}, un / "special.safetensors")
    for folder in (ini, un):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"]["special"] = "special.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    un_t = {**un_t, "special": special_un}
    got = load_folder(extrapolate_folder(ini, un, 0.0, tmp_path / "out", progress=False))
    for k, t in un_t.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k
    assert (tmp_path / "out" / S1).read_bytes() == (un / S1).read_bytes()


def test_alpha_minus_one_recovers_theta_ini(tmp_path: Path) -> None:
    ini, un, ini_t, un_t = _random_pair(tmp_path)
    got = load_folder(extrapolate_folder(ini, un, -1.0, tmp_path / "out", progress=False))
    # un + (-1)*(un - ini) = ini up to fp32 rounding of the difference
    torch.testing.assert_close(got["w32"], ini_t["w32"], rtol=0, atol=1e-6)
    # bf16 -> fp32 is exact; any fp32 rounding of the difference is far below a bf16 ulp, so the cast gives ini back
    assert got["w16"].dtype == torch.bfloat16 and torch.equal(got["w16"], ini_t["w16"])
    assert torch.equal(got["idx"], un_t["idx"]) and torch.equal(got["mask"], un_t["mask"])


def test_bf16_is_computed_in_fp32_then_cast(tmp_path: Path) -> None:
    # ini = 1, un = 1.0078125 (1 + 2^-7, one bf16 ulp above 1). alpha = 0.5:
    # fp32: 1.0078125 + 0.5*0.0078125 = 1.01171875 = 1 + 1.5 ulp -> round-to-nearest-even in bf16 gives 1 + 2 ulp
    # = 1.015625.
    ini = torch.tensor([1.0], dtype=torch.bfloat16)
    un = torch.tensor([1.0078125], dtype=torch.bfloat16)
    out = extrapolate_tensor(ini, un, 0.5)
    assert out.dtype == torch.bfloat16 and out.item() == 1.015625
    # pure: inputs untouched, also for fp32 where the upcast is a no-op view of the input
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(extrapolate_tensor(a, b, 0.5), torch.tensor([4.0, 0.5]))
    assert torch.equal(a, torch.tensor([1.0, 2.0])) and torch.equal(b, torch.tensor([3.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kernel_matches_whole_tensor_formula(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
) -> None:
    import uipe.extrapolate as ex

    g = torch.Generator().manual_seed(3)
    ini, un = torch.randn(5, 9, generator=g).to(dtype), torch.randn(5, 9, generator=g).to(dtype)
    # the operator on whole fp32 tensors: v = un - ini, then alpha*v, then + un, then one cast
    u32, i32 = un.float(), ini.float()
    expected = ((u32 - i32) * 1.75 + u32).to(dtype)
    monkeypatch.setattr(ex, "CHUNK", 7)  # 45 elements: six full chunks and a tail of 3
    assert torch.equal(extrapolate_tensor(ini, un, 1.75), expected)
    # the in-memory form, streamed from the files into a parameter of the same dtype, through the same chunks
    uv = UpdateVector.from_folders(write_model(tmp_path / "i", {"model.safetensors": {"w": ini}}),
                                   write_model(tmp_path / "u", {"model.safetensors": {"w": un}}))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(5, 9, dtype=dtype))
    uv.apply(model, 1.75)
    assert torch.equal(model.w.detach(), expected)
    # working set: bf16 needs fp32 chunks of un, ini and v (3 buffers x 7 elements x 4 bytes); fp32 is computed in
    # place in the parameter, reading the mmap'ed files directly (no buffer at all)
    assert uv.scratch.chunk == 7 and uv.nbytes == (3 * 7 * 4 if dtype == torch.bfloat16 else 0)


def test_shards_index_and_other_files(tmp_path: Path) -> None:
    ini, un, _, _ = _random_pair(tmp_path)
    for name, text in {"config.json": '{"model_type": "llama"}', "tokenizer.json": "{}",
                       "generation_config.json": "{}", "uipe_meta.json": '{"old": true}',
                       "pytorch_model.bin": "stale", "optimizer.pt": "state"}.items():
        (un / name).write_text(text)
    out = extrapolate_folder(ini, un, 1.5, tmp_path / "out", progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([S1, S2, "model.safetensors.index.json", "config.json", "tokenizer.json",
                            "generation_config.json", "uipe_meta.json"])
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (un / name).read_bytes(), name
    meta = json.loads((out / "uipe_meta.json").read_text())
    assert meta == {"init": str(ini.resolve()), "unlearned": str(un.resolve()), "alpha": 1.5, "operator": OPERATOR}
    for shard in (S1, S2):
        with safe_open(out / shard, framework="pt") as f, safe_open(un / shard, framework="pt") as g:
            assert sorted(f.keys()) == sorted(g.keys()) and f.metadata() == g.metadata()


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ini", "un"]  # no temp folder left beside out


@pytest.mark.parametrize("bad, message", [
    ({"b.bad": torch.zeros(4), "a.missing": None}, "'a.missing' is in init but missing from unlearned"),
    ({"a.shape": torch.zeros(3), "b.shape": torch.zeros(5)}, "'a.shape': shape [2] in init, [3] in unlearned"),
    ({"a.dtype": torch.zeros(2, dtype=torch.float16)}, "'a.dtype': dtype F32 in init, F16 in unlearned"),
])
def test_mismatch_names_first_bad_tensor_and_writes_nothing(
    tmp_path: Path, bad: dict[str, torch.Tensor | None], message: str,
) -> None:
    base = {"a.missing": torch.zeros(2), "a.shape": torch.zeros(2), "a.dtype": torch.zeros(2),
            "b.bad": torch.zeros(2), "b.shape": torch.zeros(2)}
    un_t = {k: v for k, v in {**base, **bad}.items() if v is not None}
    ini = write_model(tmp_path / "ini", {S1: dict(list(base.items())[:2]), S2: dict(list(base.items())[2:])})
    un = write_model(tmp_path / "un", {"model.safetensors": un_t})
    with pytest.raises(UipeError) as e:
        extrapolate_folder(ini, un, 1.0, tmp_path / "out", progress=False)
    assert message in str(e.value) and str(ini) in str(e.value) and str(un) in str(e.value)
    _assert_nothing_written(tmp_path)
    with pytest.raises(UipeError, match="a\\."):
        UpdateVector.from_folders(ini, un)


def test_missing_key_in_init_is_named(tmp_path: Path) -> None:
    ini = write_model(tmp_path / "ini", {"model.safetensors": {"x": torch.zeros(1)}})
    un = write_model(tmp_path / "un", {"model.safetensors": {"x": torch.zeros(1), "extra": torch.zeros(1)}})
    with pytest.raises(UipeError, match="'extra' is in unlearned but missing from init"):
        extrapolate_folder(ini, un, 1.0, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path)


def test_bad_inputs(tmp_path: Path) -> None:
    ini, un, _, _ = _random_pair(tmp_path)
    binonly = tmp_path / "bin"
    binonly.mkdir()
    (binonly / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UipeError, match="safetensors weights are required.*pytorch_model.bin"):
        extrapolate_folder(binonly, un, 1.0, tmp_path / "out", progress=False)
    for alpha in (float("nan"), float("inf"), "x"):
        with pytest.raises(UipeError, match="alpha must be a finite number"):
            extrapolate_folder(ini, un, alpha, tmp_path / "out", progress=False)  # type: ignore[arg-type]
    with pytest.raises(UipeError, match="must differ"):
        extrapolate_folder(ini, un, 1.0, un, overwrite=True, progress=False)
    (un / S2).unlink()
    with pytest.raises(UipeError, match="shard listed in model.safetensors.index.json is missing"):
        extrapolate_folder(ini, un, 1.0, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_overwrite(tmp_path: Path) -> None:
    ini, un, ini_t, un_t = _random_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UipeError, match="already exists \\(use --overwrite to replace it\\)"):
        extrapolate_folder(ini, un, 1.0, out, progress=False)
    assert (out / "keep.txt").exists()
    extrapolate_folder(ini, un, 1.0, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists()
    # alpha = 1: 2*un - ini, computed in fp32
    assert torch.equal(load_folder(out)["w32"], un_t["w32"] + 1.0 * (un_t["w32"] - ini_t["w32"]))


def test_progress_lines_and_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ini, un, _, _ = _random_pair(tmp_path)
    extrapolate_folder(ini, un, 1.0, tmp_path / "o1")
    err = capsys.readouterr().err
    assert "shard 1/2" in err and "shard 2/2" in err and "MB/s" in err
    extrapolate_folder(ini, un, 1.0, tmp_path / "o2", progress=False)
    assert capsys.readouterr().err == ""


def _tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    ini_model = _tiny_llama(0)
    ini_model.save_pretrained(root / "ini")  # one model.safetensors
    un_model = _tiny_llama(0)
    with torch.no_grad():  # a stand-in "unlearning" update: a small deterministic perturbation of every weight
        g = torch.Generator().manual_seed(1)
        for p in un_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    un_model.save_pretrained(root / "un", max_shard_size="12KB")
    assert len(list((root / "un").glob("model-*-of-*.safetensors"))) >= 2
    return root / "ini", root / "un"


def _load_llama(folder: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("alpha", [0.0, 1.5, -0.25])
def test_in_memory_equals_folder_form_on_tiny_llama(tmp_path: Path, llama_pair: tuple[Path, Path],
                                                     alpha: float) -> None:
    ini, un = llama_pair
    out = extrapolate_folder(ini, un, alpha, tmp_path / "out", progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in un.glob("*.safetensors"))
    from_folder = _load_llama(out).state_dict()
    model = _load_llama(ini)  # start from other weights: apply must overwrite every one
    UpdateVector.from_folders(ini, un).apply(model, alpha)
    state = model.state_dict()
    assert set(state) == set(from_folder)
    for k in state:
        assert torch.equal(state[k], from_folder[k]), k
    un_state = _load_llama(un).state_dict()
    differs = any(not torch.equal(state[k], un_state[k]) for k in state)
    assert differs == (alpha != 0)


def test_apply_does_not_accumulate(llama_pair: tuple[Path, Path]) -> None:
    ini, un = llama_pair
    uv = UpdateVector.from_folders(ini, un)
    twice, once = _load_llama(ini), _load_llama(ini)
    uv.apply(twice, 2.0)
    uv.apply(twice, 0.7)
    uv.apply(once, 0.7)
    for (k, a), (_, b) in zip(twice.state_dict().items(), once.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # fp32 weights are computed in place in the parameters from mmap views of the files: nothing held beyond the
    # model (the old design held theta_un and v in fp32, 8 bytes per parameter)
    assert uv.nbytes == 0


def test_apply_rejects_unknown_key_and_shape(tmp_path: Path) -> None:
    ini = write_model(tmp_path / "ini", {"model.safetensors": {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}})
    un = write_model(tmp_path / "un", {"model.safetensors": {"weight": torch.ones(2, 3), "bias": torch.ones(2)}})
    uv = UpdateVector.from_folders(ini, un)
    lin = torch.nn.Linear(3, 2)
    uv.apply(lin, 0.5)  # 1 + 0.5*(1-0) = 1.5 everywhere
    assert torch.equal(lin.weight.detach(), torch.full((2, 3), 1.5)) and torch.equal(lin.bias.detach(),
                                                                                     torch.full((2,), 1.5))
    with pytest.raises(UipeError, match="'weight': shape \\[2, 3\\]"):
        uv.apply(torch.nn.Linear(4, 2), 0.5)
    before = torch.nn.Linear(3, 2, bias=False)
    w0 = before.weight.detach().clone()
    with pytest.raises(UipeError, match="'bias' from .* is not in the model"):
        uv.apply(before, 0.5)
    assert torch.equal(before.weight.detach(), w0)  # checked before anything was written


def test_apply_copies_int_buffers(tmp_path: Path) -> None:
    ini = write_model(tmp_path / "ini", {"model.safetensors": {"count": torch.tensor([7, 8]), "w": torch.zeros(2)}})
    un = write_model(tmp_path / "un", {"model.safetensors": {"count": torch.tensor([5, 6]), "w": torch.ones(2)}})
    model = torch.nn.Module()
    model.register_buffer("count", torch.zeros(2, dtype=torch.int64))
    model.w = torch.nn.Parameter(torch.zeros(2))
    UpdateVector.from_folders(ini, un).apply(model, 0.5)
    # int: copied from theta_un (extrapolating would give 5 + 0.5*(5-7) = 4); float: 1 + 0.5*(1-0) = 1.5
    assert torch.equal(model.count, torch.tensor([5, 6])) and torch.equal(model.w.detach(), torch.full((2,), 1.5))


def test_cached_update_vector_lru(tmp_path: Path) -> None:
    clear_update_vector_cache()
    folders = [write_model(tmp_path / f"m{i}", {"model.safetensors": {"x": torch.full((2,), float(i))}})
               for i in range(3)]
    a = cached_update_vector(folders[0], folders[1])
    assert cached_update_vector(folders[0], folders[1]) is a
    assert a.nbytes == 0  # an entry is headers only: no tensor data is read before apply
    # theta_un = 1, v = 1 - 0 = 1: alpha = 2 gives 1 + 2*1 = 3
    assert torch.equal(_apply_x(a, 2.0), torch.full((2,), 3.0))
    b = cached_update_vector(folders[0], folders[2])
    assert cached_update_vector(folders[0], folders[1]) is a  # a is now most recent; b the least
    cached_update_vector(folders[1], folders[2])  # third entry evicts b
    assert cached_update_vector(folders[0], folders[1]) is a
    assert cached_update_vector(folders[0], folders[2]) is not b
    # rewriting theta_un's weights changes the mtime/size fingerprint: a fresh vector (v = 5 - 0 = 5)
    save_file({"x": torch.full((2,), 5.0)}, folders[1] / "model.safetensors")
    os.utime(folders[1] / "model.safetensors", ns=(1, 1))
    fresh = cached_update_vector(folders[0], folders[1])
    # theta_un = 5, v = 5 - 0 = 5: alpha = 2 gives 5 + 2*5 = 15
    assert fresh is not a and torch.equal(_apply_x(fresh, 2.0), torch.full((2,), 15.0))
    clear_update_vector_cache()
    assert cached_update_vector(folders[0], folders[1]) is not fresh


def _apply_x(uv: UpdateVector, alpha: float) -> torch.Tensor:
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.zeros(2))
    uv.apply(model, alpha)
    return model.x.detach()


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    if how == "header":  # cut inside the JSON header
        path.write_bytes(data[: header_end // 2])
    elif how == "data":  # header intact, the last tensor's bytes cut short
        path.write_bytes(data[:-16])
    elif how == "garbage":  # the first 8 bytes give an absurd header length
        path.write_bytes(random.Random(0).randbytes(len(data)))
    else:  # the right size, but a tensor's shape does not match its bytes: only safetensors' own checks see it
        header = json.loads(data[8:header_end])
        header["w32"]["shape"] = [8, 4]
        raw = json.dumps(header).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[header_end:])


@pytest.mark.parametrize("how", ["header", "data", "garbage", "inconsistent"])
def test_corrupt_shard_is_one_clear_error(tmp_path: Path, how: str) -> None:
    ini, un, _, _ = _random_pair(tmp_path)
    _corrupt(un / S1, how)
    expected = f"{un / S1}: not a readable safetensors file ("
    with pytest.raises(UipeError) as e:
        extrapolate_folder(ini, un, 1.0, tmp_path / "out", progress=False)
    assert str(e.value).startswith(expected)
    if how == "data":  # refused by the size check on the header, before safetensors maps a byte of data
        assert "but its header describes" in str(e.value)
    _assert_nothing_written(tmp_path)
    with pytest.raises(UipeError) as e:
        UpdateVector.from_folders(ini, un)
    assert str(e.value).startswith(expected)
    proc = subprocess.run([sys.executable, "-m", "uipe.cli", "extrapolate", "--init", str(ini), "--unlearned",
                           str(un), "--alpha", "1.0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"uipe: error: {expected}"), proc.stderr
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("how", ["truncated", "same-size garbage"])
def test_shard_broken_after_caching_is_refused_before_reading(tmp_path: Path, how: str) -> None:
    # A cached UpdateVector outlives its header check: a shard truncated since must be refused when it is opened
    # (mapping it and reading past the end of the file would kill the process with SIGBUS); one rewritten with
    # the same size is refused by safetensors when opened, and that error is turned into the same one line.
    ini, un, _, _ = _random_pair(tmp_path)
    uv = UpdateVector.from_folders(ini, un)
    data = (un / S2).read_bytes()
    (un / S2).write_bytes(data[:-1] if how == "truncated" else random.Random(0).randbytes(len(data)))
    model = torch.nn.Module()
    for key, (shape, dtype) in {"w32": ((8, 5), torch.float32), "w16": ((6, 4), torch.bfloat16),
                                "idx": ((4,), torch.int64), "mask": ((2,), torch.bool)}.items():
        model.register_buffer(key, torch.zeros(shape, dtype=dtype))
    with pytest.raises(UipeError, match=re.escape(f"{un / S2}: not a readable safetensors file (")):
        uv.apply(model, 1.0)


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(r"^RssAnon:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_apply_memory_does_not_scale_with_the_model(tmp_path: Path) -> None:
    # 40M bf16 parameters (80 MB). The old in-memory design held theta_un and v in fp32: 320 MB beyond the model.
    # The new one reads mmap'ed files (page cache, not anonymous memory) through ~3 MB of chunk buffers.
    g = torch.Generator().manual_seed(0)
    shapes = {f"w{i}": (2500, 4000) for i in range(4)}
    ini_t = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    un_t = {k: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).bfloat16() for k, t in ini_t.items()}
    ini = write_model(tmp_path / "ini", {"model.safetensors": ini_t})
    un = write_model(tmp_path / "un", {"model.safetensors": un_t})
    model = torch.nn.Module()
    for k, s in shapes.items():  # filled, so every page of the live model is resident before the baseline
        model.register_parameter(k, torch.nn.Parameter(torch.full(s, 0.5, dtype=torch.bfloat16)))
    expected_w0 = extrapolate_tensor(ini_t["w0"], un_t["w0"], 1.5)
    model_bytes = sum(p.nbytes for p in model.parameters())
    del ini_t, un_t
    base = peak = _rss_anon_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, _rss_anon_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        uv = UpdateVector.from_folders(ini, un)
        uv.apply(model, 1.5)
        peak = max(peak, _rss_anon_bytes())  # what is kept after apply: what a cached entry costs between trials
    finally:
        done.set()
        sampler.join()
    assert uv.nbytes == 3 * 4 * CHUNK  # fp32 chunks of un, ini and v
    assert peak - base < 0.3 * model_bytes, f"{(peak - base) / 1e6:.0f} MB beyond an {model_bytes / 1e6:.0f} MB model"
    assert torch.equal(model.w0.detach(), expected_w0)
