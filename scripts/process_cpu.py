"""Which processes a command's CPU time went to: Ray Train's and Tune's actors, trial processes, Ray's daemons, the
command itself. Linux only (/proc).

    .venv/bin/python scripts/process_cpu.py --out /tmp/cpu.json -- .venv/bin/pytest tests/test_search.py
    .venv/bin/python scripts/process_cpu.py --report /tmp/cpu.json        # the table again, from the file

Every second it reads each process's user + system CPU time (/proc/PID/stat) and keeps the largest seen per process
(pid and start time), with its name: Ray names an actor's process `ray::<Class>`, so one fit's controller, workers
and helper actors count apart. A process is counted up to its last sample: up to a second of each process is missed
(all of one that lives less). Processes already running when the command started (the machine's own services) count
what they spent meanwhile, in a row of their own, outside the command's total and shares. A child seen before its
exec carries its parent's command line until the next pass, which reads the new one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Ray's process names (/proc/PID/comm keeps 15 characters) -> the kind reported
RAY_ACTORS = (("ray::TrialWorke", "trial process (uipe TrialWorker)"), ("ray::RayTrainWo", "Ray Train worker"),
              ("ray::TrainContr", "Ray Train: controller"), ("ray::DatasetMan", "Ray Train: DatasetManager"),
              ("ray::PlacementG", "Ray Train: PlacementGroupCleaner"),
              ("ray::Synchroniz", "Ray Train: SynchronizationActor"),
              ("ray::Preemption", "Ray Train: PreemptionWatcher"), ("ray::ImplicitFu", "Ray Tune: trial actor"),
              ("ray::TrialPool", "uipe TrialPool actor"), ("ray::Board", "uipe progress Board actor"))
BEFORE = "(already running: the machine's own services)"  # the row of processes older than the command
RAY_DAEMONS = ("gcs_server", "raylet", "log_monitor", "dashboard", "autoscaler", "runtime_env", "ray::DashboardA",
               "ray::_Autoscali", "ray::RuntimeEnv")


def kind(name: str, cmdline: str) -> str:
    """The kind of a process, from its name (comm) and command line."""
    for prefix, label in RAY_ACTORS:
        if name.startswith(prefix):
            return label
    if any(d in name or d in cmdline for d in RAY_DAEMONS):
        return "Ray's daemons (GCS, raylet, dashboard, log monitor, autoscaler)"
    if name.startswith("ray::"):
        return "other Ray workers"
    if "mlflow" in cmdline and "server" in cmdline or "uvicorn" in cmdline or "gunicorn" in cmdline:
        return "MLflow servers"
    return "the command and its children"


def sample(seen: dict[str, list]) -> None:
    """One pass over /proc: seen[pid:start] = [name, cmdline, cpu seconds, existed before the command]; a process
    first seen here is new (main marks those of its first pass)."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        name, rest = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:].split()
        key, cpu = f"{pid}:{rest[19]}", (int(rest[11]) + int(rest[12])) / tick
        row = seen.setdefault(key, [name, cmdline[:300], cpu, False])
        if cmdline:  # the latest: Ray renames an actor's process, a child execs after its first pass
            row[0], row[1] = name, cmdline[:300]
        row[2] = max(row[2], cpu)


def table(seen: dict[str, list]) -> list[tuple[str, int, float]]:
    """(kind, processes, CPU seconds), largest first; processes that ran before the command are one row apart."""
    by: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, cmdline, cpu, before in seen.values():
        label = BEFORE if before else kind(name, cmdline)
        by[label][0] += 1
        by[label][1] += cpu
    return sorted(((k, n, c) for k, (n, c) in by.items()), key=lambda r: -r[2])


def report(seen: dict[str, list], wall: float | None) -> str:
    rows = table(seen)
    ours = sum(c for k, _, c in rows if k != BEFORE)
    lines = [f"{'CPU s':>8} {'share':>6} {'procs':>6}  kind"]
    lines += [f"{c:8.1f} {'-' if k == BEFORE else f'{c / max(ours, 1e-9):.0%}':>6} {n:6d}  {k}"
              for k, n, c in rows]
    lines.append(f"{ours:8.1f}         the command's processes" + (f" over {wall:.0f} s of wall time" if wall else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON of every process seen (read back with --report)")
    ap.add_argument("--report", type=Path, help="print the table of an earlier --out and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args()
    if args.report:
        doc = json.loads(args.report.read_text())
        print(report(doc["processes"], doc.get("wall")))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not Path("/proc/self/stat").exists():
        print("process_cpu.py: give a command after --, on Linux", file=sys.stderr)
        return 2
    seen: dict[str, list] = {}
    sample(seen)
    before = {key: row[2] for key, row in seen.items()}  # their CPU time so far: only what they spend from now counts
    for row in seen.values():
        row[3] = True
    t0 = time.time()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen)
        time.sleep(1.0)
    wall = time.time() - t0
    for key, spent in before.items():
        seen[key][2] -= spent
    if args.out:
        from uipe.io import atomic_write_json

        atomic_write_json(args.out, {"command": command, "wall": wall, "processes": seen})
    print(report(seen, wall), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
