"""`uipe experiment muse-scal` and `uipe experiment muse-sust`: MUSE's criteria C5 (scalability over the size of a
removal) and C6 (sustainability over sequential removal requests), each request served as `uipe run` serves one: the
base method's unlearning, then UIPE's alpha search.

    uipe experiment muse-scal --config uipe/presets/tiny_muse.yaml --set "unlearn.methods=[npo]"   # 2 CPU cores
    uipe experiment muse-sust --config uipe/presets/tiny_muse.yaml --set "unlearn.methods=[npo]"

<root>/prepared holds the world, the target and retrained models and PrivLeak's reference, made once. Then:
- scal: <root>/scal-k (k = 1..4) unlearns scal/forget_k (folds 1..k) from the target, every method in one run;
- sust: <root>/sust-<method>-k unlearns sust/forget_k (fold k) from request k-1's chosen model (UIPE's, the model a
  user would deploy; the target for k = 1), one chain per method.
Every run is evaluated as MUSE evaluates (VerbMem, KnowMem forget and PrivLeak are about the first fold; KnowMem
retain is the utility). The table shows, per request and method, the base method at its best epoch and UIPE's chosen
point at the space's utility floor: muse_<kind>.md and .json in <root>. Every run folder resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from uipe.config import ExperimentConfig
from uipe.console import say, stage
from uipe.data.muse import FOLDS
from uipe.io import atomic_write_json, atomic_write_text, exclusive
from uipe.paths import RunPaths
from uipe.study.render import md_table

Kind = Literal["scal", "sust"]
HEADLINE = ("knowmem_retain_rougeL", "verbmem_rougeL", "knowmem_forget_rougeL", "privleak")


def prepared(cfg: ExperimentConfig, root: Path) -> ExperimentConfig:
    """The world, both reference models and PrivLeak's reference under <root>/prepared (uipe run's first stages),
    and the configuration every request starts from: those models, that data and that reference, nothing trained
    again."""
    from uipe.benchmarks import get_benchmark
    from uipe.gate import summary_line
    from uipe.pipeline import ensure_reference
    from uipe.ray_session import ensure_ray
    from uipe.train.recipe import prepare

    paths = RunPaths.of(root / "prepared")
    stage("data, target and retrained models, PrivLeak's reference")
    data = get_benchmark(cfg.data.benchmark).ensure_data(cfg, paths)
    ensure_ray()
    say(summary_line(prepare(cfg, paths.root)))
    reference = ensure_reference(cfg, paths, data)
    raw = cfg.model_dump(mode="json")
    raw["model"].update(base=str(paths.base_model) if cfg.model.base == "tiny" else cfg.model.base,
                        target=cfg.model.target or str(paths.target_model))
    raw["data"]["source"], raw["prepare"]["retain"], raw["eval"]["retain_reference"] = data, False, reference
    raw["tracking"].update(uri=raw["tracking"]["uri"] or f"sqlite:///{root / 'mlflow.db'}",
                           experiment=raw["tracking"]["experiment"] or f"uipe-{cfg.name}-requests")
    return ExperimentConfig.model_validate(raw)


def request_config(base: ExperimentConfig, forget_split: str, methods: list[str], target: str | None = None,
                   name: str = "") -> ExperimentConfig:
    raw = base.model_dump(mode="json")
    raw["name"] = f"{base.name}-{name}" if name else base.name
    raw["data"]["forget_split"], raw["unlearn"]["methods"] = forget_split, methods
    if target:
        raw["model"]["target"] = target
    return ExperimentConfig.model_validate(raw)


def _row(request: str, outcome: dict) -> dict:
    """One table row's numbers: the base method's best point and UIPE's chosen one at the space's floor."""
    start = outcome["theta_ini"].get(outcome["utility_metric"]) or 0.0
    ratio = outcome["utility_threshold"] / start if start > 0 else 1.0  # the space's utility_floor
    floor = min(outcome["floors"], key=lambda f: abs(float(f) - ratio))
    at = outcome["floors"][floor]
    return {"request": request, "method": outcome["method"], "floor": floor,
            "theta_ini": {k: outcome["theta_ini"].get(k) for k in HEADLINE},
            **{arm: None if at.get(arm) is None else {k: at[arm].get(k) for k in ("alpha", "epoch", "objective",
                                                                                   *HEADLINE)}
               for arm in ("base", "uipe")}, "chosen_model": outcome["chosen_model"]}


def run_requests(cfg: ExperimentConfig, root: Path, kind: Kind, command: str) -> list[dict]:
    """Every request of the experiment, then its table (muse_<kind>.md, muse_<kind>.json)."""
    from uipe.pipeline import run_pipeline

    root = root.resolve()
    start, rows = time.time(), []
    with exclusive(root, f"uipe experiment muse-{kind}"):
        base = prepared(cfg, root)
        chains = [list(cfg.unlearn.methods)] if kind == "scal" else [[m] for m in cfg.unlearn.methods]
        for methods in chains:
            target = None
            for k, fold in enumerate(FOLDS, start=1):
                folder = f"scal-{k}" if kind == "scal" else f"sust-{methods[0]}-{k}"
                stage(f"muse-{kind}: request {k} of {len(FOLDS)} ({kind}/{fold}, {', '.join(methods)})")
                run_cfg = request_config(base, f"{kind}/{fold}", methods, target, folder)
                outcomes = run_pipeline(run_cfg, RunPaths.of(root / folder))
                rows += [_row(f"{kind}/{fold}", o.to_json()) for o in outcomes]
                target = outcomes[0].chosen_model if kind == "sust" else None  # the next request starts here
    text = markdown(rows, kind, command)
    atomic_write_json(root / f"muse_{kind}.json", {"command": command, "rows": rows,
                                                    "seconds": time.time() - start})
    atomic_write_text(root / f"muse_{kind}.md", text)
    plot(rows, kind, root / f"muse_{kind}.png")
    say(text)
    say(f"muse-{kind} done in {time.time() - start:.0f} s: {root}/muse_{kind}.md, .json, .png")
    return rows


def plot(rows: list[dict], kind: Kind, out: Path) -> Path:
    """KnowMem retain (utility) and PrivLeak per request, the base method and UIPE per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from uipe.study.render import finish_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        for arm, style in (("base", "--"), ("uipe", "-")):  # one colour per method, dashed: the base method
            for ax, key in zip(axes, ("knowmem_retain_rougeL", "privleak")):
                ys = [None if r[arm] is None else r[arm][key] for r in mine]
                ax.plot(range(1, len(mine) + 1), [float("nan") if y is None else y for y in ys], style, marker="o",
                        color=f"C{i}", label=f"{method} {'UIPE' if arm == 'uipe' else 'base'}")
    for ax, label in zip(axes, ("KnowMem retain (utility)", "PrivLeak (0: as the retrained model)")):
        ax.set_xticks(range(1, len(FOLDS) + 1))
        ax.set_xlabel("scal/forget_k: folds 1..k" if kind == "scal" else "sust/forget_k: request k")
        ax.set_ylabel(label)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    return finish_figure(fig, axes, out)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def markdown(rows: list[dict], kind: Kind, command: str) -> str:
    what = ("the forget set growing (scal/forget_k: folds 1..k), each unlearned from the target" if kind == "scal"
            else "sequential requests (sust/forget_k: fold k), each unlearned from the previous request's chosen model")
    header = ["request", "method", "floor", "arm", "alpha", "epoch", "KnowMem retain", "VerbMem", "KnowMem forget",
              "PrivLeak"]
    body = []
    for r in rows:
        for arm in ("base", "uipe"):
            p = r[arm]
            body.append([r["request"], r["method"], r["floor"], "UIPE" if arm == "uipe" else "base",
                         *(["-"] * 6 if p is None else [_f(p["alpha"]), str(p["epoch"]),
                                                        *(_f(p[k]) for k in HEADLINE)])])
    return "\n".join([f"# MUSE, {what}", "", f"`{command}`", "",
                      *md_table(header, body), ""])
