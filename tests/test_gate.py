"""prepare's gate (uipe/gate.py): the pure checks, with figures worked by hand."""

from __future__ import annotations

import pytest

from uipe.data import TofuRecord
from uipe.gate import gate_sample, rouge_failure, utility_failure, utility_gap


def _records(n: int, tag: str) -> list[TofuRecord]:
    return [TofuRecord(f"{tag} q{i}?", f"a{i}.", None, (), None) for i in range(n)]


def test_gate_sample_is_deterministic_and_bounded() -> None:
    parts = {"retain95": _records(300, "r"), "world_facts": _records(47, "w")}
    a, b = gate_sample(parts, 200, seed=0), gate_sample(parts, 200, seed=0)
    assert a == b
    assert len(a["retain95"]) == 200 and len(set(a["retain95"])) == 200
    assert sorted(a["world_facts"], key=lambda r: r.question) == sorted(parts["world_facts"], key=lambda r: r.question)
    # a split's sample does not depend on which other splits are there
    assert gate_sample({"retain95": parts["retain95"]}, 200, seed=0)["retain95"] == a["retain95"]
    assert gate_sample(parts, 200, seed=1)["retain95"] != a["retain95"]


def test_rouge_failure_names_the_worst_split() -> None:
    counts = {"retain95": 200, "world_facts": 47, "real_authors": 60}
    assert rouge_failure("retain", {"retain95": 0.97, "world_facts": 0.9, "real_authors": 1.0}, 0.9, counts) is None
    msg = rouge_failure("retain", {"retain95": 0.97, "world_facts": 0.596, "real_authors": 0.85}, 0.9, counts)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("prepare retain: greedy ROUGE-L recall 0.596 on world_facts (47 questions) < "
                          "prepare.min_rouge 0.9 (also real_authors)")


def test_utility_gap_by_hand() -> None:
    # The figures of the failing machine (issue 9): |0.739 - 0.582| / 0.582 = 0.157 / 0.582 = 0.26976
    assert utility_gap(0.739, 0.582) == pytest.approx(0.26976, abs=1e-5)
    assert utility_gap(0.80, 0.75) == pytest.approx(0.0666667, abs=1e-6)
    assert utility_failure(0.80, 0.75, 0.1) is None
    assert utility_failure(0.739, 0.582, None) is None  # switched off
    msg = utility_failure(0.739, 0.582, 0.1)
    assert msg is not None and "target 0.739" in msg and "retain model 0.582" in msg and "27.0% > " in msg
