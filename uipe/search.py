"""Automatic alpha selection: Ray Tune + Optuna over (alpha, checkpoint epoch), a cheap trial each.

    uipe search --method npo                # after `uipe prepare` and `uipe unlearn --method npo`
    uipe search --method npo --resume       # continue an interrupted search

A trial trains nothing: it sets a loaded theta_ini model's weights in place to theta_un + alpha*(theta_un -
theta_ini) (UIPE, arXiv 2503.04693, the extrapolation operator) from the cached update vector of that epoch, and
evaluates it with TOFU's metrics. Actors are reused, so the model, tokenizer, evaluator and update vectors are
loaded once per worker process, not once per trial.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ray import tune

from uipe.config import ExperimentConfig
from uipe.errors import UipeError
from uipe.paths import RunPaths
from uipe.search_space import CONSTRAINT, SearchSpace, default_space_path, load_space


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, as plain values (pickled into each trial actor)."""

    theta_ini: str
    epoch_dirs: dict[int, str]
    data: str
    forget_split: str
    template: str
    max_length: int
    eval_cfg: dict
    reference: str
    dtype: str
    threads: int
    utility_threshold: float  # utility_floor x model utility of theta_ini


_CONTEXT: dict[str, tuple] = {}  # per worker process: (model, evaluator), kept across trials by reuse_actors


def _context(setup: TrialSetup) -> tuple:
    key = json.dumps(asdict(setup), sort_keys=True, default=str)
    if key not in _CONTEXT:
        import torch

        from uipe.config import EvalConfig
        from uipe.eval.evaluate import Evaluator
        from uipe.eval.reference import default_device, load_reference
        from uipe.models import load_model, load_tokenizer

        torch.set_num_threads(setup.threads)
        device = default_device()
        model = load_model(setup.theta_ini, dtype=setup.dtype, device=device)
        evaluator = Evaluator.from_source(setup.data, setup.forget_split, load_tokenizer(setup.theta_ini),
                                          setup.template, EvalConfig(**setup.eval_cfg), setup.max_length)
        evaluator.set_reference(load_reference(setup.reference))
        _CONTEXT.clear()
        _CONTEXT[key] = (model, evaluator, device)
    return _CONTEXT[key]


def evaluate_point(setup: TrialSetup, alpha: float, epoch: int) -> dict[str, float]:
    """Extrapolate in memory, evaluate, and return every aggregate plus the constraint; raise on NaN."""
    from uipe.update_vector import cached_update_vector

    start = time.perf_counter()
    model, evaluator, device = _context(setup)
    cached_update_vector(setup.theta_ini, setup.epoch_dirs[epoch], device=device).apply(model, alpha)
    metrics = dict(evaluator.evaluate(model).aggregates)
    bad = [k for k in ("forget_quality", "model_utility") if not math.isfinite(metrics.get(k, math.nan))]
    if bad:
        raise ValueError(f"alpha={alpha} epoch={epoch}: {bad[0]} is not finite (the extrapolated model broke)")
    metrics[CONSTRAINT] = setup.utility_threshold - metrics["model_utility"]
    metrics["feasible"] = float(metrics[CONSTRAINT] <= 0)
    metrics["trial_seconds"] = time.perf_counter() - start
    return metrics


def trial(config: dict, setup: TrialSetup) -> None:
    """The Tune function trainable: one (alpha, epoch) point, reported once."""
    metrics = evaluate_point(setup, float(config["alpha"]), int(config["epoch"]))
    tune.report({**metrics, "alpha": float(config["alpha"]), "epoch": int(config["epoch"])})


def _epoch_dirs(paths: RunPaths, method: str) -> tuple[str, dict[int, str]]:
    manifest = paths.manifest(method)
    if not manifest.is_file():
        raise UipeError(f"{manifest}: no unlearning manifest; run `uipe unlearn --method {method}` first")
    m = json.loads(manifest.read_text())
    dirs = {int(e["epoch"]): str(e["path"]) for e in m["epochs"]}
    if not dirs:
        raise UipeError(f"{manifest}: lists no epoch checkpoints")
    return m["theta_ini"], dirs


def theta_ini_metrics(setup: TrialSetup, cache: Path) -> dict[str, float]:
    """The start model's evaluation (the utility the floor refers to), cached beside the search folders."""
    from uipe.eval.reference import model_hash

    key = {"model": model_hash(setup.theta_ini), "eval": setup.eval_cfg, "data": setup.data,
           "forget_split": setup.forget_split, "reference": setup.reference}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["metrics"]
    from uipe.io import atomic_write_json

    model, evaluator, _ = _context(setup)
    metrics = evaluator.evaluate(model).aggregates
    atomic_write_json(cache, {"key": key, "metrics": metrics})
    return metrics


def make_setup(cfg: ExperimentConfig, paths: RunPaths, method: str, utility_threshold: float = 0.0) -> TrialSetup:
    from uipe.data import ensure_data

    theta_ini, dirs = _epoch_dirs(paths, method)
    reference = cfg.eval.retain_reference or str(paths.retain_reference)
    if not Path(reference).exists():
        raise UipeError(f"{reference}: no retain reference; run `uipe prepare` then `uipe reference`, or set "
                        "eval.retain_reference to a folder of TOFU eval logs")
    return TrialSetup(theta_ini, dirs, ensure_data(cfg, paths), cfg.data.forget_split, cfg.model.prompt_template,
                      cfg.model.max_length, cfg.eval.model_dump(), reference, cfg.model.dtype,
                      max(1, int(cfg.search.cpus_per_trial)), utility_threshold)


def resolve_space(cfg: ExperimentConfig, method: str, space_path: Path | None) -> tuple[Path, SearchSpace]:
    path = Path(space_path) if space_path else default_space_path(method, cfg.search.space_dir)
    space = load_space(path, method)
    if cfg.search.num_samples:
        space = space.model_copy(update={"num_samples": cfg.search.num_samples})
    return path, space


def run_search(cfg: ExperimentConfig, paths: RunPaths, method: str, space_path: Path | None = None,
               resume: bool = False) -> dict:
    """Validate, run (or resume) the Tune search, then report, choose, write and register the chosen model."""
    from uipe.search_run import execute

    path, space = resolve_space(cfg, method, space_path)
    setup = make_setup(cfg, paths, method)
    epochs = space.candidate_epochs(sorted(setup.epoch_dirs))
    return execute(cfg, paths, method, path, space, setup, epochs, resume)
