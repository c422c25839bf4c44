"""UIPE beyond one alpha (issue 26): per-group, importance-weighted and anchored extrapolation.

Numbers worked by hand on small tensors; then every path (folder serial and overlapped, a live model, a 2-rank
FSDP2 build) bit for bit on a tiny Llama, for each form. Real safetensors files, real torch.distributed (gloo).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_extrapolate import load_folder, write_model
from test_sharding import full_state, init_rank, save_llama, spawn
from uipe.coefficients import DEFAULT_GROUPS, Coefficients, Extrapolation, Group, assign_groups, resolve
from uipe.errors import UipeError
from uipe.extrapolate import extrapolate_folder, extrapolate_into

torch.set_num_threads(1)


# ---- the arithmetic, by hand -----------------------------------------------------------------------------------------


def test_weighted_scale_by_hand() -> None:
    # f_forget [4, 0, 1, 0], f_retain [0, 0, 1, 2], lambda 1 -> s = [4/4, 0/0 -> 0, 1/2, 0/2] = [1, 0, 0.5, 0]
    # theta_ini 0, theta_un [1, 2, 3, 4], alpha 2: alpha*v = [2, 4, 6, 8]; *s = [2, 0, 3, 0]; + theta_un = [3, 2, 6, 4]
    ini, un = torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])
    ff, fr = torch.tensor([4.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 2.0])
    out = extrapolate_into(ini, un, 2.0, torch.empty(4), importance=(ff, fr, 1.0))
    assert out.tolist() == [3.0, 2.0, 6.0, 4.0]
    # lambda 3: s = [1, 0, 1/4, 0] -> [3, 2, 3 + 6/4, 4]
    out = extrapolate_into(ini, un, 2.0, torch.empty(4), importance=(ff, fr, 3.0))
    assert out.tolist() == [3.0, 2.0, 4.5, 4.0]


def test_a_scale_of_one_is_the_global_form_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    ini, un = torch.randn(1000, generator=gen).bfloat16(), torch.randn(1000, generator=gen).bfloat16()
    ones, zeros = torch.ones(1000), torch.zeros(1000)
    plain = extrapolate_into(ini, un, 0.7, torch.empty(1000, dtype=torch.bfloat16))
    weighted = extrapolate_into(ini, un, 0.7, torch.empty(1000, dtype=torch.bfloat16), importance=(ones, zeros, 1.0))
    assert torch.equal(plain, weighted)


NAMES = {  # a 3-block Llama's names -> element counts
    "model.embed_tokens.weight": 10, "model.norm.weight": 2, "lm_head.weight": 10,
    **{f"model.layers.{i}.{m}": 4 for i in range(3) for m in (
        "self_attn.q_proj.weight", "input_layernorm.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight")},
}


def test_default_groups_cover_every_parameter_exactly_once_by_depth() -> None:
    member = assign_groups(sorted(NAMES), DEFAULT_GROUPS)
    assert member["model.embed_tokens.weight"] == "embed"
    assert member["lm_head.weight"] == member["model.norm.weight"] == "head"
    assert member["model.layers.0.self_attn.q_proj.weight"] == member["model.layers.0.input_layernorm.weight"] \
        == "attn_lower"
    assert member["model.layers.1.mlp.up_proj.weight"] == "mlp_middle"
    assert member["model.layers.2.post_attention_layernorm.weight"] == "mlp_upper"
    assert sorted(set(member.values())) == sorted(DEFAULT_GROUPS)


def test_group_alphas_per_tensor_and_the_parameter_weighted_summary() -> None:
    alphas = {g: 0.0 for g in DEFAULT_GROUPS} | {"embed": 1.0, "attn_upper": 2.0}
    point, coef = resolve(Extrapolation(3, group_alphas=alphas), NAMES)
    assert coef.of("model.embed_tokens.weight") == 1.0 and coef.of("model.layers.2.self_attn.q_proj.weight") == 2.0
    assert coef.of("model.layers.0.mlp.up_proj.weight") == 0.0
    # (1.0 * 10 + 2.0 * (4 + 4)) / (10 + 2 + 10 + 3 * 4 * 4) = 26 / 70
    assert point.alpha == pytest.approx(26 / 70) and coef.alpha == point.alpha
    assert point.vector()["alpha_attn_upper"] == 2.0 and len(point.vector()) == 8


def test_anchor_gap_picks_the_base_epoch_and_at_zero_it_is_theta_ini() -> None:
    assert Extrapolation.from_config({"alpha": 1.0, "epoch": 4, "anchor_gap": 1}).anchor == 3
    assert Extrapolation.from_config({"alpha": 1.0, "epoch": 4, "anchor_gap": 4}).anchor == 0
    assert Extrapolation.from_config({"alpha": 1.0, "epoch": 4, "anchor_gap": 6}).anchor == 0
    assert Extrapolation.from_config({"alpha": 1.0, "epoch": 4}).anchor == 0  # no anchor: theta_ini
    point = Extrapolation.from_config({"alpha_embed": 0.0, "alpha_head": 0.0, "epoch": 2, "retain_lambda": 3.0})
    assert point.form == "groups" and point.is_base


def test_bad_groups_and_vectors_are_one_line_naming_the_thing() -> None:
    with pytest.raises(UipeError, match=r"tensor 'lm_head.weight' is in no group"):
        assign_groups(["lm_head.weight"], {"embed": Group(patterns=["*embed*"])})
    with pytest.raises(UipeError, match=r"'model.embed_tokens.weight' is in two groups \(a, b\)"):
        assign_groups(["model.embed_tokens.weight"], {"a": Group(patterns=["*embed*"]), "b": Group(patterns=["*"])})
    with pytest.raises(UipeError, match=r"1 group alphas for 8 groups"):
        resolve(Extrapolation(1, group_alphas={"embed": 1.0}), NAMES)
    with pytest.raises(UipeError, match="retain_lambda must be positive"):
        resolve(Extrapolation(1, alpha=1.0, retain_lambda=0.0), NAMES)
    with pytest.raises(ValueError, match="depth"):
        Group(patterns=["*"], depth=(0.5, 0.2))


# ---- every path, bit for bit, on a tiny Llama ------------------------------------------------------------------------


def _pair(root: Path) -> tuple[Path, Path, Path]:
    """theta_ini and theta_un (a tiny untied Llama and a perturbed copy) and an importance folder for theta_un."""
    from safetensors.torch import load_file

    ini = save_llama(root / "ini", tied=False)
    tensors = load_file(ini / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    un = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
    write_model(root / "un", {"model.safetensors": un})
    for f in ("config.json", "generation_config.json"):
        if (ini / f).exists():
            (root / "un" / f).write_text((ini / f).read_text())
    imp = {f"f_forget.{k}": torch.rand(v.shape, generator=gen) for k, v in un.items()}
    imp |= {f"f_retain.{k}": torch.rand(v.shape, generator=gen) * (torch.rand(v.shape, generator=gen) > 0.3)
            for k, v in un.items()}
    (root / "imp").mkdir()
    save_file(imp, root / "imp" / "model.safetensors", metadata={"format": "pt"})
    return ini, root / "un", root / "imp"


def _forms(ini: Path) -> dict[str, Coefficients]:
    from safetensors import safe_open

    with safe_open(ini / "model.safetensors", "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    sizes = {k: int(torch.tensor(s).prod()) for k, s in sizes.items()}
    alphas = {g: 0.25 * i for i, g in enumerate(DEFAULT_GROUPS)}
    return {"global": resolve(Extrapolation(1, 0.8), sizes)[1],
            "groups": resolve(Extrapolation(1, group_alphas=alphas), sizes)[1],
            "weighted": resolve(Extrapolation(1, 1.5, retain_lambda=2.0), sizes)[1],
            "zero": resolve(Extrapolation(1, group_alphas={g: 0.0 for g in DEFAULT_GROUPS}), sizes)[1]}


def rank_forms(rank: int, world: int, port: int, root: str) -> None:
    from uipe.train.sharding import build_sharded

    mesh = init_rank(rank, world, port)
    ini, un, imp = Path(root) / "ini", Path(root) / "un", Path(root) / "imp"
    for name, coef in _forms(ini).items():
        model = build_sharded(str(ini), torch.device("cpu"), mesh, torch.float32, False, unlearned=str(un),
                              alpha=coef, importance=str(imp))
        state = full_state(model)
        if rank == 0:
            torch.save(state, Path(root) / f"sharded-{name}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_every_path_gives_the_same_weights_for_every_form(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from uipe.update_vector import UpdateVector

    ini, un, imp = _pair(tmp_path)
    spawn(rank_forms, 2, tmp_path)
    theta_un = load_folder(un)
    for name, coef in _forms(ini).items():
        serial = load_folder(extrapolate_folder(ini, un, coef, tmp_path / f"{name}-s", progress=False, overlap=False,
                                                importance=imp))
        overlapped = load_folder(extrapolate_folder(ini, un, coef, tmp_path / f"{name}-o", progress=False,
                                                    importance=imp))
        model = AutoModelForCausalLM.from_pretrained(ini, dtype=torch.float32, use_safetensors=True)
        UpdateVector.from_folders(ini, un, importance=imp).apply(model, coef)
        live = model.state_dict()
        sharded = torch.load(tmp_path / f"sharded-{name}.pt", weights_only=True)
        for key, value in serial.items():
            assert torch.equal(overlapped[key], value), (name, key)
            assert torch.equal(live[key], value), (name, key)
            assert torch.equal(sharded[key], value), (name, key)
        if name == "zero":  # every coefficient 0: theta_un itself
            assert all(torch.equal(serial[k], v) for k, v in theta_un.items())
        else:
            assert any(not torch.equal(serial[k], v) for k, v in theta_un.items())


def test_the_weighted_form_without_its_importance_is_refused(tmp_path: Path) -> None:
    ini, un, imp = _pair(tmp_path)
    coef = _forms(ini)["weighted"]
    with pytest.raises(UipeError, match="needs an importance folder"):
        extrapolate_folder(ini, un, coef, tmp_path / "out", progress=False)
    (imp / "model.safetensors").unlink()
    save_file({"f_forget.lm_head.weight": torch.zeros(1)}, imp / "model.safetensors")
    with pytest.raises(UipeError, match=r"importance tensor 'f_forget\.[^']+' is missing|has shape"):
        extrapolate_folder(ini, un, coef, tmp_path / "out", progress=False, importance=imp)
    assert not (tmp_path / "out").exists()



class _Bigram(torch.nn.Module):
    """logits[t] = W[input_ids[t]]: a model whose gradients can be worked by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids, attention_mask=None, use_cache=False):  # noqa: ANN001, ARG002 - the HF call shape
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.weight[input_ids])


def test_the_fisher_diagonal_by_hand() -> None:
    from uipe.search.importance import fisher_diagonal

    # W = 0 over 3 tokens: softmax(W[a]) = [1/3, 1/3, 1/3]; predicting y from a, d NLL / d W[a] = p - onehot(y),
    # e.g. y = 1: [1/3, -2/3, 1/3], squared [1/9, 4/9, 1/9]; every other row's gradient is 0.
    # Items (a=0 -> y=1) and (a=0 -> y=2): row 0 gets ([1/9, 4/9, 1/9] + [1/9, 1/9, 4/9]) / 2 = [1/9, 5/18, 5/18].
    # Item (a=2 -> y=0) alone: row 2 = [4/9, 1/9, 1/9].
    model = _Bigram(3)
    forget = fisher_diagonal(model, [([0, 1], [-100, 1]), ([0, 2], [-100, 2])], pad_id=0)["weight"]
    torch.testing.assert_close(forget[0], torch.tensor([1 / 9, 5 / 18, 5 / 18]))
    assert forget[1:].abs().sum() == 0
    retain = fisher_diagonal(model, [([2, 0], [-100, 0])], pad_id=0)["weight"]
    torch.testing.assert_close(retain[2], torch.tensor([4 / 9, 1 / 9, 1 / 9]))
    # the weighted form's scale from these: row 0 moves fully (no retain Fisher), row 2 not at all, row 1 (no
    # evidence either way) stays at theta_un; at lambda 1: s = [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    ini, un = torch.zeros(3, 3), torch.ones(3, 3)
    out = extrapolate_into(ini, un, 1.0, torch.empty(3, 3), importance=(forget, retain, 1.0))
    assert out.tolist() == [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
