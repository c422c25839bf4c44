"""Where the test suite's time goes, and how much of it the machine's cores sat idle.

    UIPE_TEST_PROFILE=/tmp/profile.jsonl .venv/bin/pytest       # tests/conftest.py appends a line per test phase
    .venv/bin/python scripts/suite_profile.py /tmp/profile.jsonl --top 25

Each line: the test, its phase (setup, call, teardown), wall seconds and the share of the machine's CPU time that
was idle over it (/proc/stat), for every phase of 0.5 s or more. Idle seconds (wall x idle share) are waits (for
processes, servers, polls, pauses) and work that keeps only one of the cores busy: time that more cores would not
shorten.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_file(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(test file, wall seconds, idle seconds), largest wall first."""
    wall: dict[str, float] = collections.defaultdict(float)
    idle: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        name = r["test"].split("::")[0]
        wall[name] += r["wall"]
        idle[name] += r["wall"] * r["idle"]
    return sorted(((f, wall[f], idle[f]) for f in wall), key=lambda x: -x[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    rows = load(args.profile)
    wall, idle = sum(r["wall"] for r in rows), sum(r["wall"] * r["idle"] for r in rows)
    print(f"{len(rows)} phases of >= 0.5 s: {wall:.0f} s, of which the cores were idle {idle:.0f} s "
          f"({idle / max(wall, 1e-9):.0%})\n\nlargest phases: wall s, idle share, phase, test")
    for r in sorted(rows, key=lambda r: -r["wall"])[:args.top]:
        print(f"{r['wall']:7.1f}  {r['idle']:.2f}  {r['phase']:8s} {r['test']}")
    print("\nby file: wall s, idle s")
    for name, w, i in by_file(rows)[:args.top]:
        print(f"{w:7.1f} {i:6.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
