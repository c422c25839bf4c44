"""Trial processes that outlive a Tune experiment: the model, the evaluator and torch loaded once per process, kept
across trials, across the searches of a stage, and across the Tune actors that Tune's cache stops.

A Tune trial is a light proxy (`proxy_trial`: no CPU of its own, no torch): it hands its point to a TrialPool, an
async actor that gives each call to a free TrialWorker and replaces a worker that died (its trial fails, the search
goes on). A TrialWorker holds the CPUs and GPUs a trial asks for (search.cpus_per_trial, search.gpus_per_trial) and
runs uipe.search.trial.evaluate_call. So the first trial of a search no longer imports torch and transformers and
loads the model (5-6 s per slot on the tiny preset), except in the first search of a stage; and a seeded search that
waits for its trials in order (uipe/search/searcher.py) loses only a light Tune actor when Tune's actor cache stops
one, not a loaded process.

    with shared_trial_pool():          # uipe run's searches, a study seed's: one pool for them all
        run_search(cfg, paths, "ga")   # its trials go to the shared pool (grown to the space's concurrency)
        run_search(cfg, paths, "npo")  # the same processes, the model already loaded

Outside a `shared_trial_pool` block, each search has a pool of its own, given back when the search ends. The pool's
workers hold their CPUs while it lives: work that asks Ray for CPUs outside it (a weighted search's importance
estimate, a training fit) must come after `release_shared()` or after the block. A search that asks for other
resources per trial (a sharded one: search.workers_per_trial processes per worker) gets a pool of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import ray

# A proxy trial only waits on the pool: it asks for no CPU (else the pool's workers and the proxies would need twice
# the CPUs). Tune refuses an all-zero request, so it holds 1 MiB of Ray's memory resource instead.
PROXY_RESOURCES = {"cpu": 0, "memory": 2**20}
# what a trial's last report carries beyond its record (TrialResult.from_report ignores them): when the trial function
# began and when it reported, in Unix seconds, so scripts/bench_trial_gap.py reads the gap between a slot's trials
WALL_CLOCK = ("wall_started_at", "wall_ended_at")


# Restarted if its own process dies, its calls in flight sent again (an evaluation can be repeated): every trial
# of a search goes through it, so a lost pool would fail all the trials left, where a lost worker fails one.
@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)
class TrialPool:
    """Hands each call to a free worker (the one that screened a trial's point, where free, for its full pass);
    a worker that died is replaced before the error reaches the trial. Never unpickles a call: no torch here.

    A worker is a group of `resources["workers"]` processes (search.workers_per_trial; 1 unless a trial's model is
    sharded: uipe/search/sharded.py) that join one torch.distributed group once and run every call together; rank
    0's answer is the call's. A group in which one process died or raised is replaced whole, since the others may
    be waiting for it in a collective."""

    def __init__(self, resources: dict[str, float], size: int) -> None:
        self._options = {"num_cpus": resources.get("cpu", 1), "num_gpus": resources.get("gpu", 0)}
        self._ranks = int(resources.get("workers", 1))
        self._workers: dict[int, list[Any]] = {}  # worker index -> its processes, rank 0 first
        self._free: list[int] = []
        self._last: dict[str, int] = {}  # trial id -> the worker that ran its previous pass
        self._cond: asyncio.Condition | None = None
        self._next = 0
        self._warm: list | None = None
        self._joining: list[int] = []  # started, not yet up
        self._tasks: set[asyncio.Task] = set()  # the joins under way (kept: the loop holds tasks weakly)
        self._grow(size)

    def _grow(self, size: int) -> None:
        """Start workers up to `size`; each joins the free ones once it is up, never before: a worker the
        cluster cannot place yet (a GPU node still starting, a pool larger than the cluster) holds up no trial."""
        while len(self._workers) < size:
            group = [TrialWorker.options(**self._options).remote(self._ranks) for _ in range(self._ranks)]
            self._workers[self._next] = group
            if self._warm is not None:
                for process in group:
                    process.warm.remote(self._warm)
            self._joining.append(self._next)
            self._next += 1

    async def _join(self, index: int) -> None:
        group = self._workers[index]
        try:  # answered once the processes are up (after a warm-up sent first), then joined as one group
            await asyncio.gather(*(p.pid.remote() for p in group))
            if len(group) > 1:
                address = await group[0].group_address.remote()
                await asyncio.gather(*(p.join_group.remote(rank, address) for rank, p in enumerate(group)))
        except ray.exceptions.RayActorError:
            async with self._cond:
                self._replace(index)
            return
        async with self._cond:
            if index in self._workers:
                self._free.append(index)
                self._cond.notify_all()

    def _replace(self, index: int) -> None:
        """A fresh worker for one that died (its other processes stopped: they may wait in a collective)."""
        for process in self._workers.pop(index):
            with contextlib.suppress(Exception):
                ray.kill(process)
        self._last = {t: i for t, i in self._last.items() if i != index}
        self._grow(len(self._workers) + 1)
        self._start_joins()

    def _start_joins(self) -> None:
        loop = asyncio.get_running_loop()
        while self._joining:
            self._tasks.add(task := loop.create_task(self._join(self._joining.pop(0))))
            task.add_done_callback(self._tasks.discard)

    async def grow_to(self, size: int) -> int:
        async with self._condition():
            self._grow(size)
            self._start_joins()
        return len(self._workers)

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # made on the actor's event loop, not in __init__; so are the first joins
            self._cond = asyncio.Condition()
            self._start_joins()
        return self._cond

    async def run(self, call: list, config: dict, kind: str, screened_seconds: float, trial_id: str) -> dict | None:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: bool(self._free))
            index = self._last.get(trial_id)
            index = index if index in self._free else self._free[0]
            self._free.remove(index)
        group, broken = self._workers[index], False
        try:
            return await _together([p.run.remote(call, config, kind, screened_seconds) for p in group])
        except ray.exceptions.RayActorError:  # a process died (OOM killer, a fault): a fresh worker takes its place
            broken = True
            raise
        except Exception:  # the trial's own error; in a group, the ranks that did not raise may be stuck
            broken = len(group) > 1
            raise
        finally:  # whatever the call raised, its worker is free again or replaced
            async with cond:
                self._last.pop(trial_id, None)
                if broken:
                    self._replace(index)
                else:
                    if kind == "screen":
                        self._last[trial_id] = index
                    self._free.append(index)
                cond.notify_all()

    def warm(self, call: list) -> None:
        """Every worker loads what the call's trials need (torch, the model, the evaluator) now, while the driver
        starts Tune; a worker runs its calls in order, so trials queue behind this."""
        self._warm = call  # a worker made later (a replacement, a larger pool) warms too
        for group in self._workers.values():
            for process in group:
                process.warm.remote(call)

    async def pids(self) -> list[int]:
        return sorted(await asyncio.gather(*(p.pid.remote() for g in self._workers.values() for p in g)))


async def _together(refs: list) -> Any:
    """Rank 0's answer once every rank has answered; the first error as soon as one raises (the others may never
    answer: they wait for the failed rank in a collective)."""
    futures = [asyncio.wrap_future(ref.future()) for ref in refs]
    done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
    for future in pending:  # they end when their group is replaced: their errors are expected, not logged
        future.add_done_callback(lambda f: f.exception())
    for future in done:
        if future.exception() is not None:
            raise future.exception()
    return futures[0].result()


@ray.remote
class TrialWorker:
    """One trial process: evaluates the calls the pool gives it, its loaded model kept between them; one rank of
    `world` when a trial's model is sharded (uipe/search/sharded.py)."""

    def __init__(self, world: int = 1) -> None:
        self._world = world

    def run(self, call: list, config: dict, kind: str, screened_seconds: float) -> dict | None:
        if self._world > 1:
            from uipe.search.sharded import evaluate_sharded_call

            return evaluate_sharded_call(ray.get(call[0]), config, kind, screened_seconds)
        from uipe.search.trial import evaluate_call

        return evaluate_call(ray.get(call[0]), config, kind, screened_seconds)

    def warm(self, call: list) -> None:
        from uipe.search.sharded import warm_sharded
        from uipe.search.trial import warm

        (warm_sharded if self._world > 1 else warm)(ray.get(call[0]))

    def group_address(self) -> str:
        from uipe.search.sharded import group_address

        return group_address()

    def join_group(self, rank: int, address: str) -> None:
        from uipe.search.sharded import join_group

        join_group(rank, self._world, address)

    def pid(self) -> int:
        import os

        return os.getpid()


def proxy_trial(config: dict, pool: Any, call: list, screening: bool) -> None:
    """The Tune function trainable: one (alpha, epoch) point, evaluated in the pool, reported once at full fidelity.
    With `screening`, a point other than the base method's is first reported from a scoring pass; the search's
    ScreeningScheduler (uipe/search/screening.py) then stops it there, or lets it go on to the full evaluation.
    `call`: [a reference to the search's uipe.search.trial.TrialCall], passed on unread."""
    from ray import tune

    started_at = time.time()  # wall clock, beside Tune's whole seconds: a timeline of the search's slots
    trial_id = tune.get_context().get_trial_id()
    screened = 0.0
    if screening:
        report = ray.get(pool.run.remote(call, config, "screen", 0.0, trial_id))
        if report is not None:  # None: the base method's point, evaluated in full only
            tune.report(report)
            screened = report["trial_seconds"]
    report = ray.get(pool.run.remote(call, config, "full", screened, trial_id))
    tune.report({**report, WALL_CLOCK[0]: started_at, WALL_CLOCK[1]: time.time()})


_shared: dict[str, Any] = {"depth": 0, "pool": None, "resources": None}


@contextlib.contextmanager
def shared_trial_pool() -> Iterator[None]:
    """The searches inside share one pool (made at the first, grown as a later one needs); given back at the end."""
    _shared["depth"] += 1
    try:
        yield
    finally:
        _shared["depth"] -= 1
        if _shared["depth"] == 0:
            release_shared()


def release_shared() -> None:
    """Give the shared pool's processes (and their CPUs) back now; the next search inside the block makes another."""
    pool, _shared["pool"], _shared["resources"] = _shared["pool"], None, None
    if pool is not None:
        _kill(pool)


@contextlib.contextmanager
def trial_pool(resources: dict[str, float], size: int) -> Iterator[Any]:
    """The pool a search's trials run in: the shared one inside `shared_trial_pool` (grown to `size`; made anew for
    other resources), else one of the search's own, given back when it ends."""
    if _shared["depth"] == 0:
        pool = TrialPool.remote(resources, size)
        try:
            yield pool
        finally:
            _kill(pool)
        return
    if _shared["pool"] is not None and _shared["resources"] != resources:
        release_shared()
    if _shared["pool"] is None:
        _shared["pool"], _shared["resources"] = TrialPool.remote(resources, size), dict(resources)
    ray.get(_shared["pool"].grow_to.remote(size))
    yield _shared["pool"]


def _kill(pool: Any) -> None:
    """The pool and its workers (owned by the pool: they die with it)."""
    with contextlib.suppress(Exception):
        ray.kill(pool)
