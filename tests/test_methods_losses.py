"""RMU, UNDIAL, WGA and SatImp against numbers worked by hand on 2-token examples; RMU's direction, parameter
selection and checks; a frozen parameter stays bit-identical through an AdamW step with weight decay."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_losses import _batch  # the same prompt, answer and padding layout

from uipe.errors import UipeError
from uipe.methods import OBJECTIVES, Batch
from uipe.methods.common import answer_token_logprobs
from uipe.methods.rmu import Params as RMUParams
from uipe.methods.rmu import activation_loss, check, control_vector, is_trainable
from uipe.methods.satimp import Params as SatImpParams
from uipe.methods.satimp import satimp_loss
from uipe.methods.undial import Params as UNDIALParams
from uipe.methods.undial import undial_loss
from uipe.methods.wga import Params as WGAParams
from uipe.methods.wga import wga_loss
from uipe.train.sharding import freeze_untrained

torch.set_num_threads(1)
LN = math.log


def _logits(*rows: list[float]) -> torch.Tensor:
    """[1, T, V] logits whose softmax is exactly the given probability rows (logit = ln p)."""
    return torch.tensor([[[LN(p) for p in row] for row in rows]], dtype=torch.float64)


# Two answer tokens: position 0 predicts token 1 with p = .5, position 1 predicts token 0 with p = .25; position 2
# predicts nothing.
TWO = _logits([0.5, 0.5], [0.25, 0.75], [0.9, 0.1])
TWO_LABELS = torch.tensor([[-100, 1, 0]])


def _token_logp() -> torch.Tensor:
    logp = answer_token_logprobs(TWO.clone().requires_grad_(True), TWO_LABELS)
    assert logp.tolist() == pytest.approx([LN(0.5), LN(0.25)], abs=1e-6)  # fp32 inside
    return logp


def test_wga_by_hand() -> None:
    # beta 1: w = p -> (.5 ln .5 + .25 ln .25) / 2 = (-0.346574 - 0.346574) / 2 = -0.346574.
    assert wga_loss(_token_logp(), beta=1.0).item() == pytest.approx(-0.346574, abs=1e-6)
    # beta 2: w = p^2 = .25, .0625 -> (.25 (-0.693147) + .0625 (-1.386294)) / 2 = (-0.173287 - 0.086643) / 2.
    logp = _token_logp()
    loss = wga_loss(logp, beta=2.0)
    assert loss.item() == pytest.approx(-0.129965, abs=1e-6)
    # The weight carries no gradient: d loss / d log p_t = w_t / N = .25 / 2, .0625 / 2.
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.tolist() == pytest.approx([0.125, 0.03125], abs=1e-7)
    # beta 0 is plain GA on the token mean: (ln .5 + ln .25) / 2 = -1.039721.
    assert wga_loss(_token_logp(), beta=0.0).item() == pytest.approx(-1.039721, abs=1e-6)


def test_satimp_by_hand() -> None:
    # beta1 = beta2 = 1: w = p (1 - p) = .25, .1875 -> (.25 (-0.693147) + .1875 (-1.386294)) / 2
    # = (-0.173287 - 0.259930) / 2 = -0.216609.
    assert satimp_loss(_token_logp(), 1.0, 1.0).item() == pytest.approx(-0.216609, abs=1e-6)
    # Defaults beta1 5, beta2 1: w = .5^5 * .5 = .015625 and .25^5 * .75 = .000732422
    # -> (.015625 (-0.693147) + .000732422 (-1.386294)) / 2 = (-0.010830 - 0.001015) / 2 = -0.005922885.
    logp = _token_logp()
    loss = satimp_loss(logp, SatImpParams().beta1, SatImpParams().beta2)
    assert loss.item() == pytest.approx(-0.005922885, abs=1e-8)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.tolist() == pytest.approx([0.015625 / 2, 0.000732421875 / 2], abs=1e-7)


def test_undial_by_hand() -> None:
    # Teacher: position 0 [.5, .5], position 1 [.25, .75]. beta = ln 3 divides the next token's teacher
    # probability by 3 before renormalising: position 0 (label 1) -> [.5, .5/3] -> [.75, .25];
    # position 1 (label 0) -> [.25/3, .75] -> [.1, .9].
    # Student: position 0 [.25, .75]: CE = -(.75 ln .25 + .25 ln .75) = 1.039721 + 0.071921 = 1.111641;
    # position 1 [.2, .8]: CE = -(.1 ln .2 + .9 ln .8) = 0.160944 + 0.200829 = 0.361773. Mean: 0.736707.
    teacher = _logits([0.5, 0.5], [0.25, 0.75], [0.9, 0.1])
    student = _logits([0.25, 0.75], [0.2, 0.8], [0.5, 0.5])
    assert undial_loss(student, teacher, TWO_LABELS, LN(3)).item() == pytest.approx(0.736707, abs=1e-6)
    # Position 0 unlabelled (prompt): its target is the unadjusted teacher [.5, .5]:
    # CE = -(.5 ln .25 + .5 ln .75) = 0.693147 + 0.143841 = 0.836988; mean with position 1: 0.599381.
    prompt = torch.tensor([[-100, -100, 0]])
    assert undial_loss(student, teacher, prompt, LN(3)).item() == pytest.approx(0.599381, abs=1e-6)
    # beta 0: plain distillation to the teacher, minimised (CE = teacher entropy) when the student is the teacher.
    entropy = -(0.5 * LN(0.5) * 2 + 0.25 * LN(0.25) + 0.75 * LN(0.75)) / 2
    assert undial_loss(teacher, teacher, TWO_LABELS, 0.0).item() == pytest.approx(entropy, abs=1e-6)


def test_rmu_activation_loss_by_hand() -> None:
    # d = 2, target 0. Sequence A, labels [-100, 5, 6]: answer tokens at positions 1 and 2 with activations [1, 2]
    # and [3, 0] -> mean_d squares 2.5 and 4.5, S_A = 7, n_A = 2 (position 0, the prompt, [9, 9], does not count).
    a = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 0.0]]])
    labels_a = torch.tensor([[-100, 5, 6]])
    assert activation_loss(a, torch.zeros_like(a), labels_a).item() == pytest.approx(7 / 2)
    # With sequence B, labels [-100, -100, 7], one answer token [2, 2] -> S_B = 4, n_B = 1:
    # mean_b(S_b) * mean_b(1/n_b) = 5.5 * .75 = 4.125 (open-unlearning's normalisation; per-sequence means give 3.75).
    b = torch.tensor([[[5.0, 5.0], [7.0, 7.0], [2.0, 2.0]]])
    both, labels = torch.cat([a, b]), torch.cat([labels_a, torch.tensor([[-100, -100, 7]])])
    assert activation_loss(both, torch.zeros_like(both), labels).item() == pytest.approx(4.125)
    with pytest.raises(ValueError, match="no answer tokens"):
        activation_loss(a, a, torch.full((1, 3), -100))


def test_rmu_direction_is_seeded_and_scaled() -> None:
    u = control_vector(0, 16, 2.0)
    assert u.shape == (1, 1, 16) and float(u.norm()) == pytest.approx(2.0, abs=1e-6) and bool((u >= 0).all())
    # The same draw as WMDP/open-unlearning's torch.rand after torch.manual_seed(seed), from its own generator.
    torch.manual_seed(0)
    raw = torch.rand(1, 1, 16)
    assert torch.equal(u, raw / raw.norm() * 2.0)
    assert not torch.equal(control_vector(1, 16, 2.0), u)


def test_rmu_selects_the_wmdp_parameters_and_checks_the_layer() -> None:
    p = RMUParams()  # layer 7: down-projections of layers 5, 6, 7
    assert [is_trainable(p, f"model.layers.{i}.mlp.down_proj.weight") for i in (4, 5, 6, 7, 8)] == [
        False, True, True, True, False]
    assert not is_trainable(p, "model.layers.7.mlp.up_proj.weight")
    assert not is_trainable(p, "model.layers.17.mlp.down_proj.weight")  # full match: 17 is not 7
    assert [is_trainable(RMUParams(layer=1), f"model.layers.{i}.mlp.down_proj.weight") for i in (0, 1, 2)] == [
        True, True, False]
    assert is_trainable(RMUParams(trainable_params=[".*"]), "lm_head.weight")
    cfg = _tiny_config()  # 3 layers
    check(RMUParams(layer=2), cfg)
    with pytest.raises(UipeError, match=r"unlearn.rmu.layer: 3 is beyond the model's depth \(3 decoder layers"):
        check(RMUParams(layer=3), cfg)
    with pytest.raises(UipeError, match="unlearn.rmu.trainable_params: .* match no parameter"):
        check(RMUParams(layer=2, trainable_params=["model\\.nothing"]), cfg)
    with pytest.raises(ValueError, match="not a regular expression"):
        RMUParams(trainable_params=["("])


# ---- compute() on a tiny model -------------------------------------------------------------------------------------


def _tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def test_methods_at_theta_ini_start_at_their_known_values() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config()).float()
    ref = copy.deepcopy(model).eval()
    batch = Batch(forget=_batch(1, bsz=3), retain=_batch(2, bsz=3))
    _, m = OBJECTIVES["rmu"].compute(model, ref, batch, RMUParams(layer=1))
    assert m["retain_loss"].item() == 0.0  # theta == theta_ini: the retain activations are equal
    assert m["forget_loss"].item() > 0 and m["loss"].item() == pytest.approx(m["forget_loss"].item())
    # UNDIAL at beta 0 distils theta_ini into itself: CE = the teacher's entropy, so the retain NLL term adds 0 here.
    _, m = OBJECTIVES["undial"].compute(model, ref, batch, UNDIALParams(beta=0.0))
    assert m["loss"].item() == pytest.approx(m["forget_loss"].item())
    for name, params in (("wga", WGAParams(beta=0.0, retain_weight=0.0)),
                         ("satimp", SatImpParams(beta1=0.0, beta2=0.0, forget_weight=1.0, retain_weight=0.0))):
        _, m = OBJECTIVES[name].compute(model, ref, batch, params)
        assert m["loss"].item() == pytest.approx(-m["forget_nll"].item(), abs=1e-6), name  # weights 1: plain GA


def test_frozen_parameters_stay_bit_identical_through_a_step() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config()).float()
    ref = copy.deepcopy(model).eval()
    params = RMUParams(layer=1)  # trains model.layers.{0,1}.mlp.down_proj.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze_untrained(model, lambda n: is_trainable(params, n))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 2
    opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)  # weight decay would move any param it holds
    loss, _ = OBJECTIVES["rmu"].compute(model, ref, Batch(forget=_batch(1, bsz=3), retain=_batch(2, bsz=3)), params)
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if is_trainable(params, name):
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


def test_the_new_methods_validate_against_the_paper_config_on_cpu() -> None:
    """configs/tofu_llama2_7b.yaml with the four new methods: the config loads, each method's parameters resolve and
    its check runs on Llama-2-7B's shapes (a meta-device model: no weights, no memory, no hub)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from uipe.config import load_config
    from uipe.methods import get_objective

    paper = Path(__file__).resolve().parent.parent / "configs" / "tofu_llama2_7b.yaml"
    cfg = load_config(paper, ["unlearn.methods=[rmu,undial,wga,satimp]"])
    llama_7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32)
    for method in cfg.unlearn.methods:
        objective = get_objective(method)
        if objective.check is not None:
            objective.check(cfg.method_params(method), llama_7b)
    # RMU's default layer 7 trains layers 5-7's down projections: 3 x 4096 x 11008 = 135,266,304 of 6.74B parameters
    with torch.device("meta"):
        named = dict(AutoModelForCausalLM.from_config(llama_7b).named_parameters())
    trained = [n for n in named if is_trainable(cfg.method_params("rmu"), n)]
    assert trained == [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]
    assert sum(named[n].numel() for n in trained) == 135_266_304
    with pytest.raises(UipeError, match=r"^unlearn.rmu.layer: 32 is beyond the model's depth \(32 decoder layers"):
        check(RMUParams(layer=32), llama_7b)
