"""The reconstruction experiment's comparison over seeds (uipe/study/reconstruction.py): pure functions over its
JSON-shaped per-seed trajectories, the Markdown report and the figure.

A trajectory is one arm's metrics per epoch, theta_ini first (epoch 0). Arms are compared at the last epoch by
per-seed paired differences against `with` (the standard target): lower forget probability, ROUGE-L and related
probability, and higher log10 forget quality, mean that the arm forgot more.
"""

from __future__ import annotations

from pathlib import Path

from uipe.errors import UipeError
from uipe.study.aggregate import log10_fq, t_interval
from uipe.study.render import ci, diff, finish_figure, md_table

ARMS = ("with", "without", "related")
# metric -> how it is compared (FQ spans decades: log10) and which sign means "forgot more"
COMPARED = {"forget_prob": -1, "forget_rougeL": -1, "log10_forget_quality": +1, "related_prob": -1,
            "related_rougeL": -1, "model_utility": 0}
DESCRIPTION = {"without": "target trained without the forget authors' related facts",
               "related": "the standard target unlearned on the forget set and its related facts"}


def value(row: dict, metric: str) -> float | None:
    if metric == "log10_forget_quality":
        return log10_fq(row.get("forget_quality"))
    v = row.get(metric)
    return None if v is None else float(v)


def _rows(seed: dict, method: str, arm: str) -> list[dict]:
    try:
        rows = seed["methods"][method][arm]
    except (KeyError, TypeError):
        raise UipeError(f"seed {seed.get('seed')}: no trajectory for method {method}, arm {arm}") from None
    if not rows or rows[0].get("epoch") != 0:
        raise UipeError(f"seed {seed.get('seed')}, {method}, {arm}: a trajectory starts with theta_ini (epoch 0)")
    return rows


def compare(seeds: list[dict]) -> dict:
    """Per method: each arm's metrics at theta_ini and at the last epoch (t intervals over seeds), and the paired
    differences arm - `with` at the last epoch (wins: seeds where the arm forgot more)."""
    methods = list(dict.fromkeys(m for s in seeds for m in s["methods"]))
    out = {}
    for method in methods:
        have = [s for s in seeds if method in s["methods"]]
        arms = {arm: {when: {m: t_interval([value(_rows(s, method, arm)[i], m) for s in have]) for m in COMPARED}
                      for when, i in (("start", 0), ("end", -1))} for arm in ARMS}
        paired = {}
        for arm in ("without", "related"):
            paired[arm] = {}
            for m, sign in COMPARED.items():
                d = [value(_rows(s, method, arm)[-1], m) - value(_rows(s, method, "with")[-1], m) for s in have
                     if value(_rows(s, method, arm)[-1], m) is not None
                     and value(_rows(s, method, "with")[-1], m) is not None]
                paired[arm][m] = {**t_interval(d), "forgot_more": sum(sign * x > 0 for x in d) if sign else None}
        out[method] = {"seeds": [s["seed"] for s in have], "arms": arms, "paired": paired}
    return out


def markdown(result: dict) -> str:
    lines = ["# Reconstruction: does related knowledge rebuild forgotten facts?", "", "```", result["command"], "```",
             "", "Arms: `with` = the standard target (trained with the forget authors' related facts), unlearned on "
             "the forget set;", f"`without` = {DESCRIPTION['without']}, unlearned the same way;",
             f"`related` = {DESCRIPTION['related']}.",
             "Mean [95% t interval] over seeds; forget quality as log10. `end` = the last unlearning epoch.", ""]
    for method, c in result["comparison"].items():
        lines += [f"## {method} (seeds {', '.join(str(s) for s in c['seeds'])})", ""]
        rows = [[arm, when] + [ci(c["arms"][arm][when][m]) for m in COMPARED] for arm in ARMS
                for when in ("start", "end")]
        lines += md_table(["arm", "when", *COMPARED], rows) + [""]
        lines += ["Paired differences at the last epoch, arm - `with` (forgot more: seeds where the arm is lower on",
                  "probability/ROUGE-L, higher on log10 forget quality):", ""]
        rows = []
        for arm, by_metric in c["paired"].items():
            cells = []
            for m, t in by_metric.items():
                text = diff({**t, "wins": t["forgot_more"] or 0, "ties": 0}, "", "+.3f")
                cells.append(text.replace("wins", "forgot more") if COMPARED[m] else text.split(", wins")[0])
            rows.append([arm, *cells])
        lines += md_table(["arm - with", *COMPARED], rows) + [""]
    return "\n".join(lines)


def plot(seeds: list[dict], out: Path) -> Path:
    """Per method a row of three panels over epochs: forget probability, log10 forget quality, related
    probability; each arm's mean over seeds with its 95% interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for s in seeds for m in s["methods"]))
    panels = ("forget_prob", "log10_forget_quality", "related_prob")
    fig, axes = plt.subplots(max(1, len(methods)), 3, figsize=(14, 3.6 * max(1, len(methods))), squeeze=False)
    for row, method in zip(axes, methods):
        have = [s for s in seeds if method in s["methods"]]
        for ax, metric in zip(row, panels):
            for j, arm in enumerate(ARMS):
                n = min(len(_rows(s, method, arm)) for s in have)
                ts = [t_interval([value(_rows(s, method, arm)[i], metric) for s in have]) for i in range(n)]
                xs = [i for i, t in enumerate(ts) if t["mean"] is not None]
                ax.plot(xs, [ts[i]["mean"] for i in xs], "o-", color=f"C{j}", ms=3, label=arm)
                band = [i for i in xs if ts[i]["low"] is not None]
                ax.fill_between(band, [ts[i]["low"] for i in band], [ts[i]["high"] for i in band],
                                color=f"C{j}", alpha=0.15)
            ax.set(xlabel="unlearning epoch (0 = target)", ylabel=metric, title=f"{method}: {metric}")
    return finish_figure(fig, axes.ravel(), out)
