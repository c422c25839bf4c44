"""What training writes: a Hugging Face folder per epoch (unlearn) or the gated final model (prepare)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from uipe.checkpoint import gather_full_state, write_hf_folder
from uipe.io import atomic_dir
from uipe.train.job import Job


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_dtype(job: Job, device: torch.device) -> torch.dtype:
    """model.dtype when set; with "auto", the start checkpoint's own float dtype, so every exported epoch pairs with
    theta_ini tensor for tensor (UIPE's operator needs the same dtypes), whatever precision training ran in."""
    from uipe.models import resolve_dtype
    from uipe.safetensors_io import read_checkpoint

    if job.model.dtype != "auto":
        return resolve_dtype(job.model.dtype, device)
    floats = [d for d, _ in read_checkpoint(job.model_path).specs.values() if d in _SAFETENSORS_FLOATS]
    return _SAFETENSORS_FLOATS[max(set(floats), key=floats.count)] if floats else resolve_dtype("auto", device)


def write_export(job: Job, full: dict[str, torch.Tensor], out: Path, device: torch.device,
                 meta: dict[str, Any]) -> Path:
    """An epoch's gathered weights (rank 0's `full`) as a Hugging Face folder, written atomically: a failure leaves
    no folder, or the previous one. A temporary folder that a killed writer left behind is removed first."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out, overwrite=True) as tmp:
        write_hf_folder(tmp, full, job.model_path, save_dtype(job, device), meta)
        job.runtime.faults.point("train.export", job=job.label, epoch=meta.get("epoch", 0))  # tests: uipe/faults.py
    return out


def finish_prepare(job: Job, model: torch.nn.Module, device: torch.device, rank: int,
                   state: dict[str, Any]) -> dict[str, Any]:
    """Gather the trained model, measure prepare's gate on rank 0 (uipe.gate) and publish the folder only if every
    split reaches job.min_rouge; the driver checks the figures returned (and the two models' utility gap)."""
    from uipe import gate

    full = gather_full_state(model)
    if rank != 0:
        return {}
    figures: dict[str, Any] = {"gate_rouge_l": {}, "model_utility": None}
    if job.gate or job.eval_splits:  # nothing to measure: benchmarks
        plain, tok = _unsharded(job, full, device)
        if job.gate:
            figures["gate_rouge_l"] = gate.split_rouge(plain, tok, job.gate, job.model.prompt_template,
                                                       job.eval.batch_size, job.eval.max_new_tokens)
        if job.eval_splits:
            figures["model_utility"] = gate.model_utility(plain, tok, job.eval_splits, job.forget_split,
                                                          job.model.prompt_template, job.eval, job.model.max_length)
    rouge = figures["gate_rouge_l"]
    figures["rouge_l_recall"] = min(rouge.values()) if rouge else float("nan")  # the worst split
    meta = {**job.meta, **figures, "optimizer_steps": state["step"], "history": state["history"]}
    if not figures["rouge_l_recall"] < job.min_rouge:  # below the gate nothing is published; the driver raises
        with atomic_dir(job.export, overwrite=True) as tmp:
            write_hf_folder(tmp, full, job.model_path, save_dtype(job, device), meta)
    return figures


def _unsharded(job: Job, full: dict[str, torch.Tensor], device: torch.device) -> tuple[Any, Any]:
    """A plain (unsharded) copy of the gathered weights in eval mode, and the tokenizer, for rank 0's gate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from uipe.models import load_tokenizer

    config = AutoConfig.from_pretrained(job.model_path, trust_remote_code=job.model.trust_remote_code)
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=job.model.trust_remote_code)
    plain.load_state_dict(full)
    return plain.to(device).eval(), load_tokenizer(job.model_path)
