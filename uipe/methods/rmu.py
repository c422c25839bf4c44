"""RMU, representation misdirection for unlearning (Li et al., "The WMDP Benchmark", arXiv 2403.03218, the RMU
section; its code: github.com/centerforaisafety/wmdp, rmu/unlearn.py).

At one decoder layer l, the activations h_theta(t) of every forget answer token are pushed towards a fixed random
direction c*u, and those of retain answer tokens are held at the frozen theta_ini's h_ini(t):

L_forget = E_f[ mean_d (h_theta(t) - c*u)^2 ],  L_retain = E_r[ mean_d (h_theta(t) - h_ini(t))^2 ],
L = forget_weight * L_forget + retain_weight * L_retain,

u uniform in [0, 1)^d, normalised to length 1 (WMDP's torch.rand, then u / ||u||), c = steering_coeff. h is the
output of `model.layers.<layer>`; answer tokens are those whose own label is not -100. The average over a micro-batch
is open-unlearning's `compute_activation_loss`: S_b = sum over sequence b's answer tokens of mean_d(...), n_b its
number of answer tokens, and the term is mean_b(S_b) * mean_b(1 / n_b) (its [B] / [B, 1] division broadcasts to a
B x B matrix whose mean is that product; it equals mean_b(S_b / n_b) when the answers have equal lengths).

Only some parameters are trained (WMDP: the MLP down-projections of layers l-2, l-1 and l; `trainable_params` takes
full-match regexes over parameter names instead, e.g. [".*"] for all, which is open-unlearning's RMU.yaml). The other
defaults are open-unlearning's RMU.yaml: layer 7, steering_coeff 2, gamma = forget_weight 1, alpha = retain_weight 1,
retain loss EMBED_DIFF. u is drawn once per fit from its own generator seeded with `seed` (recorded with the params).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from uipe.errors import UipeError
from uipe.methods.common import IGNORE, Batch, Metrics, Objective, TensorDict, logits_of, mean_nll, require
from uipe.schema import Strict


class Params(Strict):
    layer: int = Field(7, ge=0)  # the decoder layer whose output is steered (0-based)
    steering_coeff: float = Field(2.0, gt=0)  # c: the length of the target activation
    seed: int = 0  # seeds the random direction u
    trainable_params: list[str] | None = None  # full-match regexes; None: layers l-2..l's mlp.down_proj.weight
    forget_weight: float = Field(1.0, ge=0)  # open-unlearning's gamma
    retain_weight: float = Field(1.0, ge=0)  # open-unlearning's alpha

    @field_validator("trainable_params")
    @classmethod
    def _regexes_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return value


def trainable_patterns(params: Params) -> list[str]:
    if params.trainable_params is not None:
        return params.trainable_params
    layers = "|".join(str(i) for i in range(max(0, params.layer - 2), params.layer + 1))
    return [rf"model\.layers\.({layers})\.mlp\.down_proj\.weight"]


def is_trainable(params: Params, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in trainable_patterns(params))


def check(params: Params, hf_config: Any) -> None:
    """The layer exists and the regexes name at least one parameter (listed from a meta-device model: no memory)."""
    from transformers import AutoModelForCausalLM

    depth = hf_config.num_hidden_layers
    if params.layer >= depth:
        raise UipeError(f"unlearn.rmu.layer: {params.layer} is beyond the model's depth ({depth} decoder layers, "
                        f"0..{depth - 1})")
    with torch.device("meta"):
        names = [n for n, _ in AutoModelForCausalLM.from_config(hf_config).named_parameters(remove_duplicate=False)]
    if not any(is_trainable(params, n) for n in names):
        raise UipeError(f"unlearn.rmu.trainable_params: {trainable_patterns(params)} match no parameter of the model "
                        f"(its names look like {names[1]!r})")


@functools.lru_cache(maxsize=8)
def control_vector(seed: int, dim: int, steering_coeff: float) -> Tensor:
    """c * u / ||u||, u ~ U[0, 1)^dim from a generator seeded with `seed`, shape [1, 1, dim], fp32 on the CPU.

    Drawn once per process and seed, identically on every rank (a CPU generator does not depend on the device)."""
    u = torch.rand(1, 1, dim, generator=torch.Generator().manual_seed(seed))
    return u / torch.norm(u) * steering_coeff


def layer_output(model: nn.Module, inputs: TensorDict, layer: int) -> tuple[Tensor, Tensor]:
    """(the output of model.layers.<layer> [B, T, d], the logits) of one forward pass, read by a forward hook."""
    try:
        module = model.get_submodule(f"model.layers.{layer}")
    except AttributeError:
        raise UipeError(f"rmu: the model has no decoder layer 'model.layers.{layer}'") from None
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        logits = logits_of(model, inputs)
    finally:
        handle.remove()
    return seen[0], logits


def activation_loss(acts: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    """mean_b(S_b) * mean_b(1 / n_b), S_b = sum over b's answer tokens of mean_d (acts - target)^2; [B, T, d] each,
    labels [B, T] (a token counts when its own label is not -100)."""
    mask = (labels != IGNORE).to(torch.float32)
    n = mask.sum(-1)
    if bool((n == 0).any()):
        raise ValueError("a sequence has no answer tokens (every label is -100)")
    per_token = (acts.float() - target.float()).pow(2).mean(-1)
    return (per_token * mask).sum(-1).mean() * (1.0 / n).mean()


def compute(model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Params) -> tuple[Tensor, Metrics]:
    if ref_model is None:
        raise ValueError("rmu needs the reference model")
    retain = require(batch.retain, "retain", "rmu")
    acts_f, logits_f = layer_output(model, batch.forget, params.layer)
    steer = control_vector(params.seed, acts_f.shape[-1], params.steering_coeff).to(acts_f.device)
    forget_loss = activation_loss(acts_f, steer.expand_as(acts_f), batch.forget["labels"])
    acts_r, logits_r = layer_output(model, retain, params.layer)
    with torch.no_grad():
        acts_ini, _ = layer_output(ref_model, retain, params.layer)
    retain_loss = activation_loss(acts_r, acts_ini, retain["labels"])
    loss = params.forget_weight * forget_loss + params.retain_weight * retain_loss
    return loss, {
        "loss": loss.detach(), "forget_loss": forget_loss.detach(), "retain_loss": retain_loss.detach(),
        "forget_nll": mean_nll(logits_f.detach(), batch.forget["labels"]),
        "retain_nll": mean_nll(logits_r.detach(), retain["labels"]),
    }


OBJECTIVE = Objective("rmu", compute, Params, needs_ref=True, trainable=is_trainable, check=check)
