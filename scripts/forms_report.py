"""What the forms beyond one alpha chose in a study, and what their searches cost (issue 26; docs/RESULTS.md).

    python scripts/forms_report.py runs/forms-study            # after uipe study --set "study.forms=[groups,weighted]"

Per method and floor: the mean over seeds of each group's alpha in the point the groups search chose at that floor
(which groups get large alpha?), the weighted form's alpha and retain_lambda, and per form the trials and the
search's wall time against the global search's. Reads each seed's search/<method>[-<form>]/result.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _results(study: Path) -> dict[str, dict[str, list[dict]]]:
    """method label (ga, ga-groups, ...) -> seed folder -> result.json, over the study's seeds."""
    out: dict[str, dict[str, list[dict]]] = {}
    for seed in sorted(study.glob("seed-*")):
        for result in sorted((seed / "search").glob("*/result.json")):
            out.setdefault(result.parent.name, {}).setdefault(seed.name, []).append(json.loads(result.read_text()))
    return out


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def coefficient_table(results: dict, label: str, floor: str) -> list[str]:
    """Mean ± sd over seeds of every coefficient of the point chosen at `floor` (result.json's floors block)."""
    points = [r["floors"][floor]["uipe"] for runs in results.get(label, {}).values() for r in runs
              if r["floors"].get(floor, {}).get("uipe")]
    if not points:
        return []
    keys = ["alpha", "epoch"] + sorted({k for p in points for k in p if k.startswith("alpha_") or k == "retain_lambda"})
    rows = [f"| {k} | {_mean([float(p[k]) for p in points if k in p])} |" for k in keys]
    return [f"{label} at floor {floor} ({len(points)} seeds):", "", "| coefficient | mean ± sd |", "|---|---|", *rows, ""]


def cost_table(results: dict) -> list[str]:
    """Per search label: trials and wall seconds per search, mean over seeds."""
    rows = []
    for label, by_seed in sorted(results.items()):
        runs = [r for rs in by_seed.values() for r in rs]
        rows.append(f"| {label} | {_mean([r['trials'] for r in runs])} | {_mean([r['search_seconds'] for r in runs])} "
                    f"| {_mean([r['trial_work_seconds'] for r in runs])} |")
    return ["| search | trials | wall s | trial work s |", "|---|---|---|---|", *rows, ""]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/forms_report.py STUDY_DIR", file=sys.stderr)
        return 2
    results = _results(Path(argv[0]))
    lines = ["## Cost of each search", "", *cost_table(results), "## Chosen coefficients", ""]
    for label in sorted(k for k in results if k.endswith(("-groups", "-weighted"))):
        for floor in ("0.9", "0.8"):
            lines += coefficient_table(results, label, floor)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
