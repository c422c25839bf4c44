"""A short chaos run in the suite (scripts/chaos.py): faults of a few kinds at seeded random moments on the session's
world, each followed by the resume OPERATIONS.md gives, every invariant checked."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import script_module

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_the_plan_is_the_seeds_and_covers_every_kind_a_store_can_take() -> None:
    chaos = script_module("chaos")
    kinds = list(chaos.KINDS)
    one = chaos.plan(24, 3, ["sqlite", "postgres"], kinds, {"disk", "ray"})
    assert one == chaos.plan(24, 3, ["sqlite", "postgres"], kinds, {"disk", "ray"})
    assert one != chaos.plan(24, 4, ["sqlite", "postgres"], kinds, {"disk", "ray"})
    sqlite = {p.kind for p in one if p.store == "sqlite"}
    assert sqlite == set(kinds) - {"store-crash"}  # a sqlite file has no server to crash
    assert {p.kind for p in one if p.store == "postgres"} == set(kinds)
    bare = chaos.plan(22, 3, ["sqlite"], kinds, set())  # no small disk (not root), the Ray of another
    assert not {p.kind for p in bare} & {"disk-full", "unlearn-disk-full", "raylet-sigkill", "store-crash"}
    assert all(chaos.KINDS[p.kind].window[0] <= p.fraction <= chaos.KINDS[p.kind].window[1] for p in one)


def test_a_drawn_training_step_arms_the_fault_point_at_that_step() -> None:
    faults = script_module("chaos_faults")
    kind = faults.KINDS["worker-kill-step"]
    draw = kind.draw(random.Random(0))
    armed = kind.faults({"u": 0.99, "rank": 1}, steps=12, epochs=6, marker=Path("/m"))
    assert armed == {"UIPE_FAULTS": "train.step:kill,step=12,rank=1,marker=/m"}  # 1 + int(0.99 * 12)
    assert kind.faults({"u": 0.0, "rank": 0}, 12, 6, Path("/m"))["UIPE_FAULTS"].startswith("train.step:kill,step=1,")
    assert set(draw) == {"u", "rank"}
    export = faults.KINDS["worker-kill-export"].faults({"u": 0.5}, 12, 6, Path("/m"))
    assert export == {"UIPE_FAULTS": "train.export:kill,epoch=4,marker=/m"}  # 1 + int(0.5 * 6)


def test_leftovers_name_what_an_atomic_write_or_a_checkpoint_left_behind(tmp_path) -> None:
    checks = script_module("chaos_checks")
    (tmp_path / "search" / "ga").mkdir(parents=True)
    (tmp_path / "search" / "ga" / "results.csv").write_text("x")
    assert checks.leftovers(tmp_path) == []
    (tmp_path / "search" / "ga" / ".results.csv.ab12.tmp").write_text("half")
    (tmp_path / "ray" / ".uipe-staging" / "run-rank0-x").mkdir(parents=True)
    found = checks.leftovers(tmp_path)
    assert found and "search/ga/.results.csv.ab12.tmp" in found[0] and "ray/.uipe-staging/run-rank0-x" in found[0]


@pytest.mark.e2e
def test_a_short_chaos_run_loses_no_trial_and_leaves_nothing_half_written(unlearned_run, ray_session,
                                                                          tmp_path) -> None:
    chaos, checks = script_module("chaos"), script_module("chaos_checks")
    ctx = chaos.start_services(tmp_path, ["sqlite"], ray_session.get_runtime_context().gcs_address, overrides=(),
                               world=unlearned_run.root)
    # The unfaulted unlearning is the world's own (GA trained beside NPO in one fit, bit-identical to GA alone:
    # tests/test_fit_many.py); a training worker's kind strikes at a drawn step, not at a moment of it.
    ctx.reference["unlearn"] = {"seconds": 0.0, **checks.epoch_hashes(unlearned_run.root)}
    (tmp_path / "reference.json").write_text(json.dumps(ctx.reference))
    try:
        plans = chaos.plan(3, 0, ["sqlite"], ["driver-sigkill", "server-restart", "worker-kill-export"], set())
        # moments no later than half the unfaulted search: a search timed under load can end sooner than its
        # reference, and a fault drawn at 0.88 of it (seed 0's server restart) then missed it under two burners
        rows = chaos.chaos(ctx, [replace(p, fraction=min(p.fraction, 0.5)) for p in plans])
    finally:
        chaos.stop_services(ctx)
    report = chaos.table(rows)
    assert sorted(r.kind for r in rows) == ["driver-sigkill", "server-restart", "worker-kill-export"], report
    assert not [r for r in rows if r.fault.startswith("missed")], report
    assert [r.violations for r in rows] == [[], [], []], report
    assert next(r for r in rows if r.kind == "driver-sigkill").resume == "0", report


def test_the_gap_between_a_slots_trials_takes_the_slot_free_longest() -> None:
    gaps = script_module("bench_trial_gap").slot_gaps
    # 2 slots: the third trial starts 0.2 s after the first ended; the fourth takes the slot free since 2.0 (not
    # the one free since 3.0): 0.5 s; the fifth takes the one free since 3.0: 0.1 s
    spans = [(1.2, 3.0), (0.0, 1.0), (0.1, 2.0), (2.5, 4.0), (3.1, 5.0)]
    assert gaps(spans, 2) == pytest.approx([0.2, 0.5, 0.1])
    assert gaps(spans, 5) == []
