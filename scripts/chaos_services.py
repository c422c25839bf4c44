"""The services a chaos run starts, faults and restarts: a Ray head of its own, an `mlflow server` over sqlite or over
a PostgreSQL instance of its own (own port, own data folder, so it can be restarted), and a small disk to fill.

Used by scripts/chaos.py; every service binds 127.0.0.1 on a free port (never Ray's or Redis's defaults) and lives
under the chaos run's work folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlflow_server import free_port, wait_for  # noqa: E402

BIN = Path(sys.executable).parent


def processes() -> list[tuple[int, str, str]]:
    """(pid, process name, command line) of every process this user can see, from /proc (Linux)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                out.append((int(proc.name), (proc / "comm").read_text().strip(), cmd))
            except OSError:  # it ended while we looked
                continue
    return out


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 20) -> None:
    """Stop a process started with start_new_session and everything it started: `sig`, then SIGKILL after `wait` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:  # a server worker holding a database connection can ignore SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=wait)
    except ProcessLookupError:
        pass


class RayHead:
    """`ray start --head` in a private temp folder on free ports; the chaos run's commands join it via RAY_ADDRESS."""

    # token auth (as on uipe's clusters) set on both sides: left unset, `ray start` and a joining driver can disagree.
    # The token is this chaos run's own (as Ray generates one): a fresh machine has no ~/.ray/auth_token, and a
    # user's own must not be touched
    ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}

    def __init__(self, root: Path, cpus: int) -> None:
        self.temp, self.cpus, self.address, self.group = root / "ray", cpus, "", 0

    def start(self) -> None:
        port, dash = free_port(), free_port()
        # a session of its own: every daemon it leaves behind (agents whose command lines no longer name the temp
        # folder included) is in its process group, which stop() kills
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={self.cpus}",
                                 f"--temp-dir={self.temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dash}", "--disable-usage-stats"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **self.ENV},
                                start_new_session=True)
        if proc.wait(timeout=300):
            raise RuntimeError(f"ray start --head exited {proc.returncode}")
        self.address, self.group = f"127.0.0.1:{port}", proc.pid

    def processes(self) -> list[tuple[int, str, str]]:
        """The head's own processes (raylet, GCS, dashboard...): those whose command line names its temp folder."""
        return [p for p in processes() if str(self.temp) in p[2]]

    def raylet(self) -> int | None:
        return next((pid for pid, name, _ in self.processes() if name == "raylet"), None)

    def alive(self) -> bool:
        return {"raylet", "gcs_server"} <= {name for _, name, _ in self.processes()}

    def stop(self) -> None:
        """Every process of this head (never `ray stop`, which would stop every Ray on the machine); its workers
        exit once their raylet is gone."""
        if self.group:  # never 0: killpg(0) is this process's own group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signal.SIGKILL)
        for _ in range(30):
            procs = self.processes()
            if not procs:
                break
            for pid, _, _ in procs:
                kill(pid)
            time.sleep(1)
        time.sleep(2)  # let orphaned workers notice

    def restart(self) -> None:
        self.stop()
        self.start()


class Postgres:
    """A PostgreSQL instance of the chaos run's own: initdb into `root/pg`, served on a free port (trust auth on
    127.0.0.1), one database `chaos`. As root the server runs as the `postgres` user (initdb refuses root)."""

    def __init__(self, root: Path) -> None:
        self.data, self.log, self.port = root / "pg", root / "pg.log", free_port()
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/chaos"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        fresh = not self.data.exists()
        if fresh:
            self.data.mkdir(parents=True)
            if self.user:
                shutil.chown(self.data, "postgres")
                shutil.chown(self.data.parent, "postgres")  # pg_ctl writes its log here
            self._run(_pg("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._run(_pg("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.log), "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")
        if fresh:
            self._run(_pg("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "chaos")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").is_file()

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: as a crash would (no shutdown checkpoint); `fast`: a clean stop."""
        self._run(_pg("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")


def _pg(tool: str) -> str:
    found = shutil.which(tool) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))), None)
    if not found:
        raise SystemExit(f"{tool}: PostgreSQL's server tools are not installed (needed for --stores postgres)")
    return str(found)


class TrackingServer:
    """`mlflow server` over `backend` (a sqlite file or the Postgres instance), on a fixed free port so a restarted
    server answers at the same URL; MLflow's job runner off, as uipe runs it."""

    def __init__(self, backend: str, root: Path) -> None:
        self.backend, self.root, self.port = backend, root, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from uipe.tracking import SERVER_ENV

        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - the server's own
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend, "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **SERVER_ENV})
        log.close()
        wait_for(f"{self.url}/health", None, self.proc)
        wait_for(f"{self.url}/api/2.0/mlflow/experiments/search", json.dumps({"max_results": 1}).encode(), self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


class SmallDisk:
    """A tmpfs of `size_mb` at `root/disk` (needs root): a run folder on it sees a real ENOSPC once `fill` takes the
    space that is left; `free` gives it back, as a user deleting files would."""

    def __init__(self, root: Path, size_mb: int) -> None:
        self.mount, self.size_mb = root / "disk", size_mb

    @staticmethod
    def possible() -> bool:
        return os.geteuid() == 0 and shutil.which("mount") is not None

    def start(self) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.mount)], check=True)

    def fill(self) -> None:
        block = b"\0" * 2**20
        with open(self.mount / ".filler", "wb", buffering=0) as f:
            try:
                while f.write(block):
                    pass
            except OSError:  # ENOSPC: the disk is full
                pass

    def free(self) -> None:
        (self.mount / ".filler").unlink(missing_ok=True)

    def stop(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], check=False)
