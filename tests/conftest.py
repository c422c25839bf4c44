"""Shared fixtures: the tiny world is built once per test session; one local Ray session serves every Ray test.

Tests never touch the network: HF_HUB_OFFLINE is set, and everything they load is built here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parent.parent


def script_module(name: str):
    """scripts/<name>.py imported as a module (scripts/ on sys.path, as the scripts import one another)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while they are defined
    spec.loader.exec_module(module)
    return module


# ---- optional: each test phase's wall time and the cores' idle share over it (scripts/suite_profile.py) -----------
PROFILE = os.environ.get("UIPE_TEST_PROFILE")


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def _profiled(item: pytest.Item, phase: str) -> Iterator[None]:
    t0, (all0, idle0) = time.time(), _cpu_times()
    yield
    wall, (all1, idle1) = time.time() - t0, _cpu_times()
    if wall >= 0.5:
        with open(PROFILE, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "phase": phase, "wall": round(wall, 2),
                                "idle": round((idle1 - idle0) / max(1, all1 - all0), 3)}) + "\n")


if PROFILE and os.path.exists("/proc/stat"):
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
        yield from _profiled(item, "setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
        yield from _profiled(item, "call")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
        yield from _profiled(item, "teardown")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic benchmark (100 authors, 8 facts, seed 0)."""
    from uipe.data.synth import write_benchmark

    return write_benchmark(tmp_path_factory.mktemp("world") / "data", authors=100, facts=8, seed=0)


@pytest.fixture(scope="session")
def tiny_base(synth_dir: Path) -> Path:
    """theta_0 of the tiny preset: a locally trained tokenizer and a random-init Llama."""
    from uipe.config import load_config
    from uipe.tiny_model import build_tiny, corpus_from_data

    cfg = load_config()
    return build_tiny(synth_dir.parent / "base", corpus_from_data(synth_dir), cfg.model.tiny, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, in a private temp dir (never two at once)."""
    import ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="uipe-ray-")
        # The dashboard serves the State API that Ray Train V2's PlacementGroupCleaner polls (as uipe's own
        # ensure_ray does); bound to 127.0.0.1, on a free port.
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 object_store_memory=256 * 2**20, _temp_dir=tmp, log_to_driver=True)
    yield ray
    ray.shutdown()


# A 2-layer, 32-wide tiny model: the training tests' (TOFU's and MUSE's) small model.
SMALL_MODEL = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=128", "model.tiny.num_hidden_layers=2",
               "model.tiny.num_attention_heads=2"]


# ---- the trained tiny world, shared by every integration test (built once: ~4 minutes on 2 cores) ----------------
SEARCH_OVERRIDES = ["search.num_samples=8"]


@pytest.fixture(scope="session")
def tiny_cfg():
    from uipe.config import load_config

    return load_config(None, SEARCH_OVERRIDES)


# The tiny preset's prepared target and retain models (scripts/make_test_world.py): prepare reuses them when their
# identity is what it computes now, so only the tests that check training train (issue 27). Stale models are
# trained anew here, and test_train's shipped-world test fails until they are made again.
SHIPPED_WORLD = Path(__file__).resolve().parent / "data" / "tiny_world"
PREPARED: dict[str, dict] = {}


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory: pytest.TempPathFactory, ray_session, tiny_cfg):
    """A run folder with data, target and retain models (uipe prepare, from the shipped world where it is current)
    and the cached retain reference."""
    import shutil

    from uipe.data import ensure_data
    from uipe.errors import UipeError
    from uipe.paths import RunPaths
    from uipe.pipeline import ensure_reference
    from uipe.train.recipe import prepare

    paths = RunPaths.of(tmp_path_factory.mktemp("run") / "tiny")
    data = ensure_data(tiny_cfg, paths)
    models = {"target": paths.target_model, "retain": paths.retain_model}
    for role, folder in models.items():
        shutil.copytree(SHIPPED_WORLD / "models" / role, folder)
    try:
        PREPARED.update(prepare(tiny_cfg, paths.root))
    except UipeError as e:  # made from other data or settings than today's: prepare refuses them, so train anew
        PREPARED["stale"] = {"error": str(e)}
        for folder in models.values():
            shutil.rmtree(folder)
        PREPARED.update(prepare(tiny_cfg, paths.root))
    ensure_reference(tiny_cfg, paths, data)
    return paths


@pytest.fixture(scope="session")
def unlearned_run(prepared_run, tiny_cfg):
    """prepared_run plus GA and NPO unlearning (2 Ray Train workers, one fit, a checkpoint per epoch)."""
    from uipe.train.recipe import unlearn_methods

    unlearn_methods(tiny_cfg, prepared_run.root, ["ga", "npo"])
    return prepared_run


def copy_run(src: "RunPaths", dest: Path, methods: tuple[str, ...] = ("ga", "npo")) -> "RunPaths":  # noqa: F821
    """A copy of a prepared (and unlearned) run folder without its searches, Ray state and MLflow store, with the
    unlearning manifests pointing into the copy."""
    import shutil

    from uipe.paths import RunPaths

    paths = RunPaths.of(dest)
    shutil.copytree(src.root, paths.root, ignore=shutil.ignore_patterns("search", "ray", "mlflow.db", "mlartifacts",
                                                                        "logs"))
    for method in methods:
        manifest = json.loads(paths.manifest(method).read_text())
        for e in manifest["epochs"]:
            e["path"] = e["path"].replace(str(src.root), str(paths.root))
        manifest["theta_ini"] = manifest["theta_ini"].replace(str(src.root), str(paths.root))
        paths.manifest(method).write_text(json.dumps(manifest))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, *extra: str, log: Path | None = None, port: int | None = None,
                  ) -> Iterator[str]:
    """A real `mlflow server` on a loopback port (default: a free one), ready to serve; yields its http URL."""
    port = port or free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    from uipe.tracking import SERVER_ENV  # the job runner off, as on the head node

    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", *extra],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **SERVER_ENV})
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {proc.returncode}")
                time.sleep(1)
        # /health answers before the store is open: the first real request can take seconds more (schema checks on
        # a loaded machine), which a client with a short timeout would take for a dead server
        body = json.dumps({"max_results": 1}).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", data=body,
            headers={"Content-Type": "application/json"}), timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a worker holding a database connection can ignore SIGTERM
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        if log:
            out.close()


def rest(url: str, path: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (POST with a JSON body, else GET)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


# ---- tracking as on a cluster: MLflow over PostgreSQL (this project's machines run one on 127.0.0.1:5432) --------
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def pg_admin():
    """A connection to the local PostgreSQL server (trust auth), or None with the reason."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        return psycopg.connect(dbname="postgres", connect_timeout=3, autocommit=True, **PG), ""
    except psycopg.OperationalError as e:
        return None, f"no PostgreSQL server reachable on 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """An MLflow tracking server backed by a fresh PostgreSQL database (dropped afterwards), artifacts served from a
    local folder; None (with the reason in PG_SKIP) where no PostgreSQL server is reachable."""
    import uuid

    admin, reason = pg_admin()
    if admin is None:
        PG_SKIP.append(reason)
        yield None
        return
    name = f"uipe_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    root = tmp_path_factory.mktemp("pg_mlflow")
    try:
        uri = f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
        with mlflow_server(uri, "--artifacts-destination", str(root / "artifacts"), log=root / "server.log") as url:
            yield url
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


PG_SKIP: list[str] = []


def run_uipe(args: list[str], ray_session, out: Path, extra_env: dict[str, str] | None = None) -> int:
    """The CLI as a user runs it (a subprocess, output to a file), joining the test session's Ray."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, **(extra_env or {})}
    env.pop("UIPE_VERBOSE", None)
    with open(out, "w") as f:
        return subprocess.run([sys.executable, "-m", "uipe.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL, timeout=900).returncode


@pytest.fixture(scope="session")
def served_run(unlearned_run, ray_session, pg_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A reduced `uipe run` (a copy of the session's unlearned world, one new method, few trials), its console in a
    file, logging to the PostgreSQL-backed MLflow server where there is one (else the run folder's sqlite store)."""
    root = tmp_path_factory.mktemp("served")
    paths = copy_run(unlearned_run, root / "run")
    args = ["run", "--run-dir", str(paths.root), "--set", "unlearn.methods=[graddiff]", "--set", "unlearn.epochs=2",
            "--set", "search.num_samples=3"]
    if pg_server:
        args += ["--set", f"tracking.uri={pg_server}"]
    out = root / "console.txt"
    rc = run_uipe(args, ray_session, out)
    return {"rc": rc, "lines": out.read_text().splitlines(), "paths": paths, "tracking_uri": pg_server}
