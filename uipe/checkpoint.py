"""What the training loop writes and reads back: complete Hugging Face model folders, sharded training state (torch
DCP) inside Ray Train checkpoints, identities (hashes) that decide whether an old output may be reused.

Every folder is written under a temporary name and renamed when complete (uipe.io.atomic_dir), so a crash never
leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from uipe.errors import UipeError
from uipe.io import sha256_bytes
from uipe.safetensors_io import carried_files
from uipe.stages import META_FILE

STATE_FILE = "state.json"  # epoch, optimizer step, scheduler, history, job hash: beside the DCP shards
DCP_DIR = "dcp"
HF_DIR = "hf"
MAX_SHARD_BYTES = 2 * 2**30  # safetensors shard size of exported model folders


# ---- identities ----------------------------------------------------------------------------------------------------


def config_hash(parts: dict[str, Any]) -> str:
    """sha256 of the settings that change the weights (pydantic models dumped to JSON)."""
    plain = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in parts.items()}
    return sha256_bytes(json.dumps(plain, sort_keys=True, default=str).encode())


def model_identity(folder: str | Path) -> str:
    """A cheap identity of a model folder: config, uipe metadata, and the names and sizes of its weight files.

    Hashing a 7B model's bytes takes minutes; a retrained model changes its uipe_meta.json (data/config hashes).
    """
    folder = Path(folder)
    parts = []
    for name in ("config.json", META_FILE):
        if (folder / name).is_file():
            parts.append((name, (folder / name).read_text()))
    parts += [(p.name, str(p.stat().st_size)) for p in sorted(folder.glob("*.safetensors"))]
    return sha256_bytes(json.dumps(parts).encode())


def require_weights(folder: str | Path, what: str) -> Path:
    """A local HF folder with config.json and safetensors weights, else UipeError naming it (hub ids pass through)."""
    path = Path(folder).expanduser()
    if not path.exists() and not str(folder).startswith((".", "/", "~")) and str(folder).count("/") == 1:
        return path  # a hub id: loaded (and checked) by transformers
    if not (path / "config.json").is_file():
        raise UipeError(f"{what} {path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise UipeError(f"{what} {path}: no *.safetensors weights (uipe loads safetensors only)")
    return path.resolve()


def read_meta(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---- Hugging Face folders ------------------------------------------------------------------------------------------


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU; a collective: every rank calls it, rank 0 gets the tensors, others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def write_hf_folder(out: Path, state: dict[str, torch.Tensor], source: str | Path, dtype: torch.dtype,
                    meta: dict[str, Any], max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Weights as safetensors (sharded with an index like save_pretrained when large), the config, tokenizer and
    generation files copied from `source` (the folder training started from), and uipe_meta.json.

    Written without instantiating the model, so rank 0 needs no second copy of a large model in memory.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # Tensors that share storage (tied embeddings) must be separate for safetensors; clone makes each contiguous.
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map |= {k: name for k in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    src = Path(source)
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for p in carried_files(src, exclude=("config.json",)):  # tokenizer, generation settings
        shutil.copy2(p, out / p.name)
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return out


def link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy of the bytes) where src and dst share a file system, else a copy."""
    if os.path.lexists(dst):
        os.unlink(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """A folder's files hard-linked (or copied) into `dst`, which may exist (each file is replaced)."""
    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


# ---- sharded training state (exact resume) -------------------------------------------------------------------------


def save_train_state(folder: Path, shards: tuple[nn.Module, torch.optim.Optimizer] | None, state: dict[str, Any],
                     rank: int) -> None:
    """Model and optimizer shards with torch DCP (each rank writes its own files; none when `shards` is None), plus
    state.json from rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if shards is not None:
        model_sd, optim_sd = get_state_dict(*shards)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / DCP_DIR))
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


def load_train_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer shards in place (every rank) and return state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(folder / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return json.loads((folder / STATE_FILE).read_text())


def checkpoint_name(label: str, epoch: int) -> str:
    """A Ray checkpoint's folder in a fit's storage: the job's label and the epoch (several jobs share one fit)."""
    return f"{label}-epoch_{epoch:02d}"


def group_order(names: list[str], order: dict[str, int]) -> list[str]:
    """The checkpoint names of a group's jobs (`order`: label -> place in the group), oldest first: by job, then
    epoch; names of no job of the group are left out."""
    keys = {}
    for name in names:
        label, sep, epoch = name.rpartition("-epoch_")
        if sep and label in order and epoch.isdigit():
            keys[name] = (order[label], int(epoch))
    return sorted(keys, key=keys.__getitem__)


def prune_train_states(run_storage: str, committed: list[str], keep: int) -> list[str]:
    """Delete the DCP training state (<run_storage>/<checkpoint>/dcp) of every committed checkpoint but the newest
    `keep` (`committed`: their folder names, oldest first), local or remote (pyarrow's file systems, as Ray's
    storage); their HF exports and state.json stay. Returns what was deleted. Only committed checkpoints count: one Ray
    has not committed may never be (a rank lost mid-upload), and then the restart goes back to the newest committed
    one, whose state must still be there."""
    if not run_storage:
        return []
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(run_storage if "://" in run_storage else
                                              Path(run_storage).resolve().as_uri())
    deleted = []
    for old in list(dict.fromkeys(committed))[:-keep]:
        target = f"{root.rstrip('/')}/{old}/{DCP_DIR}"
        if filesystem.get_file_info(target).type != fs.FileType.NotFound:
            filesystem.delete_dir(target)
            deleted.append(target)
    return deleted


def latest_run_state(storage: str, run_name: str) -> dict[str, Any] | None:
    """state.json of the newest checkpoint of a Ray run on local storage (None when absent or remote)."""
    if "://" in storage:
        return None
    states = sorted(Path(storage, run_name).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    return json.loads(states[-1].read_text()) if states else None


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints (Ray 2.60)


def set_aside_unreadable_run(storage: str, run_name: str) -> Path | None:
    """Move a Ray Train run folder aside when its checkpoint record is not whole JSON; returns where it went.

    Ray Train writes that record in place; a full disk left it at 0 bytes (scripts/chaos.py, unlearn-disk-full), and
    every later fit of the run then died at start with CheckpointManagerInitializationError. Set aside, the fit starts
    from the start model again and writes the same epochs bit for bit (exports overwrite theirs). Local storage only.
    """
    from uipe.io import file_flaw, move_aside

    record = Path(storage, run_name, RAY_TRAIN_SNAPSHOT)
    if "://" in storage or not record.is_file() or not file_flaw(record):
        return None
    return move_aside(record.parent)
