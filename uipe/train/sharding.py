"""FSDP2 on the training workers: shard a model per decoder block, load it sharded, reduce metrics over ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uipe.train.job import Job


def shard_model(model: nn.Module, mesh: Any, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: fully_shard each decoder block (HF's _no_split_modules names them), then the root.

    bf16 compute with fp32 gradient reduction on GPU (MixedPrecisionPolicy); fp32 on CPU, where bf16 matmuls are slow.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def load_sharded(job: Job, device: torch.device, mesh: Any, trainable: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # fp32 master weights; on GPU the bf16 MixedPrecisionPolicy computes in bf16 unless dtype says float32.
    bf16 = device.type == "cuda" and job.model.dtype != "float32"
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=job.model.trust_remote_code).to(device)
    model = shard_model(model, mesh, bf16, job.train.reshard_after_forward)
    if trainable:
        return model.train()
    model.requires_grad_(False)
    return model.eval()


def full_value(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def mean_over_ranks(sums: dict[str, torch.Tensor], n_micro: int, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
                         + [torch.tensor(float(n_micro), dtype=torch.float64, device=device)])
    dist.all_reduce(packed)
    return {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}
