"""The fault kinds of scripts/chaos.py: what each draws from the seed, and how it strikes a running command.

Kinds that act from outside (a signal, a service stopped, the disk filled) strike at a moment drawn as a fraction of
the unfaulted command's wall time; the training-worker kinds strike through uipe's fault points (uipe/faults.py) at a
drawn optimizer step or epoch, inside the worker, where no outside timing could aim.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chaos_services import kill, processes

TRIAL_TITLES = ("ray::TrialWorker",)  # the pool process that evaluates a trial (uipe/search/pool.py)


def _none(rng: random.Random) -> dict:
    return {}


@dataclass(frozen=True)
class Kind:
    stage: str  # "search", "unlearn" or "run": the command it strikes
    what: str  # for the table's legend
    needs: frozenset[str] = frozenset()  # "disk" (a small tmpfs: root), "ray" (a Ray head of its own), "postgres"
    draws: Callable[[random.Random], dict] = _none
    point: str = ""  # a uipe fault point it arms instead of striking from outside
    # the part of the unfaulted command's wall time its moment is drawn from (trial processes live in the middle:
    # Ray's start before them, the results and the chosen model's export after)
    window: tuple[float, float] = (0.05, 0.95)
    says: bool = False  # a command it stops must say why on the console ("uipe: error: ..."), not end silently

    @property
    def disk(self) -> bool:
        return "disk" in self.needs

    def applies(self, store: str, have: set[str]) -> bool:
        return self.needs <= have | ({store} if store == "postgres" else set())

    def draw(self, rng: random.Random) -> dict:
        return self.draws(rng)

    def faults(self, draw: dict, steps: int, epochs: int, marker: Path) -> dict[str, str]:
        """The UIPE_FAULTS a point kind sets for the faulted command (fires once: the marker disarms it)."""
        if self.point == "train.step":
            step = 1 + int(draw["u"] * steps)
            return {"UIPE_FAULTS": f"train.step:kill,step={step},rank={draw['rank']},marker={marker}"}
        if self.point == "train.export":
            return {"UIPE_FAULTS": f"train.export:kill,epoch={1 + int(draw['u'] * epochs)},marker={marker}"}
        return {}


KINDS: dict[str, Kind] = {
    "driver-sigkill": Kind("search", "the search's driver SIGKILLed"),
    "driver-sigterm": Kind("search", "the search's driver sent SIGTERM (a graceful stop)", says=True),
    "trial-sigkill": Kind("search", "a trial's process SIGKILLed", draws=lambda r: {"pick": r.random()},
                          window=(0.25, 0.75)),
    "raylet-sigkill": Kind("search", "the Ray node's raylet SIGKILLed", frozenset({"ray"})),
    "server-restart": Kind("search", "the MLflow server stopped, restarted after a pause",
                           draws=lambda r: {"pause": round(r.uniform(1, 15), 1)}),
    "store-crash": Kind("search", "PostgreSQL under the MLflow server crashed (-m immediate), restarted",
                        frozenset({"postgres"}), draws=lambda r: {"pause": round(r.uniform(1, 15), 1)}),
    "disk-full": Kind("search", "the run folder's disk filled while the search ran", frozenset({"disk"}),
                      window=(0.1, 0.8), says=True),
    "worker-kill-step": Kind("unlearn", "a training worker SIGKILLed after a drawn optimizer step",
                             draws=lambda r: {"u": r.random(), "rank": r.randrange(2)}, point="train.step"),
    "worker-kill-export": Kind("unlearn", "rank 0 SIGKILLed while writing a drawn epoch's export",
                               draws=lambda r: {"u": r.random()}, point="train.export"),
    "unlearn-sigkill": Kind("unlearn", "the unlearning driver SIGKILLed"),
    "run-sigkill": Kind("run", "`uipe run`'s driver SIGKILLed (GA's unlearning, then its search)"),
    "unlearn-disk-full": Kind("unlearn", "the run folder's disk filled while checkpoints were written",
                              frozenset({"disk"}), window=(0.1, 0.8), says=True),
}


def _wait(proc: subprocess.Popen, at: float) -> bool:
    """Sleep until `at`; False if the command ended first."""
    while time.time() < at:
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return proc.poll() is None


def trial_processes() -> list[int]:
    return sorted(pid for pid, _, cmd in processes() if cmd.startswith(TRIAL_TITLES))


def inject(kind_name: str, kind: Kind, ctx, plan, proc: subprocess.Popen, at: float) -> str:
    """Strike at `at` (epoch seconds); what happened, for the table ("missed: ..." when nothing was struck)."""
    if kind.point:
        return "armed " + kind.point
    if not _wait(proc, at):
        return "missed: the command ended first"
    if kind_name in ("driver-sigkill", "unlearn-sigkill", "run-sigkill"):
        os.killpg(proc.pid, signal.SIGKILL)
        return "SIGKILL driver"
    if kind_name == "driver-sigterm":
        proc.send_signal(signal.SIGTERM)
        return "SIGTERM driver"
    if kind_name == "trial-sigkill":
        while proc.poll() is None:
            trials = trial_processes()
            if trials:
                victim = trials[int(plan.draw["pick"] * len(trials))]
                if kill(victim):
                    return f"SIGKILL trial process {victim} (1 of {len(trials)})"
            time.sleep(0.1)
        return "missed: no trial process before the command ended"
    if kind_name == "raylet-sigkill":
        raylet = ctx.ray.raylet()
        return "SIGKILL raylet" if raylet is not None and kill(raylet) else "missed: no raylet"
    if kind_name in ("server-restart", "store-crash"):
        pause = plan.draw["pause"]
        if kind_name == "server-restart":
            ctx.servers[plan.store].stop()
        else:
            ctx.postgres.stop("immediate")
        time.sleep(pause)
        if kind_name == "server-restart":
            ctx.servers[plan.store].start()
        else:
            ctx.postgres.start()
        return f"down {pause:.1f} s"
    if kind.disk:
        ctx.disk.fill()
        return "disk full"
    raise ValueError(kind_name)


def fired(marker: Path) -> str:
    """A point kind's outcome once the command ended: where its fault fired, or that it never did."""
    if not marker.is_file():
        return "missed: the point was never reached"
    return "killed at " + marker.read_text().strip()
