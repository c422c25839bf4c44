"""Search trials over a model sharded across several processes (search.workers_per_trial > 1), for models larger
than one accelerator (70B in bf16 is 140 GB): a group of the pool's trial processes (uipe/search/pool.py) that joins
one torch.distributed group once and evaluates trial after trial.

    uipe search --method npo --set search.workers_per_trial=4 --set search.gpus_per_trial=1   # 4 GPUs per trial

Per trial, every rank builds the model on the meta device, shards it with FSDP2 and fills only its own rows of every
parameter with theta_un + alpha*(theta_un - theta_ini) (UIPE, arXiv 2503.04693), read from both checkpoints
through mmap views (uipe.train.sharding.build_sharded). Every rank then runs the same evaluation, batch for batch:
FSDP2 all-gathers each block's weights, so all ranks compute the same logits and greedy generation stops at the
same step on each. Rank 0's report is the trial's. The group, its evaluator (tokenizer, data, retain reference) and
torch stay loaded between trials; only the point's weights are built anew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from uipe.coefficients import Extrapolation
from uipe.search.trial import THETA_INI, Resolved, TrialCall, TrialSetup, cached_evaluator, record_point, resolve_point

_GROUP: dict[str, Any] = {}  # per process: its device and device mesh, once it has joined a group


def group_address() -> str:
    """Where the group's rank 0 listens: this node's address and a port free now (torch.distributed's TCP store)."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def join_group(rank: int, world: int, init_method: str) -> None:
    """This process as rank `rank` of `world` for every trial it runs (blocks until every rank has joined): gloo
    on CPU, NCCL on the GPU Ray gave it."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world)
    _GROUP.update(device=device, mesh=init_device_mesh(device.type, (world,)))


def evaluate_sharded_call(call: TrialCall, config: dict, kind: str, screened_seconds: float = 0.0) -> dict:
    """One trial on this rank (collective: every rank of the group runs it with the same point), as the report
    Tune keeps; only the full evaluation (screening needs search.workers_per_trial 1)."""
    from uipe import metrics

    metrics.adopt(call.catalogue)  # entries the driver registered at run time (a user's objective)
    if kind == THETA_INI:  # the search's floor, measured where the model fits: sharded as a trial's model is
        return _sharded_aggregates(call.setup, lambda device, mesh, dtype: _sharded_weights(
            call.setup.theta_ini, device, mesh, dtype))[0]
    if kind != "full":
        raise ValueError(f"a sharded trial evaluates in full only (asked for a {kind!r} pass)")
    point = Extrapolation.from_config(config)
    call.faults.point("trial", alpha=point.alpha, epoch=point.epoch)  # tests only: see uipe/faults.py
    setup = call.setup
    t0 = time.perf_counter()
    resolved = resolve_point(setup, point)
    aggregates, peak = _sharded_aggregates(setup, lambda device, mesh, dtype: sharded_model(resolved, device, mesh,
                                                                                            dtype))
    result = record_point(setup, resolved.point, aggregates, call.start, call.utility_threshold,
                          call.objective_metric, time.perf_counter() - t0 + screened_seconds, peak)
    return {**result.to_report(), "alpha": result.alpha, "epoch": point.epoch}


def _sharded_aggregates(setup: TrialSetup, build: Callable[[Any, Any, Any], Any]) -> tuple[dict[str, float], int]:
    """The evaluator's aggregates of the model `build(device, mesh, dtype)` makes on this rank (collective), and the
    peak memory."""
    import torch

    from uipe.models import peak_memory_bytes, reset_peak_memory, resolve_dtype

    device = _GROUP["device"]
    torch.set_num_threads(setup.threads)
    reset_peak_memory(device)
    model = build(device, _GROUP["mesh"], resolve_dtype(setup.dtype, device))
    aggregates = cached_evaluator(setup).evaluate(model).aggregates
    peak = peak_memory_bytes(device)
    del model  # the next point's shards are built anew: give this one's memory back before
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return aggregates, peak


def warm_sharded(call: TrialCall) -> None:
    """Load what every trial of the call needs on this rank (imports, the evaluator) before the first asks; the
    model is built per point, sharded."""
    import torch  # noqa: F401

    cached_evaluator(call.setup)


def sharded_model(resolved: Resolved, device: Any, mesh: Any, dtype: Any) -> Any:
    """A point's extrapolation (theta_un + alpha*(theta_un - theta_ini), any form), FSDP2-sharded over `mesh`, in
    eval mode (collective)."""
    # theta_ini's folder gives the architecture, the point's base (theta_ini or the anchor epoch) the weights
    # extrapolated from
    return _sharded_weights(resolved.base, device, mesh, dtype, unlearned=resolved.unlearned,
                            alpha=resolved.coefficients, importance=resolved.importance)


def _sharded_weights(folder: str, device: Any, mesh: Any, dtype: Any, unlearned: str | None = None,
                     alpha: Any = 0.0, importance: str | None = None) -> Any:
    """`folder`'s model, extrapolated towards `unlearned` where given (uipe.train.sharding.build_sharded),
    FSDP2-sharded over `mesh`, in eval mode (collective)."""
    from uipe.train.sharding import build_sharded

    # the weights are made in the compute dtype already: no mixed-precision policy needed
    model = build_sharded(folder, device, mesh, dtype, bf16=False, reshard_after_forward=True, unlearned=unlearned,
                          alpha=alpha, importance=importance)
    model.requires_grad_(False)
    return model.eval()
