"""The invariants scripts/chaos.py checks after each faulted-and-resumed run, and what it records of the unfaulted one.

Each check returns the violations it found as one-line strings (empty: none), so a table row says what broke.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

TEMPORARY = re.compile(r"^\..+\.tmp$")  # uipe.io's atomic_file / atomic_dir names: .<final>.<random>.tmp


def leftovers(folder: Path) -> list[str]:
    """Half-written things: a temporary file or folder of an atomic write, a checkpoint still in staging."""
    bad = [str(p.relative_to(folder)) for p in folder.rglob("*") if TEMPORARY.match(p.name)]
    staging = folder / "ray" / ".uipe-staging"
    if staging.is_dir():
        bad += [str(p.relative_to(folder)) for p in staging.iterdir()]
    return [f"left behind: {', '.join(sorted(bad)[:4])}" + (f" (+{len(bad) - 4})" if len(bad) > 4 else "")] if bad \
        else []


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def loads(folder: Path) -> str:
    """'' if every safetensors file of the folder opens and every tensor reads, else what failed."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return f"{folder.name}: no safetensors file"
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            return f"{f.name}: {type(e).__name__}: {e}"[:200]
    return ""


def epoch_hashes(run: Path) -> dict:
    """The unfaulted unlearning: every epoch's files' hashes, and its optimizer steps (the worker kinds draw one)."""
    manifest = json.loads((run / "unlearn" / "ga" / "manifest.json").read_text())
    epochs = {str(e["epoch"]): file_hashes(Path(e["path"])) for e in manifest["epochs"]}
    return {"epochs": epochs, "steps": int(manifest["optimizer_steps"])}


def unlearn_violations(run: Path, reference: dict) -> list[str]:
    manifest = run / "unlearn" / "ga" / "manifest.json"
    if not manifest.is_file():
        return ["no unlearning manifest"]
    listed = {str(e["epoch"]): Path(e["path"]) for e in json.loads(manifest.read_text())["epochs"]}
    if sorted(listed) != sorted(reference["epochs"]):
        return [f"manifest lists epochs {sorted(listed)}, want {sorted(reference['epochs'])}"]
    bad = []
    for epoch, folder in sorted(listed.items()):
        failure = loads(folder)
        if failure:
            bad.append(f"epoch {epoch} does not load: {failure}")
        elif file_hashes(folder) != reference["epochs"][epoch]:
            bad.append(f"epoch {epoch} differs from the unfaulted run's")
    return bad


def search_outcome(run: Path) -> dict:
    result = json.loads((run / "search" / "ga" / "result.json").read_text())
    return {"chosen": [float(result["chosen"]["alpha"]), int(result["chosen"]["epoch"])], "trials": result["trials"]}


def _children(url: str, parent: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(the trial id of every child run, the ids of those half-logged: still running, or finished without metrics,
    the status by trial id)."""
    from uipe.tracking import client

    c = client(url)
    exp = c.get_run(parent).info.experiment_id
    runs = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    ids = [r.data.tags.get("uipe.trial_id", "") for r in runs]
    half = [i for i, r in zip(ids, runs) if r.info.status not in ("FINISHED", "FAILED")
            or (r.info.status == "FINISHED" and "trial_seconds" not in r.data.metrics)]
    return ids, half, {i: r.info.status for i, r in zip(ids, runs)}


def search_violations(run: Path, url: str, reference: dict, grid: set[tuple[float, int]],
                      killed_trial: bool) -> tuple[list[str], str]:
    """(violations, an explanation of a difference that is not one)."""
    out = run / "search" / "ga"
    if not (out / "result.json").is_file():
        return ["no result.json"], ""
    result = json.loads((out / "result.json").read_text())
    rows = list(csv.DictReader((out / "results.csv").open()))
    bad = []
    ids = Counter(r["trial_id"] for r in rows)
    points = Counter((float(r["alpha"]), int(r["epoch"])) for r in rows)
    twice = [i for i, n in ids.items() if n > 1]
    if twice:
        bad.append(f"results.csv holds trial ids twice: {twice}")
    if set(points) != grid or max(points.values()) > 1:
        bad.append(f"results.csv: {len(rows)} trials over {len(points)} points, want each of {len(grid)} once")
    failed = [r for r in rows if r["status"] != "ok"]
    if len(failed) > (1 if killed_trial else 0):
        bad.append(f"{len(failed)} failed trials: {failed[0]['error'][:120]}")
    children, half, status = _children(url, result["parent_run_id"])
    logged = Counter(children)
    if half:
        bad.append(f"MLflow: half-logged child runs of trials {half}")
    contradicted = [r["trial_id"] for r in rows
                    if status.get(r["trial_id"], "") not in ("", "FINISHED" if r["status"] == "ok" else "FAILED")]
    if contradicted:
        bad.append(f"MLflow: runs whose outcome results.csv contradicts, trials {contradicted}")
    if logged != ids:
        twice, lost = [i for i, n in logged.items() if n > 1], sorted(set(ids) - set(logged))
        bad.append(f"MLflow: {sum(logged.values())} child runs for {len(ids)} trials (twice {twice}, missing {lost})")
    chosen = [float(result["chosen"]["alpha"]), int(result["chosen"]["epoch"])]
    note = ""
    if chosen != reference["chosen"]:
        lost_point = any([float(r["alpha"]), int(r["epoch"])] == reference["chosen"] for r in failed)
        if lost_point:
            note = f"chose {chosen}: the unfaulted choice {reference['chosen']} was the killed trial"
        else:
            bad.append(f"chose {chosen}, the unfaulted run chose {reference['chosen']}")
    failure = loads(Path(result["chosen_model"]))
    if failure:
        bad.append(f"the chosen model does not load: {failure}")
    return bad, note
