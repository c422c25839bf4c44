"""`uipe experiment sweep`: UIPE's gain over the base method as one setting of the world varies; a study per value.

    uipe experiment sweep --vary data.synth.tied=0,1,3,5 --seeds 3 \\
        --set "unlearn.methods=[graddiff]" --set study.more_baseline=false      # tiny preset, 2 CPU cores

Per value v, <root>/<setting>-<v>/ is a whole `uipe study` (uipe/study/driver.py) of the configuration with
`<key>=v`: fresh worlds, training and searches per seed, so an interrupted sweep resumes. The sweep then tabulates,
per method, value and utility floor, the paired UIPE - base difference of log10 forget quality on the report fold
(and of hypervolume) with its 95% t interval over seeds: sweep.md, sweep.json, sweep.png.
"""

from __future__ import annotations

import time
from pathlib import Path

from uipe.config import ExperimentConfig, apply_overrides
from uipe.console import say, stage
from uipe.errors import UipeError
from uipe.io import atomic_write_json, atomic_write_text
from uipe.decisions import floor_key
from uipe.schema import one_line
from uipe.study.render import diff, finish_figure, md_table

RESULT_FILE = "sweep.json"


def parse_vary(text: str) -> tuple[str, list[str]]:
    """"data.synth.tied=0,1,3" -> ("data.synth.tied", ["0", "1", "3"]); one line naming --vary otherwise."""
    key, _, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not key.strip() or len(items) < 2 or len(set(items)) != len(items):
        raise UipeError(f"--vary {text!r}: expected key=v1,v2,... with at least two distinct values, "
                        "e.g. --vary data.synth.tied=0,1,3,5")
    return key.strip(), items


def setting_configs(cfg: ExperimentConfig, key: str, values: list[str]) -> dict[str, ExperimentConfig]:
    """folder name -> the study's configuration with key=value (validated: a bad key or value is one line)."""
    from pydantic import ValidationError

    out = {}
    for v in values:
        raw = apply_overrides(cfg.model_dump(mode="json"), [f"{key}={v}"])
        try:
            out[f"{key.rsplit('.', 1)[-1]}-{v}"] = ExperimentConfig.model_validate(raw)
        except ValidationError as e:
            raise UipeError(one_line(e, f"--vary {key}={v}")) from None
    return out


def check_sweep(cfg: ExperimentConfig, root: Path, key: str, values: list[str]) -> dict[str, ExperimentConfig]:
    """Every setting's configuration, each checked against its study folder before anything runs."""
    from uipe.study.driver import check_study

    settings = setting_configs(cfg, key, values)
    for name, setting in settings.items():
        check_study(setting, root / name)
    return settings


def run_sweep(cfg: ExperimentConfig, root: Path, key: str, values: list[str], command: str) -> dict:
    """A study per value, then the sweep's tables and plot."""
    from uipe.study.driver import run_study

    root = root.resolve()
    settings = check_sweep(cfg, root, key, values)
    start, studies = time.time(), {}
    for i, (name, setting) in enumerate(settings.items()):
        stage(f"sweep {key}: {name} ({i + 1} of {len(settings)})")
        studies[name] = run_study(setting, root / name, f"{command} [{key}={values[i]}]")["aggregate"]
    result = {"command": command, "key": key, "values": values, "settings": list(settings),
              "gains": gains(studies), "seconds": time.time() - start}
    text = markdown(result)
    plot(result, root / "sweep.png")
    atomic_write_text(root / "sweep.md", text)
    atomic_write_json(root / RESULT_FILE, result)
    say(text)
    say(f"Sweep done in {time.time() - start:.0f} s: {root / 'sweep.md'}, {root / 'sweep.png'}")
    return result


def gains(studies: dict[str, dict]) -> dict:
    """method -> setting -> {"floors": {floor: paired UIPE - base log10 FQ (report)}, "hypervolume": paired,
    "base"/"uipe": {floor: log10 FQ interval}} from each setting's study aggregate (a dict keyed by method, arm,
    floor and statistic: uipe/study/aggregate.py)."""
    from uipe.study.aggregate import REPORTED, UIPE_BASE
    from uipe.study.records import BASE, UIPE

    out: dict = {}
    for name, agg in studies.items():
        fks = [floor_key(f) for f in agg["floors"]]
        for method, m in agg["methods"].items():
            out.setdefault(method, {})[name] = {
                "seeds": m["seeds"],
                "floors": {fk: m["paired"][UIPE_BASE][fk][REPORTED] for fk in fks},
                "hypervolume": m["hypervolume_paired"][UIPE_BASE],
                **{arm: {fk: m["arms"][arm][fk][REPORTED] for fk in fks} for arm in (BASE, UIPE)},
            }
    return out


def markdown(result: dict) -> str:
    lines = [f"# UIPE's gain as {result['key']} varies", "", "```", result["command"], "```", "",
             "Paired UIPE - base difference of log10 forget quality (report fold) at each utility floor: mean [95% t",
             "interval] over the seeds where both reached the floor, wins = seeds where UIPE is higher; hypervolume:",
             "UIPE - base in the (log10 forget quality, utility ratio) plane.", ""]
    for method, by_setting in result["gains"].items():
        fks = list(next(iter(by_setting.values()))["floors"])
        rows = [[name, *(diff(g["floors"][fk]) for fk in fks), diff(g["hypervolume"], "", "+.3f")]
                for name, g in by_setting.items()]
        lines += [f"## {method}", ""] + md_table(["setting", *(f"floor {fk}" for fk in fks), "hypervolume"], rows)
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> Path:
    """One subplot per method: per setting, the paired UIPE - base log10 forget quality at each floor, with 95%
    interval error bars; a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["gains"]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(5.5 * max(1, len(methods)), 4), squeeze=False)
    for ax, (method, by_setting) in zip(axes[0], methods.items()):
        names = list(by_setting)
        fks = list(by_setting[names[0]]["floors"])
        for j, fk in enumerate(fks):
            name_it = f"floor {fk}"
            for i, name in enumerate(names):
                t = by_setting[name]["floors"][fk]
                if t["mean"] is None:
                    continue
                err = None if t["low"] is None else [[t["mean"] - t["low"]], [t["high"] - t["mean"]]]
                ax.errorbar([i + (j - (len(fks) - 1) / 2) * 0.12], [t["mean"]], yerr=err, fmt="o", color=f"C{j}",
                            capsize=3, label=name_it)
                name_it = None
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(range(len(names)), names)
        ax.set(xlabel=result["key"], ylabel="UIPE - base: delta log10 forget quality", title=method)
    return finish_figure(fig, axes[0], out)
