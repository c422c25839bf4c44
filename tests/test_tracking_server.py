"""Tracking as on a cluster: a real `mlflow server` with a PostgreSQL backend store, every process logging over HTTP.

This project's machines (and CI) run PostgreSQL on 127.0.0.1:5432 with trust authentication; each test module makes
a fresh database of its own and drops it afterwards. Without a reachable server (or without psycopg2) they skip.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from conftest import copy_run, mlflow_server, rest

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def _admin():
    try:
        import psycopg2
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e '.[postgres]')")
    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL server reachable on 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})")
    conn.autocommit = True
    return conn


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    """An MLflow tracking server backed by a fresh PostgreSQL database, artifacts served from a local folder."""
    admin = _admin()
    name = f"uipe_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    root = tmp_path_factory.mktemp("pg_mlflow")
    try:
        uri = f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
        with mlflow_server(uri, "--artifacts-destination", str(root / "artifacts"), log=root / "server.log") as url:
            yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _runs(url: str, experiment_id: str, filter_: str) -> list[dict]:
    body = {"experiment_ids": [experiment_id], "filter": filter_, "max_results": 1000}
    return rest(url, "runs/search", body).get("runs", [])


@pytest.mark.ray
@pytest.mark.slow
def test_unlearning_and_search_log_through_a_postgres_backed_server(pg_server: str, unlearned_run, tiny_cfg,
                                                                     tmp_path: Path) -> None:
    """One writer per store: the driver logs the fit's metrics (workers never open a store), every trial once, and
    each run names the data it used; no local database appears in the run folder."""
    from uipe.search import run_search
    from uipe.tracking import experiment_name
    from uipe.train import unlearn

    paths = copy_run(unlearned_run, tmp_path / "run")
    space = tmp_path / "ga.yaml"
    space.write_text("method: ga\nalpha: {low: 0.0, high: 1.5}\nepochs: [1, 2]\nsampler: tpe\nnum_samples: 4\n"
                     "max_concurrent_trials: 1\n")
    cfg = tiny_cfg.model_copy(update={
        "tracking": tiny_cfg.tracking.model_copy(update={"uri": pg_server}),
        "search": tiny_cfg.search.model_copy(update={"num_samples": None}),
        "unlearn": tiny_cfg.unlearn.model_copy(update={"epochs": 1})})
    manifest = unlearn(cfg, paths.root, "graddiff")
    summary = run_search(cfg, paths, "ga", space)
    assert not paths.mlflow_db.exists()

    exp_id = rest(pg_server, f"experiments/get-by-name?experiment_name={experiment_name(cfg)}")["experiment"][
        "experiment_id"]
    trials = _runs(pg_server, exp_id, f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    ids = [t["data"]["tags"] for t in trials]
    trial_ids = [next(tag["value"] for tag in tags if tag["key"] == "uipe.trial_id") for tags in ids]
    assert len(trial_ids) == len(set(trial_ids)) == summary["trials"] == 4

    (fit,) = _runs(pg_server, exp_id, "tags.`uipe.stage` = 'graddiff'")
    assert fit["info"]["status"] == "FINISHED"
    history = rest(pg_server, f"metrics/get-history?run_id={fit['info']['run_id']}&metric_key=loss")["metrics"]
    import json

    steps = json.loads(Path(manifest).read_text())["optimizer_steps"]
    assert sorted(m["step"] for m in history) == list(range(1, steps + 1))  # every step once, from the driver

    parent = rest(pg_server, f"runs/get?run_id={summary['parent_run_id']}")["run"]
    for run, context in ((fit, "training"), (parent, "evaluation")):
        inputs = run["inputs"]["dataset_inputs"]
        assert inputs, run["info"]["run_name"]
        assert all(i["dataset"]["digest"] and i["dataset"]["source"] for i in inputs)
        assert {t["value"] for i in inputs for t in i["tags"] if t["key"] == "mlflow.data.context"} == {context}
    assert {i["dataset"]["name"] for i in fit["inputs"]["dataset_inputs"]} == {"forget05", "retain95"}
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["mlflow.source.name"] and tags["uipe.code_version"]


WRITER = textwrap.dedent("""
    import sys
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    url, exp_id, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = MlflowClient(tracking_uri=url)
    run = c.create_run(exp_id, run_name=f"writer-{k}")
    for b in range(20):
        c.log_batch(run.info.run_id, metrics=[Metric("m", float(k * 1000 + b * 10 + i), 0, b * 10 + i)
                                               for i in range(10)], params=[Param(f"p{b}", str(b))])
    c.set_terminated(run.info.run_id)
""")


def test_several_processes_log_at_once_and_nothing_is_lost(pg_server: str) -> None:
    exp_id = rest(pg_server, "experiments/create", {"name": f"concurrency-{uuid.uuid4().hex[:6]}"})["experiment_id"]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, pg_server, exp_id, str(k)]) for k in range(6)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 6
    runs = _runs(pg_server, exp_id, "")
    assert len(runs) == 6
    for run in runs:
        k = int(run["info"]["run_name"].split("-")[1])
        history = rest(pg_server, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=m")["metrics"]
        assert sorted(m["value"] for m in history) == [float(k * 1000 + s) for s in range(200)]
        assert len(run["data"]["params"]) == 20
