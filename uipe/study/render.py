"""Markdown and PNG output shared by the study and the mechanism experiments: numbers, intervals as text, tables,
and figures written atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uipe.io import atomic_file


def num(x: float | None, spec: str = "") -> str:
    if x is None:
        return "-"
    if spec:
        return format(x, spec)
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-2 else f"{x:.3f}"


def ci(t: dict, spec: str = "") -> str:
    """mean [low, high], or the mean alone for one seed."""
    if t["mean"] is None:
        return "-"
    if t["low"] is None:
        return num(t["mean"], spec)
    return f"{num(t['mean'], spec)} [{num(t['low'], spec)}, {num(t['high'], spec)}]"


def pow10(x: float) -> str:
    """10**x as "3.1e-03", formatted from x itself: a wide interval's 10**high can overflow a float."""
    e = math.floor(x)
    m = round(10 ** (x - e), 1)
    if m >= 10:
        m, e = m / 10, e + 1
    return f"{m:.1f}e{e:+03d}"


def geo(t: dict, feasible: int, n_seeds: int) -> str:
    """Geometric mean of forget quality [interval] = 10**mean, 10**low, 10**high of log10; (k/n) when not all
    seeds had a feasible point."""
    if t["mean"] is None:
        text = "-"
    elif t["low"] is None:
        text = pow10(t["mean"])
    else:
        text = f"{pow10(t['mean'])} [{pow10(t['low'])}, {pow10(t['high'])}]"
    return text if feasible == n_seeds else f"{text} ({feasible}/{n_seeds})"


def diff(t: dict, unit: str = " log10", spec: str = "+.2f") -> str:
    """mean [interval] of a paired difference, wins (and ties, if any) out of the seeds compared."""
    if t["mean"] is None:
        return "-"
    ties = f", ties {t['ties']}" if t.get("ties") else ""
    return f"{ci(t, spec)}{unit}, wins {t['wins']}/{t['n']}{ties}"


def label(name: str) -> str:
    """"uipe-base" -> "UIPE - base"."""
    return name.replace("uipe", "UIPE").replace("-", " - ")


def md_table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def save_png(fig: Any, out: Path) -> Path:
    """savefig to a temporary sibling, then rename: a crash never leaves a half-written PNG under `out`."""
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(out)


def finish_figure(fig: Any, axes: Any, out: Path) -> Path:
    """Legends where there is something to name, then the figure written atomically and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_png(fig, out)
    plt.close(fig)
    return path
