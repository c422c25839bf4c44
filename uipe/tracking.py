"""MLflow: where runs go, one parent run per search with a nested child run per trial, tags, datasets, artifacts.

Only this module and uipe/model_registry.py (which gets its client here) call MLflow: the rest of the package calls
the named functions below with a tracking URI and run ids, never a client, so another backend replaces these two.

The default store is a sqlite file under the run folder (MLflow >= 3.13 refuses plain file stores); artifacts go to
<run_dir>/mlartifacts. Any server URI works too (`tracking.uri`). Only URIs and ids are held, never a client, so the
Tune callback below pickles with the experiment state and survives `uipe search --resume`.
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from uipe.results import TrialResult

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mlflow import MlflowClient

    from uipe.config import ExperimentConfig
    from uipe.data import TofuRecord
    from uipe.paths import RunPaths

_DATASETS_LOCK = threading.Lock()
TRIAL_TAG = "uipe.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting: a run with this tag shows under its parent in the UI
# Every `mlflow server` / `mlflow ui` uipe starts or tells a user to start: MLflow 3 otherwise also starts its GenAI
# job runner (huey consumers, ~245 MB each; docs/BENCHMARKS.md), and uipe runs none of those jobs.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses (often the GenAI one).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a client raises when the tracking server is down or refuses (after MLflow's own retries)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return (MlflowException, RequestException, OSError)


def tracking_uri(cfg: ExperimentConfig, paths: RunPaths) -> str:
    return cfg.tracking.uri or f"sqlite:///{paths.mlflow_db}"


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.experiment or f"uipe-{cfg.name}"


def client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(cfg: ExperimentConfig, paths: RunPaths) -> tuple[str, str]:
    """(tracking URI, experiment id); a local store keeps its artifacts beside it, not in ./mlruns."""
    uri = tracking_uri(cfg, paths)
    c = client(uri)
    name = experiment_name(cfg)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # made by an older uipe: open it in the right view too
            c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return uri, exp.experiment_id
    location = cfg.tracking.artifact_location
    if location is None and not uri.startswith(("http://", "https://", "databricks")):
        paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
        location = paths.mlflow_artifacts.as_uri()
    elif location and "://" not in location:
        location = Path(location).resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return uri, c.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    except MlflowException as e:
        # Another writer made it between our look-up and the create (prepare's two side-by-side fits, or two jobs on
        # one server): the on-prem check's first job died of exactly this on a PostgreSQL store. Use theirs.
        exp = c.get_experiment_by_name(name) if e.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if exp is None:
            raise
        return uri, exp.experiment_id


def create_run(uri: str, experiment_id: str, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
    """A new run's id; with `parent` (a run id) it is nested under that run."""
    return client(uri).create_run(experiment_id, run_name=name,
                                  tags={**tags, **({PARENT_TAG: parent} if parent else {})}).info.run_id


def resume_run(uri: str, run_id: str) -> None:
    client(uri).update_run(run_id, "RUNNING")


def set_terminated(uri: str, run_id: str, status: str) -> None:
    """End a run: `status` is "FINISHED" or "FAILED"."""
    client(uri).set_terminated(run_id, status)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    client(uri).set_tag(run_id, key, value)


def delete_run(uri: str, run_id: str) -> None:
    client(uri).delete_run(run_id)


def experiment_of(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.experiment_id


def log_files(uri: str, run_id: str, files: Sequence[Path]) -> None:
    """Each file as an artifact at the top of the run's artifacts."""
    c = client(uri)
    for f in files:
        c.log_artifact(run_id, str(f))


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, text, name)


def log_flat(uri: str, run_id: str, metrics: dict[str, Any], params: dict[str, Any] | None = None,
             step: int = 0) -> None:
    """Log finite numeric metrics and string-able params in one batch (MLflow rejects NaN params, not metrics)."""
    log_rows(client(uri), run_id, [(step, metrics)], params)


def log_rows(c: MlflowClient, run_id: str, rows: Sequence[tuple[int, dict[str, Any]]],
             params: dict[str, Any] | None = None) -> None:
    """Metrics of many steps (and params) in as few batches as MLflow allows: one SQL transaction each, not one per
    metric. Non-numeric and non-finite values are left out."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    for i in range(0, max(len(ms), len(ps)), 900):  # MLflow caps a batch at 1000 entries
        c.log_batch(run_id, metrics=ms[i:i + 900], params=ps[i:i + 900])


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags, so the runs table's Source column and the run page say what made a run."""
    import sys

    from uipe.io import code_version

    version = code_version()
    command = Path(sys.argv[0]).name if sys.argv else "uipe"
    if command in ("uipe", "cli.py") and len(sys.argv) > 1:
        command = f"uipe {sys.argv[1]}"
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "uipe.code_version": version}
    if "+g" in version:
        tags["mlflow.source.git.commit"] = version.split("+g", 1)[1]
    return tags


def log_datasets(uri: str, run_id: str, source: str, splits: Mapping[str, Sequence[TofuRecord]],
                 context: str) -> None:
    """Each split as an MLflow dataset input (name, content digest, source), so the runs table's Dataset column and
    the lineage show which data a run used; `context` is MLflow's "training" or "evaluation"."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from uipe.data.records import records_hash

    local = "://" not in source and Path(source).exists()  # else a hub id such as locuslab/TOFU
    where = json.dumps({"uri": Path(source).resolve().as_uri() if local else source})
    inputs = [DatasetInput(Dataset(name=name, digest=records_hash(list(records))[:16],
                                   source_type="local" if local else "hugging_face", source=where,
                                   profile=json.dumps({"num_rows": len(records)})),
                           tags=[InputTag("mlflow.data.context", context)])
              for name, records in splits.items() if records]
    # Two fits side by side log the same datasets at once: the store inserts a dataset row the first time it sees
    # it, and a concurrent second insert fails its UNIQUE constraint. One writer at a time in this process, and one
    # retry (the row then exists) for a writer in another process.
    c = client(uri)
    with _DATASETS_LOCK:
        try:
            c.log_inputs(run_id, datasets=inputs)
        except unreachable_errors() as e:
            if "UNIQUE" not in str(e):
                raise
            c.log_inputs(run_id, datasets=inputs)


def children(uri: str, experiment_id: str, parent_id: str) -> list[tuple[str, str, str]]:
    """(Tune trial id, run id, status) of every trial's child run of a parent; a run still RUNNING was cut short by
    a driver that died while logging it."""
    runs = client(uri).search_runs([experiment_id], f"tags.{PARENT_TAG} = '{parent_id}'", max_results=5000)
    return [(r.data.tags[TRIAL_TAG], r.info.run_id, r.info.status) for r in runs if TRIAL_TAG in r.data.tags]


def child_runs(uri: str, experiment_id: str, parent_id: str) -> dict[str, str]:
    """The child runs logged to the end (FINISHED or FAILED), their run ids by Tune trial id (so a resumed search
    never logs a trial twice)."""
    return {tid: run_id for tid, run_id, status in children(uri, experiment_id, parent_id)
            if status in ("FINISHED", "FAILED")}


class TrialLogger(tune.Callback):
    """One nested MLflow child run per finished or failed trial, logged from the driver as the search goes, on a
    thread of its own: Tune's loop hands a trial over and goes on (a tracking server cost ~0.1-0.2 s between trials
    when the loop logged them itself; scripts/bench_trial_logging.py). `flush` waits for what was handed over.

    When the tracking server cannot be reached the search goes on: the logger stops trying (one warning) and
    uipe.search.outcome back-fills the missing runs from Tune's results when the search finishes or is resumed; it
    also replaces a run cut short (the driver killed while the thread logged it).
    """

    def __init__(self, uri: str, experiment_id: str, parent_id: str, method: str) -> None:
        self.uri, self.experiment_id, self.parent_id, self.method = uri, experiment_id, parent_id, method
        self._last: dict[str, dict] = {}
        self.offline = False
        # trial ids with a child run: read from MLflow once per driver process (a search before a restart may have
        # logged some), then kept here, so a trial costs no search of every child run (it grew with the trials: through
        # a server 64 of a trial's 166 ms of logging over 60 trials; scripts/bench_trial_logging.py)
        self._logged: set[str] | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reported = self._last.pop(trial.trial_id, trial.last_result or {})
        self._log(TrialResult.from_report(trial.trial_id, trial.config, reported))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = TrialResult.failed(trial.trial_id, trial.config.get("alpha", float("nan")), trial.config["epoch"],
                                    _error_text(trial))
        self._log(record, str(getattr(trial, "error_file", "") or ""))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()

    def flush(self) -> None:
        """Wait until every trial handed over so far is logged (or the server found unreachable)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = self._thread = None
            atexit.unregister(self.flush)

    def _log(self, record: TrialResult, error_file: str = "") -> None:
        if self._thread is None:
            self._queue = queue.Queue()
            # daemon, flushed at exit (Tune also calls on_experiment_end when a search stops early); a SIGKILLed
            # driver loses what it held, which outcome.finish back-fills
            self._thread = threading.Thread(target=self._drain, args=(self._queue,), name="uipe-trial-logger",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.flush)
        self._queue.put((record, error_file))

    def _drain(self, work: queue.Queue) -> None:
        while (item := work.get()) is not None:
            try:
                self._write(*item)
            except Exception as e:  # noqa: BLE001 - the thread must go on; outcome.finish logs what is missing
                from uipe.console import warn

                warn(f"trial {item[0].trial_id}: its MLflow run was not logged ({type(e).__name__}: {e}); the "
                     "search logs it when it finishes")

    def _write(self, record: TrialResult, error_file: str) -> None:
        if self.offline:
            return
        try:
            if self._logged is None:
                self._logged = set(child_runs(self.uri, self.experiment_id, self.parent_id))
            if record.trial_id not in self._logged:
                log_trial(self.uri, self.experiment_id, self.parent_id, self.method, record, error_file, check=False)
                self._logged.add(record.trial_id)
        except unreachable_errors() as e:
            from uipe.console import warn

            self.offline = True
            warn(f"tracking server {self.uri} unreachable ({type(e).__name__}); the search goes on, and its trials "
                 "are logged to MLflow when it finishes (or on --resume)")

    def __getstate__(self) -> dict:  # a restored search tries the server again, and reads what it logged
        return {**self.__dict__, "offline": False, "_logged": None, "_queue": None, "_thread": None}


def log_trial(uri: str, experiment_id: str, parent_id: str, method: str, record: TrialResult,
              error_file: str = "", check: bool = True) -> str | None:
    """The child run of one trial (none if that trial has one already; check=False: the caller knows it has not):
    alpha, epoch and a form's coefficient vector as params, every number as a metric, a failed trial's error as
    tags."""
    if check and record.trial_id in child_runs(uri, experiment_id, parent_id):
        return None
    run_id = create_run(uri, experiment_id, f"{method}-a{record.alpha:.3f}-e{record.epoch}",
                        {TRIAL_TAG: record.trial_id, "uipe.method": method, "uipe.fidelity": record.fidelity},
                        parent=parent_id)
    params = {"alpha": record.alpha, "epoch": record.epoch, **record.coefficients}
    if record.ok:
        log_flat(uri, run_id, record.to_report(), params)
    else:
        log_flat(uri, run_id, {}, params)
        set_tag(uri, run_id, "uipe.error", record.error[:5000])
        if error_file:
            set_tag(uri, run_id, "uipe.error_file", error_file)
    set_terminated(uri, run_id, "FINISHED" if record.ok else "FAILED")
    return run_id


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "trial failed"
    return "trial failed"


class TrainRunLog:
    """A training job's MLflow run, written by the driver from what rank 0 reports (uipe.progress).

    A job restarted after a failure, or run again after a crash, continues the unfinished run of the same job hash;
    with create=False there is no run (log and finish do nothing) unless such an unfinished one exists.
    """

    def __init__(self, uri: str, experiment_id: str, name: str, job_hash: str, stage: str,
                 params: dict[str, Any], data: tuple[str, Mapping[str, Sequence[TofuRecord]]] | None = None,
                 parent: str | None = None, create: bool = True) -> None:
        self.client = client(uri)
        found = self.client.search_runs([experiment_id], f"tags.`uipe.job_hash` = '{job_hash}' and "
                                        "attributes.status != 'FINISHED'", max_results=1)
        self.run_id: str | None = None
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, "RUNNING")
        elif create:
            self.run_id = create_run(uri, experiment_id, name, {"uipe.job_hash": job_hash, "uipe.stage": stage,
                                                                **source_tags()}, parent=parent)
            log_flat(uri, self.run_id, {}, params)
            if data is not None:
                log_datasets(uri, self.run_id, data[0], data[1], "training")

    def log(self, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
        if self.run_id is not None:
            log_rows(self.client, self.run_id, rows)

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
