"""What every objective shares: the batch it sees, answer-token log-probabilities, and the Protocol.

Losses count answer tokens only: labels are IGNORE on the prompt and on padding (uipe.prompts.encode_qa / collate),
and a causal LM predicts token t+1 from position t, so logits[:, :-1] are scored against labels[:, 1:].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uipe.prompts import IGNORE
from uipe.schema import Strict

TensorDict = dict[str, Tensor]


@dataclass(frozen=True)
class Batch:
    """One micro-batch of each stream an objective reads (each a collate() dict: input_ids, attention_mask, labels).

    forget: the forget set (for `finetune`: the fine-tuning data); retain: the retain set; idk: the forget questions
    with an "I don't know" answer (IdkDPO only).
    """

    forget: TensorDict
    retain: TensorDict | None = None
    idk: TensorDict | None = None


Metrics = dict[str, Tensor]  # detached scalars; the loop averages them and logs floats


class Compute(Protocol):
    def __call__(
        self, model: nn.Module, ref_model: nn.Module | None, batch: Batch, params: Any
    ) -> tuple[Tensor, Metrics]: ...


@dataclass(frozen=True)
class Objective:
    """A method: its loss (compute) and which inputs the loop must provide."""

    name: str
    compute: Compute
    params: type[Strict] | None = None  # the method's parameters (a pydantic model, config key unlearn.<name>)
    needs_ref: bool = False  # a frozen copy of theta_ini (NPO, KL, IdkDPO)
    needs_retain: bool = True  # a retain micro-batch paired with each forget micro-batch
    needs_idk: bool = False  # "I don't know" answers for the forget questions (IdkDPO)
    # Which parameters the method trains: (params, parameter name) -> trained; None: all. The loop freezes the
    # others before sharding and gives the optimizer only the trained ones, so the rest stay bit-identical (RMU).
    trainable: Callable[[Any, str], bool] | None = None
    # Checks the params against the model (its Hugging Face config), e.g. RMU's layer within the model's depth:
    # raises UipeError, one line. Called before a fit starts, so bad input fails before any worker does.
    check: Callable[[Any, Any], None] | None = None


def logits_of(model: nn.Module, inputs: TensorDict) -> Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits


def answer_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: sum of log p(answer token) and the number of answer tokens, shapes [B] and [B].

    logits [B, T, V] predict labels shifted by one; positions labelled -100 count neither in the sum nor the count.
    Computed in fp32 so bf16 logits do not lose the small differences NPO/DPO ratios depend on.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask).sum(-1), mask.sum(-1)


def answer_token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(answer token) of every answer token of the batch, flattened to [N] (N answer tokens; fp32).

    For token-weighted losses (WGA, SatImp); a batch without answer tokens is an error, not an empty mean.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    if int(mask.sum()) == 0:
        raise ValueError("batch has no answer tokens (every label is -100)")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask]


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean answer-token NLL over the batch: -(sum of all answer-token log-probs) / (number of answer tokens).

    Token-weighted like Hugging Face's causal-LM loss; a batch without answer tokens is an error, not a NaN.
    """
    logp_sum, count = answer_logprobs(logits, labels)
    total = count.sum()
    if int(total) == 0:
        raise ValueError("batch has no answer tokens (every label is -100)")
    return -logp_sum.sum() / total


def nll_of(model: nn.Module, inputs: TensorDict) -> Tensor:
    return mean_nll(logits_of(model, inputs), inputs["labels"])


def sequence_logprobs(model: nn.Module, inputs: TensorDict) -> tuple[Tensor, Tensor]:
    return answer_logprobs(logits_of(model, inputs), inputs["labels"])


def require(batch_part: TensorDict | None, what: str, method: str) -> TensorDict:
    if batch_part is None:
        raise ValueError(f"{method} needs a {what} batch")
    return batch_part


@torch.no_grad()
def monitor_nll(model: nn.Module, inputs: TensorDict | None) -> Tensor | None:
    """NLL for logging only (no graph), e.g. the retain NLL under GA."""
    return None if inputs is None else nll_of(model, inputs).detach()


def with_retain_nll(
    forget_loss: Tensor, forget_nll: Tensor, model: nn.Module, batch: Batch, retain_weight: float, method: str
) -> tuple[Tensor, Metrics]:
    """forget_loss + retain_weight * NLL_theta(retain), with the metrics every method logs."""
    nll_r = nll_of(model, require(batch.retain, "retain", method))
    loss = forget_loss + retain_weight * nll_r
    return loss, {
        "loss": loss.detach(), "forget_loss": forget_loss.detach(), "retain_loss": nll_r.detach(),
        "forget_nll": forget_nll.detach(), "retain_nll": nll_r.detach(),
    }
