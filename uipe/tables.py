"""The console's tables, one place for every command: `uipe run` shows all its methods' rows, `uipe search` one
method's rows of the same two tables, `uipe evaluate` one model's headline metrics.

Every column is named from the metric catalogue (uipe/metrics.py) after what the search used: a search's summary
(result.json, uipe/search/outcome.py) names its objective (`objective`) and utility measure (`utility_metric`), and
each point's `objective` and `utility` entries hold their values. Summaries of searches that used different
objectives get a column per objective, each filled where a point has that metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from uipe import metrics as catalogue
from uipe.console import show_table
from uipe.report import fmt
from uipe.results import SearchOutcome

if TYPE_CHECKING:
    from uipe.config import ExperimentConfig

Summary = Mapping[str, Any]  # a search's summary (result.json)
Point = Mapping[str, Any]  # one point of it (TrialResult.summary())


def objective_of(summary: Summary) -> str:
    """The catalogue name of the metric the search maximised."""
    return summary["objective"]


def utility_of(summary: Summary) -> str:
    """The catalogue name of the search's utility measure."""
    return summary["utility_metric"]


def value(point: Point | None, name: str, summary: Summary) -> float | None:
    """A point's value of metric `name`: the search's objective from the point's `objective` entry (oriented back if
    the metric is minimised), its utility from `utility`, any other metric by its catalogue name."""
    if not point:
        return None
    if name == objective_of(summary) and point.get("objective") is not None:
        return catalogue.oriented(name, point["objective"])
    if name == utility_of(summary) and point.get("utility") is not None:
        return point["utility"]
    return point.get(name)


def _rows(summaries: Sequence[Summary]) -> list[tuple[str, Point, Summary]]:
    """The results table's points: each search's base and chosen point (as "base" and "UIPE"), with its summary."""
    return [(label, s[arm], s) for s in summaries for label, arm in (("base", "base"), ("UIPE", "chosen"))
            if s.get(arm)]


def show_search_tables(outcomes: Sequence[SearchOutcome], cfg: ExperimentConfig) -> None:
    """What `uipe run` shows for all its methods and `uipe search` for one: the plain method vs UIPE, and the best
    point at each utility floor (rendered from the outcomes' result.json form)."""
    from uipe.benchmarks import get_benchmark

    summaries = [o.to_json() for o in outcomes]
    context = get_benchmark(cfg.data.benchmark).table_metrics
    show_table(results_table(summaries, f"{cfg.name} ({cfg.data.forget_split})", context))
    show_table(floors_table(summaries))


def method_label(s: Summary) -> str:
    """The method, and the extrapolation form where it is not the paper's one alpha: "ga (groups)"."""
    form = s.get("form", "global")
    return s["method"] if form == "global" else f"{s['method']} ({form})"


def results_table(summaries: Sequence[Summary], run: str, context: Sequence[str] = ()) -> Table:
    """Per method: the plain method at its best epoch beside UIPE at the chosen alpha and epoch. Columns: the
    searches' objectives and utility measures, then each `context` metric (the benchmark's table_metrics: forget
    quality beside a reference-free objective, related-knowledge forgetting) that some point has."""
    objectives = catalogue.ordered(objective_of(s) for s in summaries)
    utilities = [u for u in catalogue.ordered(utility_of(s) for s in summaries) if u not in objectives]
    shown = set(objectives) | set(utilities)
    rows = _rows(summaries)
    extra = [n for n in context if n not in shown and any(value(p, n, s) is not None for _, p, s in rows)]
    table = Table(title=f"UIPE on {run}: base method at its best epoch vs UIPE (objective: "
                        f"{', '.join(catalogue.short(n) for n in objectives)})")
    for col in ("method", "model", "alpha", "epoch"):
        table.add_column(col, justify="left" if col in ("method", "model") else "right")
    names = (*objectives, *utilities, *extra)
    for name in names:
        table.add_column(catalogue.short(name), justify="right")
    for label, row, s in rows:
        table.add_row(method_label(s), label + ("" if row.get("feasible") else " (infeasible)"), fmt(row.get("alpha")),
                      str(row.get("epoch", "-")), *(fmt(value(row, n, s)) for n in names))
    return table


def floors_table(summaries: Sequence[Summary]) -> Table:
    """The best point of the base method and of UIPE at each utility floor (a fraction of theta_ini's utility), by
    the search's objective: the trade-off is the user's choice; the space file's utility_floor only picks the
    registered champion."""
    objectives = catalogue.ordered(objective_of(s) for s in summaries)
    utilities = [u for u in catalogue.ordered(utility_of(s) for s in summaries) if u not in objectives]
    names = (*objectives, *utilities)
    table = Table(title=f"Best point at each utility floor ({' / '.join(catalogue.short(u) for u in utilities)} >= "
                        f"floor x theta_ini's), by {', '.join(catalogue.short(n) for n in objectives)} "
                        "('-': no trial reaches the floor)")
    table.add_column("method")
    for col in ("floor", "base epoch", *(f"base {catalogue.short(n)}" for n in names), "UIPE alpha", "UIPE epoch",
                *(f"UIPE {catalogue.short(n)}" for n in names)):
        table.add_column(col, justify="right")
    for s in summaries:
        # highest floor first, whatever order the JSON kept (atomic_write_json sorts keys as text)
        for floor, arms in sorted(s.get("floors", {}).items(), key=lambda kv: -float(kv[0])):
            base, uipe = arms.get("base") or {}, arms.get("uipe") or {}
            table.add_row(method_label(s), floor, str(base.get("epoch", "-")), *(fmt(value(base, n, s)) for n in names),
                          fmt(uipe.get("alpha")), str(uipe.get("epoch", "-")),
                          *(fmt(value(uipe, n, s)) for n in names))
    return table


def metrics_table(result: Mapping[str, Any], title: str) -> Table:
    """One evaluation's headline metrics (the catalogue's), each with its short name, value and meaning."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("what")
    for name in catalogue.headline(k for k, v in result.items() if isinstance(v, (int, float))):
        table.add_row(catalogue.short(name), fmt(result[name]), catalogue.label(name))
    return table


def headline_values(result: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's headline metrics by catalogue name, for `--json`."""
    return {name: result[name] for name in catalogue.headline(k for k in result if k in catalogue.CATALOGUE)}
