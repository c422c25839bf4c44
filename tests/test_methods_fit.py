"""RMU, UNDIAL, WGA and SatImp train through Ray Train + FSDP2 on 2 workers; RMU's frozen parameters stay
bit-identical and it resumes exactly after a worker fails; a bad RMU layer is refused before any worker starts.

theta_ini is the tiny preset's random-init model (no prepare: these check the mechanics, not the forgetting).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from uipe.config import load_config
from uipe.errors import UipeError

torch.set_num_threads(1)


def _cfg(synth_dir: Path, tiny_base: Path, *extra: str):
    # tiny_base has the tiny preset's 4 layers; rmu.layer 2 trains layers 0-2's mlp.down_proj.weight.
    return load_config(None, [f"data.source={synth_dir}", f"model.target={tiny_base}", "unlearn.epochs=1",
                              "unlearn.rmu.layer=2", *extra])


@pytest.mark.ray
@pytest.mark.slow
def test_new_methods_train_on_two_fsdp2_workers(ray_session: object, synth_dir: Path, tiny_base: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from uipe.methods.rmu import Params, is_trainable
    from uipe.train.recipe import unlearn, unlearn_methods

    manifests = unlearn_methods(_cfg(synth_dir, tiny_base), tmp_path / "run", ["undial", "wga", "satimp"])  # one fit
    for method, path in manifests.items():
        manifest = json.loads(path.read_text())
        (epoch,) = manifest["epochs"]
        assert manifest["optimizer_steps"] >= 1 and math.isfinite(epoch["loss"]), method
        assert (Path(epoch["path"]) / "model.safetensors").is_file(), method

    # RMU, 2 epochs: once straight through, once with rank 1 failing in epoch 2 (it resumes from epoch 1's sharded
    # state, whose optimizer holds only the trained parameters): the same weights, frozen ones bit-identical.
    cfg = _cfg(synth_dir, tiny_base, "unlearn.epochs=2")
    straight = json.loads(unlearn(cfg, tmp_path / "run", "rmu").read_text())
    marker = tmp_path / "failed_once"
    monkeypatch.setenv("UIPE_FAULTS", f"train.step:raise,epoch=2,rank=1,marker={marker}")
    resumed = json.loads(unlearn(cfg, tmp_path / "run2", "rmu").read_text())
    assert marker.is_file()
    ini = load_file(tiny_base / "model.safetensors")
    params = Params(layer=2)
    for a_row, b_row in zip(straight["epochs"], resumed["epochs"]):
        a = load_file(Path(a_row["path"]) / "model.safetensors")
        b = load_file(Path(b_row["path"]) / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), a_row["epoch"]
        trained = sorted(k for k in ini if is_trainable(params, k))
        assert trained == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
        for key, value in ini.items():
            assert torch.equal(a[key], value) != (key in trained), key  # trained ones moved, the rest did not

    # A layer beyond the model's depth: one line, before any worker starts.
    with pytest.raises(UipeError, match=r"unlearn.rmu.layer: 4 is beyond the model's depth \(4 decoder layers"):
        unlearn(_cfg(synth_dir, tiny_base, "unlearn.rmu.layer=4"), tmp_path / "run3", "rmu")
