"""Search results as a table, the Pareto front, the choice of a trial, and the plots (PNG) a person looks at.

Pure functions over TrialResult records (uipe/search/result.py), so they are testable without Ray or MLflow.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from uipe.search.result import COLUMNS, TrialResult


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


def completed(rows: list[TrialResult]) -> list[TrialResult]:
    return [r for r in rows if r.ok]


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
    feasible = [r for r in done if r.feasible]
    if feasible:
        return max(feasible, key=lambda r: (r.objective, r.model_utility, -r.alpha))
    return max(done, key=lambda r: (r.model_utility, r.objective))


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
