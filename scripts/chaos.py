"""Chaos: one fault per run at a random moment, then the resume OPERATIONS.md tells a user to do, then invariants.

    .venv/bin/python scripts/chaos.py --runs 11 --seed 0                        # every kind once, ~25 min on 2 cores
    .venv/bin/python scripts/chaos.py --runs 60 --seed 0 --stores sqlite,postgres
    .venv/bin/python scripts/chaos.py --runs 20 --kinds driver-sigkill --burners 2   # under load

A run copies a small world (built once under --work: the tiny preset with 2 unlearning epochs), runs a reduced
search (a 4 x 2 grid of GA's (alpha, epoch), 2 trials at a time) or a reduced unlearning fit (GA, 2 epochs, 2
workers) against a Ray head and an `mlflow server` of the chaos run's own, injects one fault at a moment drawn from
the seed, waits for the command to end, brings the faulted service back, resumes, and checks: every trial exactly
once in results.csv and in MLflow, the grid's every point once, no failed trial (but the one a killed trial process
fails), no temporary file or staging folder left, every epoch checkpoint loads and equals the unfaulted run's bit
for bit, the chosen point equal to the unfaulted run's (a killed trial that was the chosen point explains a
difference), and the resume exiting 0. Prints a row per run and a table; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_checks import epoch_hashes, leftovers, search_outcome, search_violations, unlearn_violations  # noqa: E402
from chaos_faults import KINDS, Kind, fired, inject  # noqa: E402
from chaos_services import Postgres, RayHead, SmallDisk, TrackingServer, stop_group  # noqa: E402

WORLD = ["unlearn.epochs=2"]  # the chaos world: the tiny preset, with 2 unlearning epochs
GRID = ("method: ga\nalpha: {low: 0.0, high: 1.5}\nepochs: [1, 2]\nsampler: grid\ngrid_step: 0.5\n"
        "max_concurrent_trials: 2\n")
GRID_POINTS = {(a, e) for a in (0.0, 0.5, 1.0, 1.5) for e in (1, 2)}


@dataclass
class Plan:
    index: int
    kind: str
    store: str
    fraction: float  # the moment, as a fraction of the unfaulted command's wall time
    draw: dict = field(default_factory=dict)  # what else the kind drew (a pause, a training step, an epoch)


@dataclass
class Row:
    index: int
    kind: str
    store: str
    moment_s: float
    fault: str
    exit: str
    resume: str
    seconds: float
    violations: list[str]


@dataclass
class Context:
    work: Path
    world: Path
    overrides: list[str]
    ray: RayHead | None
    ray_address: str
    servers: dict[str, TrackingServer]
    postgres: Postgres | None
    disk: SmallDisk | None
    reference: dict = field(default_factory=dict)  # per stage: seconds, chosen point / epoch hashes, steps


def plan(runs: int, seed: int, stores: list[str], kinds: list[str], have: set[str]) -> list[Plan]:
    """The runs, reproducible from the seed: stores in turn, each store's applicable kinds in a seeded order, cycled.
    `have`: what this chaos run can offer the kinds that need it ("disk", "ray")."""
    rng = random.Random(seed)
    order = {s: [k for k in kinds if KINDS[k].applies(s, have)] for s in stores}
    for s in stores:
        rng.shuffle(order[s])
    out = []
    for i in range(runs):
        store = stores[i % len(stores)]
        kind = order[store][(i // len(stores)) % len(order[store])]
        out.append(Plan(i, kind, store, round(rng.uniform(*KINDS[kind].window), 3), KINDS[kind].draw(rng)))
    return out


def command(ctx: Context, stage: str, folder: Path, plan: Plan) -> list[str]:
    uipe = [sys.executable, "-m", "uipe.cli"]
    sets = [*ctx.overrides, f"tracking.uri={ctx.servers[plan.store].url}", f"tracking.experiment=chaos-{plan.index}",
            f"tracking.registered_model_name=chaos-{plan.index}-ga"]
    if stage == "search":
        head = [*uipe, "search", "--method", "ga", "--space", str(ctx.work / "grid.yaml")]
    elif stage == "run":  # the main job, reduced to GA: its unlearning, then its search (the same grid)
        head = [*uipe, "run"]
        sets += ["unlearn.methods=[ga]", f"search.space_dir={ctx.work / 'spaces'}"]
    else:
        head = [*uipe, "unlearn", "--method", "ga"]
    return [*head, "--run-dir", str(folder), *[a for s in sets for a in ("--set", s)]]


def env(ctx: Context, extra: dict[str, str] | None = None) -> dict[str, str]:
    own = RayHead.ENV if ctx.ray is not None else {}
    return {**os.environ, **own, "RAY_ADDRESS": ctx.ray_address, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            **(extra or {})}


def copy_world(world: Path, stage: str, dest: Path) -> Path:
    """A copy of a run folder for one run: without its searches, Ray state and MLflow store (and without the
    unlearning for an unlearning run); manifests pointed into the copy."""
    skip = ["search", "ray", "mlflow.db", "mlartifacts", "logs"] + (["unlearn"] if stage != "search" else [])
    shutil.rmtree(dest, ignore_errors=True)  # an earlier chaos run's, in a reused --work folder
    shutil.copytree(world, dest, ignore=shutil.ignore_patterns(*skip))
    for manifest in dest.glob("unlearn/*/manifest.json"):
        manifest.write_text(manifest.read_text().replace(str(world), str(dest)))
    return dest


def timed(cmd: list[str], environ: dict, log: Path, limit: float) -> tuple[str, float]:
    """Run to the end (or `limit` s, then SIGKILL): ("0"/"2"/..., or "hung"), seconds."""
    t0 = time.time()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return finish(proc, limit), time.time() - t0


def finish(proc: subprocess.Popen, limit: float) -> str:
    try:
        return str(proc.wait(timeout=limit))
    except subprocess.TimeoutExpired:
        stop_group(proc, signal.SIGKILL)
        return "hung"


def recover(ctx: Context, plan: Plan) -> None:
    """Bring back whatever the fault took down, as an operator would before resuming."""
    server = ctx.servers[plan.store]
    if ctx.postgres is not None and plan.store == "postgres" and not ctx.postgres.running():
        ctx.postgres.start()
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    if ctx.disk is not None:
        ctx.disk.free()
    if ctx.ray is not None and not ctx.ray.alive():
        ctx.ray.restart()
        ctx.ray_address = ctx.ray.address


def run_one(ctx: Context, p: Plan) -> Row:
    kind: Kind = KINDS[p.kind]
    base = ctx.disk.mount if kind.disk else ctx.work / "runs"
    base.mkdir(parents=True, exist_ok=True)
    folder = copy_world(ctx.world, kind.stage, base / f"{p.index:03d}-{p.kind}")
    cmd, log = command(ctx, kind.stage, folder, p), ctx.work / "logs" / f"{p.index:03d}-{p.kind}.log"
    log.parent.mkdir(exist_ok=True)
    ref = ctx.reference[kind.stage]
    moment = p.fraction * ref["seconds"]
    t0 = time.time()
    marker = ctx.work / "markers" / f"{p.index:03d}"
    marker.parent.mkdir(exist_ok=True)
    armed = kind.faults(p.draw, ctx.reference["unlearn"]["steps"], len(ctx.reference["unlearn"]["epochs"]), marker)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env(ctx, armed), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fault = inject(p.kind, kind, ctx, p, proc, t0 + moment)
        code = finish(proc, 4 * ref["seconds"] + 120)
    fault = fired(marker) if kind.point else fault
    silent = kind.says and code not in ("0", "hung") and "uipe: error:" not in log.read_text(errors="replace")
    recover(ctx, p)
    resumed = "-"
    if code != "0":
        again = cmd + (["--resume"] if kind.stage == "search" else [])
        resumed, _ = timed(again, env(ctx), log, 4 * ref["seconds"] + 120)
    violations, note = check(ctx, kind, p, folder, code, resumed)
    violations += [f"exit {code} with no error on the console"] if silent else []
    if p.kind == "driver-sigterm" and code == "0" and not fault.startswith("missed"):
        violations.append("the SIGTERM did not stop the command")
    if kind.disk:  # the small disk holds one run at a time: a faulty one is kept for a post-mortem
        if violations:
            shutil.copytree(folder, ctx.work / "runs" / folder.name, dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return Row(p.index, p.kind, p.store, round(moment, 1), fault + (f"; {note}" if note else ""), code, resumed,
               round(time.time() - t0, 1), violations)


def check(ctx: Context, kind: Kind, p: Plan, folder: Path, code: str, resumed: str) -> tuple[list[str], str]:
    """(violations, an explained difference)."""
    bad, note = [], ""
    if (resumed if resumed != "-" else code) != "0":
        bad.append(f"ended with {resumed if resumed != '-' else code}")
    bad += leftovers(folder)
    if kind.stage in ("search", "run"):
        found, note = search_violations(folder, ctx.servers[p.store].url, ctx.reference[kind.stage], GRID_POINTS,
                                        killed_trial=p.kind == "trial-sigkill")
        bad += found
    if kind.stage in ("unlearn", "run"):
        bad += unlearn_violations(folder, ctx.reference[kind.stage])
    return bad, note


def build_world(ctx: Context) -> None:
    """The world every run copies: prepare, the retain reference and GA's unlearning, once per --work folder."""
    if (ctx.world / "unlearn" / "ga" / "manifest.json").is_file():
        return
    log = ctx.work / "logs" / "world.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sets = [a for s in ctx.overrides for a in ("--set", s)]
    for stage in (["prepare"], ["reference"], ["unlearn", "--method", "ga"]):
        code, seconds = timed([sys.executable, "-m", "uipe.cli", *stage, "--run-dir", str(ctx.world), *sets],
                              env(ctx), log, 3600)
        if code != "0":
            raise SystemExit(f"{log}: building the world failed at `uipe {stage[0]}` (exit {code})")
        print(f"world: uipe {stage[0]} {seconds:.0f} s", flush=True)


def measure_references(ctx: Context, stages: set[str]) -> None:
    """The unfaulted unlearning, search and `uipe run`, each in a copy of the world: their wall time scales the
    moments, their outcome is what every faulted run must reproduce. Cached in the work folder."""
    cache = ctx.work / "reference.json"
    ctx.reference = json.loads(cache.read_text()) if cache.is_file() else {}
    for stage in sorted(stages | {"unlearn"}, key=["unlearn", "search", "run"].index):  # unlearn's steps: draws
        if stage in ctx.reference:
            continue
        folder = copy_world(ctx.world, stage, ctx.work / "runs" / f"reference-{stage}")
        log = ctx.work / "logs" / f"reference-{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        code, seconds = timed(command(ctx, stage, folder, Plan(-1, "none", next(iter(ctx.servers)), 0.0)), env(ctx),
                              log, 3600)
        if code != "0":
            raise SystemExit(f"{log}: the unfaulted {stage} failed (exit {code})")
        outcome = {**(search_outcome(folder) if stage != "unlearn" else {}),
                   **(epoch_hashes(folder) if stage != "search" else {})}
        ctx.reference[stage] = {"seconds": seconds, **outcome}
        print(f"reference {stage}: {seconds:.0f} s", flush=True)
    cache.write_text(json.dumps(ctx.reference, indent=1))


def table(rows: list[Row]) -> str:
    head = f"{'#':>3} {'kind':<20} {'store':<8} {'moment':>7} {'exit':>5} {'resume':>6} {'s':>6}  fault / violations"
    lines = [head]
    for r in rows:
        lines.append(f"{r.index:>3} {r.kind:<20} {r.store:<8} {r.moment_s:>6.1f}s {r.exit:>5} {r.resume:>6} "
                     f"{r.seconds:>6.0f}  {r.fault}" + ("" if not r.violations else "  VIOLATED: " +
                                                         "; ".join(r.violations)))
    return "\n".join(lines)


def by_kind(rows: list[Row]) -> str:
    """Per kind: runs, faults injected (not missed), runs with violations."""
    lines = [f"{'kind':<20} {'runs':>4} {'injected':>8} {'violated':>8}"]
    for kind in sorted({r.kind for r in rows}):
        mine = [r for r in rows if r.kind == kind]
        lines.append(f"{kind:<20} {len(mine):>4} {sum(not r.fault.startswith('missed') for r in mine):>8} "
                     f"{sum(bool(r.violations) for r in mine):>8}")
    return "\n".join(lines)


def start_services(work: Path, stores: list[str], ray_address: str = "", disk_mb: int = 0,
                   overrides: tuple[str, ...] = tuple(WORLD), world: Path | None = None) -> Context:
    """A Ray head of its own unless `ray_address` names one; a tracking server per store; a small disk where
    `disk_mb` and root allow. `world`: an existing run folder with GA unlearned to copy (default: built in `work`)."""
    ray = None
    if not ray_address:
        ray = RayHead(work, cpus=2)
        ray.start()
        ray_address = ray.address
    pg = Postgres(work) if "postgres" in stores else None
    servers = {}
    if pg is not None:
        pg.start()
        servers["postgres"] = TrackingServer(pg.uri, work / "server-postgres")
    if "sqlite" in stores:
        servers["sqlite"] = TrackingServer(f"sqlite:///{work / 'server-sqlite' / 'mlflow.db'}", work / "server-sqlite")
    for s in servers.values():
        s.start()
    disk = SmallDisk(work, disk_mb) if disk_mb and SmallDisk.possible() else None
    if disk is not None:
        disk.start()
    return Context(work, world or work / "world", list(overrides), ray, ray_address, servers, pg, disk)


def stop_services(ctx: Context) -> None:
    for s in ctx.servers.values():
        s.stop()
    if ctx.postgres is not None and ctx.postgres.running():
        ctx.postgres.stop()
    if ctx.disk is not None:
        ctx.disk.stop()
    if ctx.ray is not None:
        ctx.ray.stop()


def chaos(ctx: Context, plans: list[Plan]) -> list[Row]:
    (ctx.work / "grid.yaml").write_text(GRID)
    (ctx.work / "spaces").mkdir(exist_ok=True)
    (ctx.work / "spaces" / "ga.yaml").write_text(GRID)  # `uipe run` reads the method's space from a folder
    build_world(ctx)
    measure_references(ctx, {KINDS[p.kind].stage for p in plans})
    rows, t0 = [], time.time()
    for n, p in enumerate(plans, 1):
        rows.append(run_one(ctx, p))
        r, eta = rows[-1], (time.time() - t0) / n * (len(plans) - n)
        print(f"[chaos] {n}/{len(plans)} {r.kind} ({r.store}) at {r.moment_s:.1f}s: {r.fault}; exit {r.exit}, resume "
              f"{r.resume}; {'OK' if not r.violations else 'VIOLATED: ' + '; '.join(r.violations)} | ETA "
              f"{eta / 60:.0f} min", flush=True)
        with open(ctx.work / "chaos.jsonl", "a") as out:
            out.write(json.dumps(asdict(r)) + "\n")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stores", default="sqlite", help="comma-separated: sqlite, postgres")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds")
    ap.add_argument("--work", type=Path, help="work folder (default: a new one under /tmp); reuses its world")
    ap.add_argument("--disk-mb", type=int, default=400, help="the small disk's size (disk-full kinds; needs root)")
    ap.add_argument("--burners", type=int, default=0, help="processes spinning a core each beside every run (load)")
    args = ap.parse_args()
    stores, kinds = args.stores.split(","), args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS)) + sorted(set(stores) - {"sqlite", "postgres"})
    if unknown:
        print(f"chaos: unknown kind or store {unknown}; kinds {sorted(KINDS)}", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="uipe-chaos-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # a SIGTERM (a stopped chaos run) still stops the services below: the servers, Ray, Postgres, the small disk
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    ctx = start_services(work, stores, os.environ.get("RAY_ADDRESS", ""), args.disk_mb)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    try:
        have = {"disk"} if ctx.disk is not None else set()
        plans = plan(args.runs, args.seed, stores, kinds, have | ({"ray"} if ctx.ray is not None else set()))
        rows = chaos(ctx, plans)
    finally:
        for b in burners:
            b.kill()
        stop_services(ctx)
    print(table(rows))
    print(by_kind(rows))
    with open(work / "chaos.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "kind", "store", "moment_s", "fault", "exit", "resume", "seconds", "violations"])
        w.writerows([r.index, r.kind, r.store, r.moment_s, r.fault, r.exit, r.resume, r.seconds,
                     "; ".join(r.violations)] for r in rows)
    bad = [r for r in rows if r.violations]
    kinds_hit = {r.kind for r in rows if not r.fault.startswith("missed")}
    print(f"chaos: {len(rows)} runs, {sum(not r.fault.startswith('missed') for r in rows)} faults injected over "
          f"{len(kinds_hit)} kinds, {len(bad)} with violations; {work}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
