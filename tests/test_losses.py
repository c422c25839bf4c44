"""Every objective against numbers worked by hand, NLL masking, and the sign of one gradient step on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from uipe.config import GradDiffParams, IdkDPOParams, KLParams, NPOParams, SimNPOParams
from uipe.errors import UipeError
from uipe.methods import OBJECTIVES, UNLEARN_METHODS, Batch, get_objective
from uipe.methods.common import answer_logprobs, mean_nll
from uipe.methods.ga import ga_loss
from uipe.methods.graddiff import graddiff_loss
from uipe.methods.idkdpo import dpo_loss
from uipe.methods.kl import kl_divergence, kl_loss
from uipe.methods.npo import npo_loss
from uipe.methods.simnpo import simnpo_loss

torch.set_num_threads(1)
LN = math.log


def _logits(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows (logit = ln p)."""
    return torch.tensor([[LN(p) for p in row] for row in rows], dtype=torch.float64)


# ---- common: answer-token log-probs and NLL ------------------------------------------------------------------------


def test_answer_logprobs_shift_and_mask() -> None:
    # Sequence A, labels [-100, 1, 0]: position 0 predicts token 1 with p=.75, position 1 predicts token 0 with p=.5;
    # position 2 predicts nothing (no next label). sum = ln .75 + ln .5 = -0.98083, count 2.
    # Sequence B, labels [-100, -100, 1]: only position 1 counts, predicting token 1 with p=.5 -> ln .5, count 1.
    a = _logits([0.25, 0.75], [0.5, 0.5], [0.9, 0.1])
    b = _logits([0.1, 0.9], [0.5, 0.5], [0.3, 0.7])
    logits = torch.stack([a, b])
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    logp, count = answer_logprobs(logits, labels)
    assert count.tolist() == [2, 1]
    assert logp[0].item() == pytest.approx(LN(0.75) + LN(0.5), abs=1e-6)
    assert logp[1].item() == pytest.approx(LN(0.5), abs=1e-6)
    # Token-weighted mean over the 3 answer tokens:
    # -(ln .75 + ln .5 + ln .5) / 3 = (0.287682 + 1.386294) / 3 = 0.557992.
    assert mean_nll(logits, labels).item() == pytest.approx(-(LN(0.75) + 2 * LN(0.5)) / 3, abs=1e-6)
    assert mean_nll(logits, labels).item() == pytest.approx(0.557992, abs=1e-6)


def test_nll_ignores_masked_positions() -> None:
    # Changing logits at positions whose next label is -100 (prompt, padding) must not move the NLL.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 2, 5, -100, -100]])
    before = mean_nll(logits, labels)
    poked = logits.clone()
    poked[0, 0] += 50.0  # predicts labels[0, 1] = -100
    poked[0, 4] += 50.0  # last position: predicts nothing
    poked[1, 3] -= 50.0  # predicts padding
    assert mean_nll(poked, labels).item() == pytest.approx(before.item(), abs=1e-6)
    poked[0, 1, 3] += 5.0  # predicts labels[0, 2] = 3: an answer token, so the NLL must drop
    assert mean_nll(poked, labels).item() < before.item() - 0.1


def test_nll_without_answer_tokens_is_an_error() -> None:
    with pytest.raises(ValueError, match="no answer tokens"):
        mean_nll(torch.zeros(1, 3, 4), torch.full((1, 3), -100))


# ---- each loss by hand ---------------------------------------------------------------------------------------------


def test_ga_and_graddiff_by_hand() -> None:
    # GA: -NLL = -2.0. GradDiff: -2.0 + 2 * 0.5 = -1.0.
    assert ga_loss(torch.tensor(2.0)).item() == -2.0
    assert graddiff_loss(torch.tensor(2.0), torch.tensor(0.5), retain_weight=2.0).item() == pytest.approx(-1.0)


def test_kl_by_hand() -> None:
    # Labels [-100, 5→1, 0]: answer tokens are predicted at positions 0 and 1; position 2 is ignored.
    # Position 0: p_ref = (.5, .5), p_theta = (.25, .75):
    #   KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3) = 0.143841.
    # Position 1: p_ref = p_theta = (.9, .1): KL = 0.  Position 2 differs wildly but is masked.
    # Token mean over 2 answer tokens: 0.071921.
    ref = _logits([0.5, 0.5], [0.9, 0.1], [0.01, 0.99]).unsqueeze(0)
    theta = _logits([0.25, 0.75], [0.9, 0.1], [0.99, 0.01]).unsqueeze(0)
    labels = torch.tensor([[-100, 1, 0]])
    kl = kl_divergence(ref, theta, labels)
    assert kl.item() == pytest.approx(0.5 * LN(4 / 3) / 2, abs=1e-6)
    assert kl.item() == pytest.approx(0.0719205, abs=1e-6)
    # Direction matters: KL(theta || ref) at position 0 = .25 ln(.25/.5) + .75 ln(.75/.5) = 0.130812, halved 0.065406.
    assert kl_divergence(theta, ref, labels).item() == pytest.approx(0.0654060, abs=1e-6)
    # KL Min.: -NLL_f + w * KL = -1.5 + 2 * 0.0719205 = -1.356159.
    assert kl_loss(torch.tensor(1.5), kl, 2.0).item() == pytest.approx(-1.356159, abs=1e-6)


def test_npo_by_hand() -> None:
    # log p_theta = (-10, -4), log p_ref = (-8, -4), beta = .1 -> ratios (-2, 0), -beta*ratio = (.2, 0).
    # log sigmoid(.2) = -ln(1 + e^-.2) = -ln 1.818731 = -0.598139; log sigmoid(0) = -ln 2 = -0.693147.
    # mean = -0.645643; loss = -(2/.1) * -0.645643 = 12.912860.
    loss = npo_loss(torch.tensor([-10.0, -4.0]), torch.tensor([-8.0, -4.0]), beta=0.1)
    assert loss.item() == pytest.approx(12.912860, abs=1e-4)


def test_simnpo_by_hand() -> None:
    # log p = (-6, -2), |y| = (3, 2), beta = 2.5, gamma = .5:
    # -(beta/|y|) log p - gamma = (2.5*2 - .5, 2.5*1 - .5) = (4.5, 2.0).
    # log sigmoid(4.5) = -ln(1 + e^-4.5) = -0.011048; log sigmoid(2) = -ln(1 + e^-2) = -0.126928.
    # mean = -0.068988; loss = -(2/2.5) * -0.068988 = 0.055190.
    loss = simnpo_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 2.0]), beta=2.5, gamma=0.5)
    assert loss.item() == pytest.approx(0.055190, abs=1e-5)


def test_dpo_by_hand() -> None:
    # Item 1: win ratio -5 - (-7) = 2, lose ratio -12 - (-10) = -2, margin 4, beta*margin .4:
    #   log sigmoid(.4) = -ln(1 + e^-.4) = -ln 1.670320 = -0.513015 -> -(2/.1) * -0.513015 = 10.260305.
    # Item 2: all equal, margin 0 -> 20 * ln 2 = 13.862944. Mean: 12.061624.
    loss = dpo_loss(
        torch.tensor([-5.0, -3.0]), torch.tensor([-7.0, -3.0]),
        torch.tensor([-12.0, -9.0]), torch.tensor([-10.0, -9.0]), beta=0.1,
    )
    assert loss.item() == pytest.approx(12.061624, abs=1e-4)


# ---- compute() on a tiny model -------------------------------------------------------------------------------------


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).float()


def _batch(seed: int, bsz: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (bsz, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[0, -2:] = -100  # padding on one row
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_registry_covers_config_methods() -> None:
    from uipe.config import UnlearnConfig

    assert set(UNLEARN_METHODS) | {"finetune"} == set(OBJECTIVES)
    # every method's config section (unlearn.<name>) is the Params model defined beside its loss
    assert {m: UnlearnConfig.model_fields[m].annotation for m in UNLEARN_METHODS} == {
        m: OBJECTIVES[m].params for m in UNLEARN_METHODS}
    assert {m for m, o in OBJECTIVES.items() if o.needs_ref} == {"kl", "npo", "idkdpo", "rmu", "undial"}
    with pytest.raises(UipeError, match="unknown method 'bogus'"):
        get_objective("bogus")


def test_reference_methods_start_at_their_known_values() -> None:
    # At theta == ref: NPO's forget term is (2/beta) ln 2 (every ratio 0), DPO's too, and KL(ref || theta) = 0.
    model = _tiny_model()
    ref = copy.deepcopy(model).eval()
    batch = Batch(forget=_batch(1), retain=_batch(2), idk=_batch(3))
    _, m = OBJECTIVES["npo"].compute(model, ref, batch, NPOParams(beta=0.1))
    assert m["forget_loss"].item() == pytest.approx(20 * LN(2), abs=1e-4)
    assert m["loss"].item() == pytest.approx(20 * LN(2) + m["retain_nll"].item(), abs=1e-4)
    _, m = OBJECTIVES["idkdpo"].compute(model, ref, batch, IdkDPOParams(beta=0.5, retain_weight=0.0))
    assert m["forget_loss"].item() == pytest.approx(4 * LN(2), abs=1e-4)
    assert m["loss"].item() == pytest.approx(4 * LN(2), abs=1e-4)
    _, m = OBJECTIVES["kl"].compute(model, ref, batch, KLParams())
    assert m["retain_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["loss"].item() == pytest.approx(-m["forget_nll"].item(), abs=1e-5)


def test_compute_terms_agree_with_pure_losses() -> None:
    model = _tiny_model()
    batch = Batch(forget=_batch(1), retain=_batch(2))
    with torch.no_grad():
        nll_f = mean_nll(model(input_ids=batch.forget["input_ids"]).logits, batch.forget["labels"]).item()
        nll_r = mean_nll(model(input_ids=batch.retain["input_ids"]).logits, batch.retain["labels"]).item()
    # A random 40-token model sits near ln 40 = 3.69 nats per token.
    assert 3.0 < nll_f < 4.5
    loss, m = OBJECTIVES["graddiff"].compute(model, None, batch, GradDiffParams(retain_weight=0.5))
    # attention_mask zeroes only padding after the answer, so logits at answer positions match the unmasked pass.
    assert loss.item() == pytest.approx(-nll_f + 0.5 * nll_r, abs=1e-5)
    loss, m = OBJECTIVES["simnpo"].compute(model, None, batch, SimNPOParams(beta=2.5, gamma=0.0, retain_weight=0.0))
    assert m["forget_nll"].item() == pytest.approx(nll_f, abs=1e-5)
    assert loss.requires_grad and not m["loss"].requires_grad


@pytest.mark.parametrize(("method", "direction"), [("ga", +1), ("finetune", -1)])
def test_one_sgd_step_moves_forget_nll_the_right_way(method: str, direction: int) -> None:
    model = _tiny_model()
    batch = Batch(forget=_batch(1), retain=_batch(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, m = OBJECTIVES[method].compute(model, None, batch, None)
    before = (m["forget_nll"] if method == "ga" else m["nll"]).item()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = mean_nll(model(input_ids=batch.forget["input_ids"]).logits, batch.forget["labels"]).item()
    assert direction * (after - before) > 0.01, (before, after)
