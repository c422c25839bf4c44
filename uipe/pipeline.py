"""`uipe run`: the main job. Data, reference models, the retain reference, unlearning (Ray Train: every method in
one fit), then per method the alpha search (Ray Tune + Optuna), and the tables of the base method beside UIPE
(uipe/tables.py).

    uipe run                                       # the embedded tiny benchmark, offline, 2 CPU cores, minutes
    uipe run --config configs/tofu_llama2_7b.yaml  # the same pipeline on a GPU cluster

Each stage is skipped when its outputs exist and match the configuration, so re-running resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from uipe.config import ExperimentConfig
from uipe.console import say, stage
from uipe.io import atomic_write_json, exclusive
from uipe.paths import RunPaths
from uipe.results import SearchOutcome
from uipe.tables import show_search_tables


def ensure_reference(cfg: ExperimentConfig, paths: RunPaths, data: str) -> str:
    """The retain model's evaluation, computed once (or TOFU's published logs when configured): what the
    benchmark's objective compares against (uipe.benchmarks.base.Benchmark.reference)."""
    if cfg.eval.retain_reference:
        return cfg.eval.retain_reference
    from uipe.evaluation import retain_reference

    retain_reference(paths.retain_model, data, cfg.data.forget_split, paths.retain_reference, cfg.model.prompt_template,
                     cfg.eval, cfg.model.dtype, cfg.model.max_length, cfg.data.benchmark)
    return str(paths.retain_reference)


def run_pipeline(cfg: ExperimentConfig, paths: RunPaths,
                 more_unlearning: Callable[[str], list[tuple[ExperimentConfig, Path]]] | None = None,
                 ) -> list[SearchOutcome]:
    """Every stage in order, one `uipe run` per run folder at a time. `more_unlearning`: given the data folder,
    other runs of the same methods, (config, run folder) each, trained in the unlearning stage's fit (a study
    seed's more-iterations baseline: one worker group's start saved, and trained before the searches' trial
    processes hold the CPUs, so that a pool of trial processes made by the caller serves its scoring too)."""
    with exclusive(paths.root, "uipe run"):
        return _run_stages(cfg, paths, more_unlearning)


def _run_stages(cfg: ExperimentConfig, paths: RunPaths,
                more_unlearning: Callable[[str], list[tuple[ExperimentConfig, Path]]] | None,
                ) -> list[SearchOutcome]:
    from uipe.benchmarks import get_benchmark
    from uipe.gate import summary_line
    from uipe.ray_session import ensure_ray
    from uipe.search.driver import run_search
    from uipe.search.pool import shared_trial_pool
    from uipe.tracking import SERVER_ENV, tracking_uri
    from uipe.train.recipe import check_method_applies, prepare, unlearn_methods

    start = time.time()
    bench = get_benchmark(cfg.data.benchmark)
    for method in cfg.unlearn.methods:  # a method the data cannot feed fails now, not after hours of training
        check_method_applies(bench, method)
    stage(f"data ({cfg.data.source})")
    data = bench.ensure_data(cfg, paths)
    ensure_ray()
    stage("prepare: target and retain models" if cfg.prepare.retain else "prepare: the target model (no retain model)")
    say(summary_line(prepare(cfg, paths.root)))
    if cfg.prepare.retain or cfg.eval.retain_reference:
        stage("retain reference")
        ensure_reference(cfg, paths, data)
    more = more_unlearning(data) if more_unlearning is not None else []
    also = "".join(f"; then {c.unlearn.epochs} epochs each in {Path(d).name}/" for c, d in more)
    stage(f"unlearn {', '.join(cfg.unlearn.methods)} ({cfg.unlearn.epochs} epochs each{also}, "
          f"{cfg.train.num_workers} workers)")
    unlearn_methods(cfg, paths.root, list(cfg.unlearn.methods), more=more)
    summaries = []
    with shared_trial_pool():  # the searches' trial processes load torch and the model once, for all the methods
        for method in cfg.unlearn.methods:
            stage(f"search {method}: alpha and epoch")
            summaries.append(run_search(cfg, paths, method, None, resume=True))  # reuses or resumes
    show_search_tables(summaries, cfg)
    atomic_write_json(paths.root / "summary.json", {"config": cfg.model_dump(mode="json"),
                                                     "methods": [s.to_json() for s in summaries],
                                                     "seconds": time.time() - start})
    uri = tracking_uri(cfg, paths)
    say(f"Done in {time.time() - start:.0f} s. Results: {paths.root}/summary.json")
    env = " ".join(f"{k}={v}" for k, v in SERVER_ENV.items())
    say(f"Review in the MLflow UI:  {env} mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
                  if uri.startswith("sqlite") else f"Review in the MLflow UI at {uri}")
    return summaries
