"""Rendering of search results: the CSV table, the plots (PNG) a person looks at, number formatting.

Pure functions over TrialResult records (uipe/results.py); the decisions they draw (front, choice, base point) come
from uipe/decisions.py, the labels from the metric catalogue (uipe/metrics.py).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from uipe import metrics as catalogue
from uipe.coefficients import is_coefficient
from uipe.decisions import base_row, choose, completed, pareto_front
from uipe.results import CORE, NUMERIC_CORE, TrialResult

_TEXT = ("trial_id", "status", "alpha", "epoch", "feasible", "error", "fidelity")


def metric_columns(rows: list[TrialResult]) -> list[str]:
    """Every metric the rows report: the catalogue's order, then any other name alphabetically."""
    return catalogue.ordered(sorted({k for r in rows for k in r.metrics}))


def to_csv(rows: list[TrialResult]) -> str:
    """One line per trial, sorted by epoch then alpha: the core fields, a form's coefficient vector (none for the
    global form), then a column per metric; a failed trial's numbers are empty cells."""
    buf = io.StringIO()
    extra = metric_columns(rows)
    coefficients = sorted({k for r in rows for k in r.coefficients})
    writer = csv.DictWriter(buf, fieldnames=CORE + coefficients + extra, lineterminator="\n", restval="")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r.epoch, r.alpha)):
        cells = ({k: getattr(row, k) for k in CORE} | dict(row.coefficients)
                 | {k: row.metrics[k] for k in extra if k in row.metrics})
        if not row.ok:
            cells = {k: v if k in ("trial_id", "status", "alpha", "epoch", "error") else "" for k, v in cells.items()}
        writer.writerow(cells)
    return buf.getvalue()


def from_csv(text: str) -> list[TrialResult]:
    """The trials of a results.csv (to_csv's inverse)."""
    out = []
    for cells in csv.DictReader(io.StringIO(text)):
        alpha, epoch = float(cells["alpha"]), int(cells["epoch"])
        if cells["status"] != "ok":
            out.append(TrialResult.failed(cells["trial_id"], alpha, epoch, cells["error"]))
            continue
        # an empty cell: a metric this trial did not report (another row did); "nan": reported as NaN
        number = {k: float(v) for k, v in cells.items() if k not in _TEXT and v not in ("", None)}
        core = {k: number.pop(k) for k in NUMERIC_CORE if k in number}
        vector = {k: number.pop(k) for k in list(number) if is_coefficient(k)}
        out.append(TrialResult(cells["trial_id"], "ok", alpha, epoch, feasible=cells["feasible"] == "True",
                               error=cells["error"], fidelity=cells.get("fidelity") or "full", metrics=number,
                               coefficients=vector, **core))
    return out


def plot_search(rows: list[TrialResult], method: str, threshold: float, out_dir: Path, objective_metric: str,
                utility_metric: str) -> list[Path]:
    """Two PNGs: the objective and utility against alpha per epoch, and the objective/utility plane with the Pareto
    front; axes named from the metric catalogue (a p-value on a log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = completed(rows)
    if not done:  # nothing to draw (every trial failed): the caller says so
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "alpha_curves.png", out_dir / "pareto.png"]
    obj, util = catalogue.label(objective_metric), catalogue.label(utility_metric)
    log = catalogue.known(objective_metric) and catalogue.get(objective_metric).log_scale
    scale, y = ("log", lambda v: max(v, 1e-300)) if log else ("linear", lambda v: v)
    fig, (ax_fq, ax_mu) = plt.subplots(1, 2, figsize=(11, 4))
    for epoch in sorted({r.epoch for r in done}):
        pts = sorted((r for r in done if r.epoch == epoch), key=lambda r: r.alpha)
        xs = [r.alpha for r in pts]
        ax_fq.plot(xs, [y(r.objective) for r in pts], "o-", label=f"epoch {epoch}")
        ax_mu.plot(xs, [r.utility for r in pts], "o-", label=f"epoch {epoch}")
    ax_fq.set(yscale=scale, xlabel="alpha", ylabel=obj, title=f"{method}: {obj.split(' (')[0]}")
    ax_mu.axhline(threshold, color="grey", ls="--", label="utility floor")
    ax_mu.set(xlabel="alpha", ylabel=util, title=f"{method}: {util.split(' (')[0]}")
    ax_mu.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r.utility for r in done], [y(r.objective) for r in done],
               c=[r.alpha for r in done], cmap="viridis", label="trials (colour: alpha)")
    front = pareto_front(rows)
    ax.plot([r.utility for r in front], [y(r.objective) for r in front], "r-", label="Pareto front")
    base, best = base_row(rows), choose(rows)
    if base:
        ax.scatter([base.utility], [y(base.objective)], marker="s", s=90,
                   facecolors="none", edgecolors="k", label=f"base {method} (alpha 0, epoch {base.epoch})")
    if best:
        ax.scatter([best.utility], [y(best.objective)], marker="*", s=160, c="r",
                   label=f"chosen (alpha {best.alpha:.2f}, epoch {best.epoch})")
    ax.axvline(threshold, color="grey", ls="--", label="utility floor")
    ax.set(yscale=scale, xlabel=util.split(" (")[0], ylabel=obj, title=f"UIPE on {method}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2e}" if abs(x) < 1e-2 and x != 0 else f"{x:.3f}"
