"""FSDP2 on the training workers: shard a model per decoder block, load it sharded, reduce metrics over ranks.

`load_sharded` never materialises the whole model on a rank (issue 11): the model is built on the meta device, sharded
with `fully_shard`, given empty storage for its own shards only (`to_empty`), and each rank then copies its own rows
of every parameter straight from the safetensors files (mmap views: only the pages of those rows are read). Peak
memory per rank is its shards plus, at most, one tensor (a parameter whose placement is not FSDP2's plain dim-0
shard is read whole, then cut by `distribute_tensor`). A model on one rank in fp32 is built and filled the same way
but not wrapped: FSDP2 would shard nothing there, only add its hooks (the same numbers: tests/test_sharding.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uipe.coefficients import Coefficients
from uipe.errors import UipeError
from uipe.extrapolate import Importance, as_coefficients, extrapolate_into
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


def load_sharded(job: Job, device: torch.device, mesh: Any, trainable: bool,
                 train_only: Callable[[str], bool] | None = None) -> torch.nn.Module:
    """theta_ini (job.model_path), sharded over `mesh`: the trainable model in fp32 (master weights) in train mode,
    or the frozen reference (trainable=False) in the compute dtype, eval mode, no gradients. `train_only`: of the
    trainable model, only the parameters it accepts (by name) require gradients (freeze_untrained).

    On GPU, compute is bf16 (MixedPrecisionPolicy) unless job.model.dtype is "float32"; on CPU it is fp32. The
    reference is stored in that compute dtype (half the memory of fp32 on GPU): it is never updated, and FSDP2 would
    cast its weights to bf16 before every forward anyway.
    """
    from uipe.models import resolve_dtype

    bf16 = device.type == "cuda" and job.model.dtype != "float32"
    compute = resolve_dtype(job.model.dtype, device) if device.type == "cuda" else torch.float32
    model = build_sharded(job.model_path, device, mesh, torch.float32 if trainable else compute, bf16,
                          job.train.reshard_after_forward, job.model.trust_remote_code)
    if trainable:
        if train_only is not None:
            freeze_untrained(model, train_only)
        return model.train()
    model.requires_grad_(False)
    return model.eval()


def reload_initial(model: nn.Module, model_path: str) -> None:
    """theta_ini back into this rank's shards of `model`, in place (the next job of a group starts where a fresh load
    would: the same reads into the same storage; the page cache serves them)."""
    from uipe.safetensors_io import read_checkpoint

    load_own_shards(model, read_checkpoint(local_weights(model_path)))


def freeze_untrained(model: nn.Module, train_only: Callable[[str], bool]) -> None:
    """requires_grad False on every parameter none of whose names (tied aliases included) `train_only` accepts.

    On the sharded parameters, before the first forward: FSDP2 reads each sharded parameter's requires_grad when it
    lazily initialises and copies it to the gathered parameter on every all-gather, so a frozen one gets no gradient
    and no reduce-scatter. The loop also leaves it out of the optimizer (no step, no weight decay): bit-identical."""
    by_id: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), (param, []))[1].append(name)
    for param, names in by_id.values():
        param.requires_grad_(any(train_only(n) for n in names))


def build_sharded(model_path: str, device: torch.device, mesh: Any, dtype: torch.dtype, bf16: bool,
                  reshard_after_forward: bool = True, trust_remote_code: bool = False,
                  unlearned: str | None = None, alpha: float | Coefficients = 0.0,
                  importance: str | None = None) -> nn.Module:
    """The model of `model_path` (a local HF folder or a hub id), FSDP2-sharded, its parameters in `dtype`, each
    rank holding and reading only its own shards. With `unlearned` (theta_un's folder; model_path is theta_ini), the
    weights are UIPE's theta_un + alpha*(theta_un - theta_ini), each rank extrapolating only its own rows (a sharded
    search trial; `alpha` may be per-tensor coefficients, `importance` the weighted form's folder). A collective:
    every rank of `mesh` calls it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from uipe.safetensors_io import read_checkpoint, validate_pair

    ckpt = read_checkpoint(local_weights(model_path))  # headers only; UipeError naming the file if unreadable
    un_ckpt = read_checkpoint(unlearned) if unlearned else None
    if un_ckpt is not None:
        validate_pair(ckpt, un_ckpt)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    aliases = tied_groups(model)
    if mesh.size() > 1 or bf16:
        model = shard_model(model, mesh, bf16, reshard_after_forward)
    # else one rank in fp32 (prepare's models side by side, train.num_workers=1, on CPU): FSDP2 would shard nothing,
    # and its hooks and DTensor arithmetic cost ~1.25x per step on the tiny preset, ~1.1x at 18M parameters
    # (docs/BENCHMARKS.md); the same numbers unwrapped. With bf16, FSDP2's mixed precision sets the compute dtype, so
    # it stays even on one rank.
    model.to_empty(device=device)  # storage for this rank's shards (and the buffers), uninitialised
    for names in aliases:  # fully_shard and to_empty keep shared parameters shared; checked, not assumed
        first = model.get_parameter(names[0])
        if any(model.get_parameter(n) is not first for n in names[1:]):
            raise UipeError(f"{model_path}: tied parameters {names} came apart when sharded; not supported")
    load_own_shards(model, ckpt, un_ckpt, alpha, read_checkpoint(importance) if importance else None)
    recompute_non_persistent_buffers(model, device, dtype)
    return model


def local_weights(model_path: str) -> Path:
    """The folder holding the safetensors weights: the path itself, or a hub id's snapshot in the HF cache (the
    weight files and their index only; from_pretrained would download the same files)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    except Exception as e:  # noqa: BLE001 - hub errors (offline, unknown id, gated) become one line
        raise UipeError(f"{model_path}: not a local folder, and its weights cannot be fetched ({e})") from None


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names sharing one parameter object (tied embeddings: lm_head.weight is embed_tokens.weight), in model order."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def dim0_rows(param: Any) -> tuple[int, int] | None:
    """The rows [start, stop) of the full tensor this rank holds when `param` is a DTensor sharded on dim 0 over a
    1-D mesh with torch.chunk semantics (FSDP2: chunk c = ceil(n / world), rank r holds [r c, min(n, (r+1) c)),
    possibly empty); None for any other placement. The local shape is checked, not assumed."""
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        return None
    n, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    c = math.ceil(n / world)
    start, stop = min(n, rank * c), min(n, (rank + 1) * c)
    local = param.to_local()
    if tuple(local.shape) != (stop - start, *param.shape[1:]):
        return None  # another sharding rule than expected: fall back to distribute_tensor
    return start, stop


@torch.no_grad()
def load_own_shards(model: nn.Module, ckpt: Any, unlearned: Any = None, alpha: float | Coefficients = 0.0,
                    importance: Any = None) -> None:
    """Fill every parameter's local shard and every persistent buffer from the checkpoint, one tensor at a time, in
    file order; with `unlearned` (theta_un's Checkpoint, ckpt being theta_ini's), with theta_un + alpha*(theta_un -
    theta_ini) of those rows instead (extrapolate_into: the arithmetic of every other form of the operator). Every key
    of the model's state_dict must be in the checkpoint (a tied alias may be absent when the other name is present, as
    save_pretrained writes it); keys of the checkpoint that the model has no tensor for are ignored (e.g. the rotary
    inv_freq some old checkpoints carry, which the model recomputes), as from_pretrained does.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from uipe.safetensors_io import ShardReader

    state = model.state_dict(keep_vars=True)  # params (FSDP2's sharded DTensors, original names), persistent buffers
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    wanted: set[str] = set()  # one checkpoint key per tensor object
    for names in groups.values():
        key = next((n for n in names if n in ckpt.weight_map), None)
        if key is None:
            raise UipeError(f"{ckpt.folder}: tensor {names[0]!r} of the model is not in the checkpoint")
        want, got = tuple(state[key].shape), ckpt.specs[key][1]
        if want != got:
            raise UipeError(f"{ckpt.folder}: tensor {key!r} has shape {list(got)}, the model expects {list(want)}")
        wanted.add(key)
    coef = as_coefficients(alpha)
    weights = Importance(coef if unlearned is not None else Coefficients(), importance, unlearned or ckpt)
    with ShardReader(ckpt) as reader, ShardReader(unlearned or ckpt) as un_reader, weights:
        def fill(out: torch.Tensor, key: str, rows: tuple[int, int] | None = None) -> None:
            cut = (lambda t: t[rows[0]:rows[1]]) if rows else (lambda t: t)  # mmap views: only these rows are read
            if unlearned is None:
                out.copy_(cut(reader.get(key)))
            else:
                extrapolate_into(cut(reader.get(key)), cut(un_reader.get(key)), coef.of(key), out, None,
                                 weights.get(key, cut))

        for shard in ckpt.shards:
            for key in reader.keys(shard):
                if key not in wanted:
                    continue
                target = state[key]
                if not isinstance(target, DTensor):
                    fill(target, key)
                    continue
                rows = dim0_rows(target)
                if rows is not None:
                    fill(target.to_local(), key, rows)
                else:  # one whole tensor, cut locally (src_data_rank=None: no communication)
                    full = torch.empty(target.shape, dtype=target.dtype, device=target.device)
                    fill(full, key)
                    part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                    target.to_local().copy_(part.to_local())
                    del full, part


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else old)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def recompute_non_persistent_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Non-persistent buffers (e.g. Llama's rotary inv_freq) are computed in __init__ and not saved, so after
    to_empty they are garbage. Each module holding some is rebuilt from its config on the CPU (HF's rotary embeddings
    take the config) under the default dtype the model was built with (`dtype`, as from_config sets it), and its
    buffers are moved over. A module that cannot be rebuilt that way (no .config, or it has parameters, whose
    rebuilding could be as large as the model) is refused, naming it."""
    for path, module in model.named_modules():
        names = sorted(b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None)
        if not names:
            continue
        what = f"{type(module).__name__} {path or '(root)'!r} (non-persistent buffers {names})"
        config = getattr(module, "config", None)
        if config is None or next(module.parameters(), None) is not None:
            raise UipeError(f"cannot recompute the buffers of {what}: only parameter-free modules with a .config "
                            "are rebuilt after meta-device loading")
        try:
            with torch.device("cpu"), default_dtype(dtype):
                fresh = type(module)(config)
        except Exception as e:  # noqa: BLE001 - any constructor failure: say which module
            raise UipeError(f"cannot recompute the buffers of {what}: rebuilding it failed ({e})") from e
        for name in names:
            old, new = module._buffers[name], fresh._buffers.get(name)
            if new is None or new.shape != old.shape:
                raise UipeError(f"cannot recompute the buffers of {what}: the rebuilt module's {name!r} is "
                                f"{None if new is None else list(new.shape)}, expected {list(old.shape)}")
            module._buffers[name] = new.to(device=device, dtype=old.dtype)


def sync_gradients(model: nn.Module, sync: bool) -> None:
    """Whether this backward reduces gradients over ranks (FSDP2; a model on one rank is not wrapped: nothing to do)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def full_value(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def mean_over_ranks(sums: dict[str, torch.Tensor], n_micro: int, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
                         + [torch.tensor(float(n_micro), dtype=torch.float64, device=device)])
    dist.all_reduce(packed)
    return {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}
