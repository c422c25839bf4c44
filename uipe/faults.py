"""Fault points: where tests make a search trial or a training worker fail on purpose. Inert unless UIPE_FAULTS is set.

Why this module exists: trials and training ranks run in Ray worker processes, which a test's monkeypatch cannot
reach, and which do not see environment variables a test sets after Ray started. So the driver reads UIPE_FAULTS
once (`from_env`) and the parsed spec travels to the workers as a plain frozen value inside what they receive
anyway (a trial's parameters, a training job's Runtime). Production code only marks where a fault may happen,
`faults.point(site, **where)`, and never names a fault: what happens there, and when, is the test's spec. With the
variable unset the spec is empty and every point returns at once.

Grammar (no spaces; a marker path must not hold "," or ";"):

    UIPE_FAULTS = fault (";" fault)*
    fault       = site ":" action ("," key "=" value)*

    UIPE_FAULTS="trial:kill,alpha=0.5,marker=/tmp/killed"              # a trial's process dies once at alpha 0.5
    UIPE_FAULTS="train.step:raise,epoch=2,rank=1,marker=/tmp/failed"   # rank 1 raises once in epoch 2

Sites, and the values a point there is called with:
    trial       alpha, epoch    a search trial's process, as the trial starts (in-process and sharded trials)
    train.step  job, epoch, rank, step  every training rank, after each optimizer step (job: its label, "ga";
                                    step: the job's optimizer steps so far, 1 after the first)
    train.report job, epoch, rank   every training rank, after it reported an epoch's checkpoint to Ray Train
    train.export job, epoch     rank 0's export writer, with the epoch's files written, before the folder is renamed

Actions: "kill" ends the process at once with status 137, as the OOM killer would; "raise" raises RuntimeError
("injected test fault in job ga on epoch 2 on rank 1"); "delay" sleeps `seconds=S` and goes on, as a busy machine
would slow that point. Every other key is a condition: the fault fires where the point's value of that name equals
it (numbers compared as numbers; a name the point does not have never matches).

    UIPE_FAULTS="trial:delay,seconds=2,epoch=1"                         # every epoch-1 trial 2 s slower
"marker=PATH" makes it fire once across processes and restarts: the first firing writes the point's values to PATH
in this same key=value form (read it back with `fired`), and a marker that exists disarms the fault.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "UIPE_FAULTS"
ACTIONS = ("kill", "raise", "delay")
PARAMETERS = ("marker", "seconds")  # keys that say how a fault fires, not where


@dataclass(frozen=True)
class Fault:
    site: str
    action: str
    when: tuple[tuple[str, str], ...]  # (name, value) conditions
    marker: str = ""
    seconds: float = 0.0  # a delay's


@dataclass(frozen=True)
class Faults:
    """A parsed UIPE_FAULTS: plain values, pickled into Ray workers with the rest of their parameters."""

    faults: tuple[Fault, ...] = ()

    def point(self, site: str, **where: float | int | str) -> None:
        """A place where a fault may happen: fires each fault of this site whose conditions `where` meets."""
        for f in self.faults:
            if f.site == site and all(k in where and _same(where[k], v) for k, v in f.when):
                _fire(f, where)


NONE = Faults()


def parse(text: str) -> Faults:
    """UIPE_FAULTS's value as a Faults; a ValueError names what is wrong with it."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        head, _, rest = item.partition(",")
        site, colon, action = head.partition(":")
        if not colon or not site or action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} is not site:action[,key=value...] with an action in {ACTIONS}")
        pairs = [p.partition("=") for p in rest.split(",")] if rest else []
        if any(not eq or not key for key, eq, _ in pairs):
            raise ValueError(f"{ENV}: {item!r}: each condition is key=value")
        when = tuple((key, value) for key, _, value in pairs if key not in PARAMETERS)
        given = {key: value for key, _, value in pairs if key in PARAMETERS}
        try:
            seconds = float(given.get("seconds", 0))
        except ValueError:
            raise ValueError(f"{ENV}: {item!r}: seconds is a number of seconds") from None
        if (action == "delay") != ("seconds" in given):
            raise ValueError(f"{ENV}: {item!r}: seconds=S goes with the delay action, and only with it")
        out.append(Fault(site, action, when, given.get("marker", ""), seconds))
    return Faults(tuple(out))


def from_env() -> Faults:
    """The faults this process's environment asks for (none without UIPE_FAULTS), read where the driver builds
    what its workers receive."""
    return parse(os.environ.get(ENV, ""))


def fired(marker: Path | str) -> dict[str, str]:
    """Tests: the values of the point where a fault with this marker fired."""
    return dict(p.split("=", 1) for p in Path(marker).read_text().strip().split(","))


def _same(value: float | int | str, wanted: str) -> bool:
    try:
        return math.isclose(float(value), float(wanted))
    except (TypeError, ValueError):
        return str(value) == wanted


def _fire(f: Fault, where: dict[str, float | int | str]) -> None:
    if f.marker:
        if os.path.exists(f.marker):
            return
        with open(f.marker, "w") as out:
            out.write(",".join(f"{k}={v}" for k, v in where.items()) + "\n")
    if f.action == "delay":
        time.sleep(f.seconds)
        return
    if f.action == "kill":
        os._exit(137)
    raise RuntimeError("injected test fault in " + " on ".join(f"{k} {v}" for k, v in where.items()))
