"""Search trials over a model sharded across several workers (search.workers_per_trial > 1), for models larger than
one accelerator (70B in bf16 is 140 GB): a Ray Train worker group inside each Tune trial (Train V2 + Tune).

    uipe search --method npo --set search.workers_per_trial=4 --set search.gpus_per_trial=1   # 4 GPUs per trial

Every rank builds the model on the meta device, shards it with FSDP2 and fills only its own rows of every
parameter with theta_un + alpha*(theta_un - theta_ini) (UIPE, arXiv 2503.04693), read from both checkpoints
through mmap views (uipe.train.sharding.build_sharded). Every rank then runs the same evaluation, batch for batch:
FSDP2 all-gathers each block's weights, so all ranks compute the same logits and greedy generation stops at the
same step on each. Rank 0's metrics are the trial's. The trial process itself only waits: it holds no model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from uipe.coefficients import Extrapolation
from uipe.io import atomic_write_json
from uipe.search.trial import Resolved, TrialCall, TrialSetup, build_evaluator, record_point, resolve_point


def sharded_trial(config: dict, call: TrialCall, workers: int, gpus_per_worker: float, storage: str) -> None:
    """The Tune function trainable when a trial spans `workers` workers: one TorchTrainer fit, reported once. Its
    actor only drives the worker group, so it asks for no CPU (uipe.search.pool.PROXY_RESOURCES): else k workers of
    one CPU each would never fit on k CPUs (measured: a 0.01 CPU share left a 2-worker trial waiting forever on a
    2-CPU node)."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    point = Extrapolation.from_config(config)
    call.faults.point("trial", alpha=point.alpha, epoch=point.epoch)  # tests only: see uipe/faults.py
    setup, start = call.setup, call.start
    use_gpu = gpus_per_worker > 0
    name = f"trial-{tune.get_context().get_trial_id()}"
    result_file = Path(storage) / name / "result.json"  # rank 0 writes it (Train V2 keeps no metrics without a
    # checkpoint, and a trial has nothing to checkpoint)
    trainer = TorchTrainer(
        evaluate_on_rank,
        train_loop_config={"setup": setup, "point": point, "threshold": call.utility_threshold,
                           "metric": call.objective_metric, "start": dict(start or {}), "use_gpu": use_gpu,
                           "catalogue": dict(call.catalogue),
                           "result_file": str(result_file)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": setup.threads, **({"GPU": gpus_per_worker}
                                                                                    if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage,
                             # a worker group that cannot start fails the trial instead of retrying forever
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
                             worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                                              "OMP_NUM_THREADS": str(setup.threads)}}),
    )
    trainer.fit()
    reported = json.loads(result_file.read_text())
    tune.report({**reported, "epoch": point.epoch})


def evaluate_on_rank(cfg: dict[str, Any]) -> None:
    """One rank of a sharded trial: its shards of the extrapolated model, the full evaluation, rank 0 reports."""
    import ray.train
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from uipe import metrics
    from uipe.models import peak_memory_bytes, resolve_dtype

    metrics.adopt(cfg["catalogue"])  # entries the driver registered at run time (a user's objective)
    setup: TrialSetup = cfg["setup"]
    ctx = ray.train.get_context()
    torch.set_num_threads(setup.threads)
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")
    mesh = init_device_mesh(device.type, (ctx.get_world_size(),))
    t0 = time.perf_counter()
    resolved = resolve_point(setup, cfg["point"])
    model = sharded_model(resolved, device, mesh, resolve_dtype(setup.dtype, device))
    aggregates = build_evaluator(setup).evaluate(model).aggregates
    result = record_point(setup, resolved.point, aggregates, cfg["start"], cfg["threshold"], cfg["metric"],
                          time.perf_counter() - t0, peak_memory_bytes(device))
    if ctx.get_world_rank() == 0:
        atomic_write_json(cfg["result_file"], result.to_report())


def sharded_model(resolved: Resolved, device: Any, mesh: Any, dtype: Any) -> Any:
    """A point's extrapolation (theta_un + alpha*(theta_un - theta_ini), any form), FSDP2-sharded over `mesh`, in
    eval mode (collective)."""
    from uipe.train.sharding import build_sharded

    # the weights are made in the compute dtype already: no mixed-precision policy needed; theta_ini's folder
    # gives the architecture, the point's base (theta_ini or the anchor epoch) the weights extrapolated from
    model = build_sharded(resolved.base, device, mesh, dtype, bf16=False, reshard_after_forward=True,
                          unlearned=resolved.unlearned, alpha=resolved.coefficients, importance=resolved.importance)
    model.requires_grad_(False)
    return model.eval()


def storage_for(search_dir: Path) -> str:
    """Where the trials' worker groups keep their (checkpoint-free) run folders."""
    return str(search_dir / "sharded")
