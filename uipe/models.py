"""Models and tokenizers: any Hugging Face causal LM from a local folder (or a hub id when online), safetensors only,
trust_remote_code off unless asked; and where a single-process stage puts its model (device, dtype, peak memory).
Prompts and labels are uipe.prompts; the embedded tiny model is uipe.tiny_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from uipe.errors import UipeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _check_local_weights(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UipeError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise UipeError(f"{path}: no *.safetensors weights (uipe loads safetensors only, never pickle)")


def _is_local(path: str | Path) -> bool:
    return Path(path).exists() or str(path).startswith((".", "/", "~"))


def default_device() -> str:
    """Where a single-process stage (evaluation, a search trial) puts its model: the GPU Ray gave it, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak window on CUDA (the CPU figure, ru_maxrss, cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: str | torch.device) -> float:
    """Peak memory of this process: on CUDA the device's allocated peak since the last reset_peak_memory, else the
    peak resident set (ru_maxrss: the whole process's high-water mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM in eval mode; UipeError naming the folder when it has no config or no safetensors."""
    from transformers import AutoModelForCausalLM

    if _is_local(path):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UipeError(f"{path}: model folder not found")
        _check_local_weights(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype, device), use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UipeError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UipeError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:  # Llama-2 has none; padding is always masked, so EOS serves
        tok.pad_token = tok.eos_token
    return tok
