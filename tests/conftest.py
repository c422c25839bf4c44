"""Shared fixtures: the tiny world is built once per test session; one local Ray session serves every Ray test.

Tests never touch the network: HF_HUB_OFFLINE is set, and everything they load is built here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic benchmark (100 authors, 8 facts, seed 0)."""
    from uipe.data.synth import write_benchmark

    return write_benchmark(tmp_path_factory.mktemp("world") / "data", authors=100, facts=8, seed=0)


@pytest.fixture(scope="session")
def tiny_base(synth_dir: Path) -> Path:
    """theta_0 of the tiny preset: a locally trained tokenizer and a random-init Llama."""
    from uipe.config import load_config
    from uipe.models import build_tiny, corpus_from_data

    cfg = load_config()
    return build_tiny(synth_dir.parent / "base", corpus_from_data(synth_dir), cfg.model.tiny, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, in a private temp dir (never two at once)."""
    import ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="uipe-ray-")
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
                 _temp_dir=tmp, log_to_driver=True)
    yield ray
    ray.shutdown()


# ---- the trained tiny world, shared by every integration test (built once: ~4 minutes on 2 cores) ----------------
SEARCH_OVERRIDES = ["search.num_samples=8"]


@pytest.fixture(scope="session")
def tiny_cfg():
    from uipe.config import load_config

    return load_config(None, SEARCH_OVERRIDES)


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory: pytest.TempPathFactory, ray_session, tiny_cfg):
    """A run folder with data, target and retain models (uipe prepare) and the cached retain reference."""
    from uipe.data import ensure_data
    from uipe.paths import RunPaths
    from uipe.pipeline import ensure_reference
    from uipe.train import prepare

    paths = RunPaths.of(tmp_path_factory.mktemp("run") / "tiny")
    data = ensure_data(tiny_cfg, paths)
    prepare(tiny_cfg, paths.root)
    ensure_reference(tiny_cfg, paths, data)
    return paths


@pytest.fixture(scope="session")
def unlearned_run(prepared_run, tiny_cfg):
    """prepared_run plus GA and NPO unlearning (2 Ray Train workers, a checkpoint per epoch)."""
    from uipe.train import unlearn

    for method in ("ga", "npo"):
        unlearn(tiny_cfg, prepared_run.root, method)
    return prepared_run
