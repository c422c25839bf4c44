"""UIPE's coefficients beyond one alpha: which alpha each tensor gets, and optional per-element importance scales.

UIPE (arXiv 2503.04693, eq. 4) moves every parameter by the same alpha:
    theta = theta_un + alpha * (theta_un - theta_ini).
The forms here keep that operator and refine its coefficient (issue 26):
- `global`: one alpha for every tensor (the paper's; the default);
- `groups`: one alpha per parameter group (mergekit-style filters on module names and depth), each parameter in
  exactly one group: theta[k] = theta_un[k] + alpha_g(k) * v[k];
- `weighted`: alpha times a per-element scale s = f_forget / (f_forget + retain_lambda * f_retain) in [0, 1], from
  diagonal Fisher estimates of the forget and the retain loss at theta_un ("per-parameter task arithmetic", arXiv
  2601.22030): elements that matter to the retain set barely move;
- any form with an anchor: theta_e + alpha * (theta_e - theta_e'), e' < e (ExPO), theta_ini being epoch 0.

This module is pure: names and numbers in, per-tensor coefficients out. The arithmetic is the one kernel every path
shares (uipe.extrapolate.extrapolate_into).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from uipe.errors import UipeError
from uipe.schema import Strict

FORMS = ("global", "groups", "weighted")
GROUP_PREFIX = "alpha_"  # a group's coefficient in a trial's config and the results: alpha_<group>
LAMBDA_KEY, ANCHOR_KEY, ANCHOR_EPOCH = "retain_lambda", "anchor_gap", "anchor_epoch"
# A block's index in a parameter name: Llama/Mistral/Qwen "layers.N.", GPT-2 "h.N.", others "blocks.N.".
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def is_coefficient(key: str) -> bool:
    """A key of a form's coefficient vector (`Extrapolation.vector`): alpha_<group>, retain_lambda, anchor_epoch."""
    return key.startswith(GROUP_PREFIX) or key in (LAMBDA_KEY, ANCHOR_EPOCH)


class Group(Strict):
    """Parameters whose names match any of `patterns` (fnmatch) and, with `depth`, whose decoder block's midpoint
    lies in [depth[0], depth[1]) of the model's depth ((block index + 0.5) / number of blocks)."""

    patterns: list[str] = Field(min_length=1)
    depth: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _depth(self) -> Group:
        if self.depth is not None and not 0 <= self.depth[0] < self.depth[1] <= 1:
            raise ValueError(f"depth {list(self.depth)} must satisfy 0 <= low < high <= 1")
        return self


def _thirds(kind: list[str]) -> dict[str, Group]:
    return {f"{name}": Group(patterns=kind, depth=d) for name, d in
            (("lower", (0.0, 1 / 3)), ("middle", (1 / 3, 2 / 3)), ("upper", (2 / 3, 1.0)))}


# The default: embeddings; attention and MLP of the lower, middle and upper third; final norm and head.
# Each block's norms go with the sub-layer they feed (input_layernorm -> attention, post_attention -> MLP).
DEFAULT_GROUPS: dict[str, Group] = {
    "embed": Group(patterns=["*embed_tokens*", "*wte*", "*wpe*"]),
    **{f"attn_{k}": g for k, g in _thirds(["*self_attn*", "*input_layernorm*", "*.attn.*", "*ln_1*"]).items()},
    **{f"mlp_{k}": g for k, g in _thirds(["*mlp*", "*post_attention_layernorm*", "*ln_2*"]).items()},
    "head": Group(patterns=["model.norm.*", "*lm_head*", "*ln_f*", "*final_layernorm*"]),
}


def _block(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def _in_group(name: str, group: Group, blocks: int) -> bool:
    if not any(fnmatch.fnmatchcase(name, p) for p in group.patterns):
        return False
    if group.depth is None:
        return True
    b = _block(name)
    if b is None or blocks == 0:
        return False
    low, high = group.depth
    return low <= (b + 0.5) / blocks < high  # the block's midpoint: 2 blocks fall in the lower and upper thirds


def assign_groups(names: Sequence[str], groups: Mapping[str, Group], where: str = "groups") -> dict[str, str]:
    """Tensor name -> its group. Every name in exactly one group, or a UipeError naming the first that is not."""
    blocks = max((b for n in names if (b := _block(n)) is not None), default=-1) + 1
    out = {}
    for name in names:
        hits = [g for g, spec in groups.items() if _in_group(name, spec, blocks)]
        if len(hits) != 1:
            what = "no group" if not hits else f"two groups ({', '.join(hits[:2])})"
            raise UipeError(f"{where}: tensor {name!r} is in {what}; every parameter must be in exactly one")
        out[name] = hits[0]
    return out


@dataclass(frozen=True)
class Extrapolation:
    """One point of a search: its epoch, its form's coefficients and its anchor.

    `alpha`: the global coefficient (global, weighted); for `groups`, the parameter-weighted mean of the group
    alphas (set by `resolve`), so alpha 0 is the base method in every form. `anchor`: the base epoch e' (0: theta_ini).
    """

    epoch: int
    alpha: float = 0.0
    group_alphas: Mapping[str, float] = field(default_factory=dict)
    retain_lambda: float | None = None
    anchor: int = 0

    @property
    def form(self) -> str:
        return "groups" if self.group_alphas else "weighted" if self.retain_lambda is not None else "global"

    @property
    def is_base(self) -> bool:
        """The base method's own checkpoint: every coefficient 0."""
        return self.alpha == 0 and not any(self.group_alphas.values())

    def vector(self) -> dict[str, float]:
        """The full coefficient vector beyond (alpha, epoch), for results.csv, MLflow and the registry's tags."""
        out = {f"{GROUP_PREFIX}{g}": float(a) for g, a in sorted(self.group_alphas.items())}
        if self.retain_lambda is not None:
            out[LAMBDA_KEY] = float(self.retain_lambda)
        if self.anchor:
            out[ANCHOR_EPOCH] = float(self.anchor)
        return out

    @classmethod
    def from_vector(cls, epoch: int, alpha: float, vector: Mapping[str, float]) -> Extrapolation:
        """`vector()`'s inverse: a recorded point (a results.csv row, a TrialResult)."""
        groups = {k[len(GROUP_PREFIX):]: float(v) for k, v in vector.items() if k.startswith(GROUP_PREFIX)}
        lam = vector.get(LAMBDA_KEY)
        return cls(int(epoch), float(alpha), groups, None if lam is None else float(lam),
                   int(vector.get(ANCHOR_EPOCH, 0)))

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Extrapolation:
        """A trial's config (Tune's): alpha / alpha_<group>..., epoch, retain_lambda, anchor_gap (e' = e - gap,
        at least 0: a gap of e or more extrapolates from theta_ini)."""
        epoch = int(config["epoch"])  # type: ignore[arg-type]
        groups = {k[len(GROUP_PREFIX):]: float(v) for k, v in config.items()  # type: ignore[arg-type]
                  if k.startswith(GROUP_PREFIX)}
        lam = config.get(LAMBDA_KEY)
        gap = int(config.get(ANCHOR_KEY, epoch))  # type: ignore[arg-type]
        return cls(epoch, float(config.get("alpha", 0.0)), groups,  # type: ignore[arg-type]
                   None if lam is None else float(lam), max(0, epoch - gap))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Coefficients:
    """Per-tensor coefficients of one extrapolation, resolved against a checkpoint's tensor names: what the kernel
    reads. `alphas` None: `alpha` for every tensor. `retain_lambda` set: the weighted form's scales are computed
    per element from the importance estimates (uipe.extrapolate.weighted_scale)."""

    alpha: float = 0.0
    alphas: Mapping[str, float] | None = None
    retain_lambda: float | None = None

    def of(self, name: str) -> float:
        return self.alpha if self.alphas is None else self.alphas[name]

    @property
    def weighted(self) -> bool:
        return self.retain_lambda is not None


def check_coefficient(value: object, what: str = "alpha") -> float:
    """A finite float, or a UipeError naming the bad value."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UipeError(f"{what} must be a finite number, got {value!r}")
    return number


def resolve(point: Extrapolation, sizes: Mapping[str, int], groups: Mapping[str, Group] | None = None,
            where: str = "groups") -> tuple[Extrapolation, Coefficients]:
    """The point with its summary alpha filled in, and its per-tensor coefficients over `sizes` (tensor name ->
    element count). A groups point must name exactly the groups given; a weighted point needs a positive lambda."""
    check_coefficient(point.alpha)
    if point.retain_lambda is not None and not check_coefficient(point.retain_lambda, LAMBDA_KEY) > 0:
        raise UipeError(f"{LAMBDA_KEY} must be positive, got {point.retain_lambda}")
    if not point.group_alphas:
        return point, Coefficients(point.alpha, None, point.retain_lambda)
    groups = groups or DEFAULT_GROUPS
    if set(point.group_alphas) != set(groups):
        extra = sorted(set(point.group_alphas) ^ set(groups))
        raise UipeError(f"{where}: coefficient vector has {len(point.group_alphas)} group alphas for {len(groups)} "
                        f"groups (first mismatch: {extra[0]!r})")
    member = assign_groups(sorted(sizes), groups, where)
    alphas = {k: check_coefficient(point.group_alphas[g], f"{GROUP_PREFIX}{g}") for k, g in member.items()}
    total = sum(sizes.values())
    mean = sum(alphas[k] * sizes[k] for k in sizes) / total if total else 0.0
    summary = Extrapolation(point.epoch, mean, point.group_alphas, point.retain_lambda, point.anchor)
    return summary, Coefficients(mean, alphas, point.retain_lambda)
