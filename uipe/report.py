"""Search results as a table, the Pareto front, the choice of a trial, and the plots (PNG) a person looks at.

Pure functions over TrialResult records (uipe/search/result.py), so they are testable without Ray or MLflow.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from uipe.search.result import COLUMNS, TrialResult

# The utility floors a result is shown at (fractions of theta_ini's model utility); the space file's utility_floor
# picks which one's point becomes the registered champion.
FLOORS = (0.95, 0.90, 0.85, 0.80)


def floor_key(floor: float) -> str:
    """A floor as a JSON key: "0.95", "0.9", ..."""
    return str(float(floor))


def to_csv(rows: list[TrialResult]) -> str:
    """One line per trial, sorted by epoch then alpha; a failed trial's metrics are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r.epoch, r.alpha)):
        cells = {k: getattr(row, k) for k in COLUMNS}
        if not row.ok:
            cells = {k: v if k in ("trial_id", "status", "alpha", "epoch", "error") else "" for k, v in cells.items()}
        writer.writerow(cells)
    return buf.getvalue()


def from_csv(text: str) -> list[TrialResult]:
    """The trials of a results.csv (to_csv's inverse, less the evaluator's other aggregates)."""
    out = []
    for cells in csv.DictReader(io.StringIO(text)):
        alpha, epoch = float(cells["alpha"]), int(cells["epoch"])
        if cells["status"] != "ok":
            out.append(TrialResult.failed(cells["trial_id"], alpha, epoch, cells["error"]))
            continue
        numbers = {k: float(v) if v != "" else math.nan for k, v in cells.items()
                   if k not in ("trial_id", "status", "alpha", "epoch", "feasible", "error", "fidelity")}
        out.append(TrialResult(cells["trial_id"], "ok", alpha, epoch, feasible=cells["feasible"] == "True",
                               error=cells["error"], fidelity=cells.get("fidelity") or "full", **numbers))
    return out


def completed(rows: list[TrialResult]) -> list[TrialResult]:
    """Trials completed at full fidelity: what every choice, front, floor and plot uses (a screened-only trial has no
    model utility, so it can never be chosen)."""
    return [r for r in rows if r.full]


def pareto_front(rows: list[TrialResult]) -> list[TrialResult]:
    """Completed trials no other trial beats on both the objective (forget quality, or a reference-free signal) and
    model utility (both maximised)."""
    done = completed(rows)
    front = []
    for r in done:
        dominated = any(
            o.objective >= r.objective and o.model_utility >= r.model_utility
            and (o.objective > r.objective or o.model_utility > r.model_utility) for o in done)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.model_utility)


def choose(rows: list[TrialResult]) -> TrialResult | None:
    """The best feasible trial: highest objective (forget quality unless the space says otherwise), then higher
    utility, then the smaller alpha.

    Ray's get_best_result ignores constraints, hence this. With no feasible trial, the least infeasible one (the
    highest utility) is returned with feasible = 0, so a caller can say so rather than fail.
    """
    done = completed(rows)
    if not done:
        return None
    feasible = _best([r for r in done if r.feasible])
    return feasible or max(done, key=lambda r: (r.model_utility, r.objective))


def _best(rows: list[TrialResult]) -> TrialResult | None:
    """Highest objective, then higher utility, then the smaller alpha (the search's own rule)."""
    return max(rows, key=lambda r: (r.objective, r.model_utility, -r.alpha)) if rows else None


def best_above(rows: list[TrialResult], utility: float) -> TrialResult | None:
    """The best completed trial with model utility >= `utility` (None: no trial gets there)."""
    return _best([r for r in completed(rows) if r.model_utility >= utility])


def best_at_floors(rows: list[TrialResult], start_utility: float,
                   floors: tuple[float, ...] = FLOORS) -> dict[str, dict[str, dict | None]]:
    """Per floor f: the best point of the base method (alpha 0) and of UIPE (any alpha) among the completed trials
    with model utility >= f x theta_ini's, by the search's objective; None where no trial reaches the floor."""
    out = {}
    for floor in floors:
        base = best_above([r for r in rows if r.alpha == 0.0], floor * start_utility)
        uipe = best_above(rows, floor * start_utility)
        out[floor_key(floor)] = {"base": base.summary() if base else None, "uipe": uipe.summary() if uipe else None}
    return out


def base_row(rows: list[TrialResult]) -> TrialResult | None:
    """The plain base method (alpha = 0) at its best epoch, chosen by the same rule as the UIPE trials."""
    return choose([r for r in rows if r.alpha == 0.0])


def plot_search(rows: list[TrialResult], method: str, threshold: float, out_dir: Path,
                objective: str = "forget quality (KS p-value)") -> list[Path]:
    """Two PNGs: metrics against alpha per epoch, and the forget-quality/utility plane with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = completed(rows)
    if not done:  # nothing to draw (every trial failed): the caller says so
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "alpha_curves.png", out_dir / "pareto.png"]
    fig, (ax_fq, ax_mu) = plt.subplots(1, 2, figsize=(11, 4))
    for epoch in sorted({r.epoch for r in done}):
        pts = sorted((r for r in done if r.epoch == epoch), key=lambda r: r.alpha)
        xs = [r.alpha for r in pts]
        ax_fq.plot(xs, [max(r.objective, 1e-300) for r in pts], "o-", label=f"epoch {epoch}")
        ax_mu.plot(xs, [r.model_utility for r in pts], "o-", label=f"epoch {epoch}")
    ax_fq.set(yscale="log", xlabel="alpha", ylabel=objective, title=f"{method}: {objective.split(' (')[0]}")
    ax_mu.axhline(threshold, color="grey", ls="--", label="utility floor")
    ax_mu.set(xlabel="alpha", ylabel="model utility", title=f"{method}: model utility")
    ax_mu.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r.model_utility for r in done], [max(r.objective, 1e-300) for r in done],
               c=[r.alpha for r in done], cmap="viridis", label="trials (colour: alpha)")
    front = pareto_front(rows)
    ax.plot([r.model_utility for r in front], [max(r.objective, 1e-300) for r in front], "r-",
            label="Pareto front")
    base, best = base_row(rows), choose(rows)
    if base:
        ax.scatter([base.model_utility], [max(base.objective, 1e-300)], marker="s", s=90,
                   facecolors="none", edgecolors="k", label=f"base {method} (alpha 0, epoch {base.epoch})")
    if best:
        ax.scatter([best.model_utility], [max(best.objective, 1e-300)], marker="*", s=160, c="r",
                   label=f"chosen (alpha {best.alpha:.2f}, epoch {best.epoch})")
    ax.axvline(threshold, color="grey", ls="--", label="utility floor")
    ax.set(yscale="log", xlabel="model utility", ylabel=objective, title=f"UIPE on {method}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2e}" if abs(x) < 1e-2 and x != 0 else f"{x:.3f}"
