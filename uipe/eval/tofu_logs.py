"""Read TOFU's evaluation-log folders and compute forget quality / model utility from them.

A folder holds four files, each mapping metric -> {item index: value} (see uipe/data/tofu_files/README.md):
eval_log.json (retain), eval_log_forget.json (forget), eval_real_author_wo_options.json (real authors),
eval_real_world_wo_options.json (world facts). The numbers come out as locuslab/tofu aggregate_eval_stat.py
computes them, so published results can be held against ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from uipe.errors import UipeError
from uipe.eval import metrics

# split role -> (file name, split kind for metrics.split_summary)
LOG_FILES: dict[str, tuple[str, metrics.SplitKind]] = {
    "retain": ("eval_log.json", "retain"),
    "forget": ("eval_log_forget.json", "forget"),
    "real_authors": ("eval_real_author_wo_options.json", "factual"),
    "world_facts": ("eval_real_world_wo_options.json", "factual"),
}
NEEDED_KEYS = ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall")


@dataclass(frozen=True)
class SplitLog:
    """One TOFU log file, items in index order."""

    path: Path
    answer_nll: tuple[float, ...]
    paraphrase_nll: tuple[float, ...]
    perturbed_nll: tuple[tuple[float, ...], ...]
    rouge_l: tuple[float, ...]

    def truth_ratios(self) -> np.ndarray:
        return metrics.truth_ratios(self.paraphrase_nll, self.perturbed_nll)


def shipped_logs_dir(name: str = "") -> Path:
    """uipe/data/tofu_files/eval_logs[/name]: TOFU's published Llama-2-7b logs (MIT), shipped with the package."""
    root = Path(str(resources.files("uipe") / "data" / "tofu_files" / "eval_logs"))
    return root / name if name else root


def _by_index(path: Path, key: str, table: object) -> list[object]:
    if not isinstance(table, dict) or not table:
        raise UipeError(f"{path}: {key} must map item index -> value")
    try:
        order = sorted(table, key=int)  # "10" after "9": JSON keys are strings
    except ValueError:
        raise UipeError(f"{path}: {key} has a non-integer item index") from None
    return [table[k] for k in order]


def read_split_log(path: str | Path) -> SplitLog:
    path = Path(path)
    if not path.is_file():
        raise UipeError(f"{path}: TOFU eval log not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UipeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UipeError(f"{path}: expected an object mapping metric -> {{item: value}}")
    missing = [k for k in NEEDED_KEYS if k not in raw]
    if missing:
        raise UipeError(f"{path}: missing key(s) {', '.join(missing)}")
    cols = {k: _by_index(path, k, raw[k]) for k in NEEDED_KEYS}
    sizes = {k: len(v) for k, v in cols.items()}
    if len(set(sizes.values())) != 1:
        raise UipeError(f"{path}: metrics cover different numbers of items {sizes}")
    try:
        return SplitLog(
            path=path,
            answer_nll=tuple(float(x) for x in cols["avg_gt_loss"]),  # type: ignore[arg-type]
            paraphrase_nll=tuple(float(x) for x in cols["avg_paraphrased_loss"]),  # type: ignore[arg-type]
            perturbed_nll=tuple(tuple(float(y) for y in row) for row in cols["average_perturb_loss"]),  # type: ignore[union-attr]
            rouge_l=tuple(float(x) for x in cols["rougeL_recall"]),  # type: ignore[arg-type]
        )
    except (TypeError, ValueError):
        raise UipeError(f"{path}: a metric value is not a number (or a list of numbers)") from None


def read_log_dir(folder: str | Path, roles: tuple[str, ...] = tuple(LOG_FILES)) -> dict[str, SplitLog]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UipeError(f"{folder}: TOFU eval-log folder not found")
    return {role: read_split_log(folder / LOG_FILES[role][0]) for role in roles}


def summarize_logs(logs: dict[str, SplitLog]) -> dict[str, float]:
    """<role>_prob, <role>_rougeL, <role>_truth_ratio for each role present, plus model_utility if possible."""
    out: dict[str, float] = {}
    for role, log in logs.items():
        kind = LOG_FILES[role][1]
        summary = metrics.split_summary(kind, log.answer_nll, log.paraphrase_nll, log.perturbed_nll, log.rouge_l)
        out.update({f"{role}_{k}": v for k, v in summary.items()})
    if all(k in out for k in metrics.UTILITY_KEYS):
        out["model_utility"] = metrics.model_utility(out)
    return out


def forget_truth_ratios(folder: str | Path) -> np.ndarray:
    """The raw per-item truth ratios of eval_log_forget.json (what a retain reference needs)."""
    return read_split_log(Path(folder) / LOG_FILES["forget"][0]).truth_ratios()


def tofu_report(model_logs_dir: str | Path, retain_logs_dir: str | Path) -> dict[str, float]:
    """forget_quality, model_utility and the nine utility components (+ forget-split numbers) from two log folders."""
    logs = read_log_dir(model_logs_dir)
    retain_forget = read_split_log(Path(retain_logs_dir) / LOG_FILES["forget"][0])
    model_r, retain_r = logs["forget"].truth_ratios(), retain_forget.truth_ratios()
    if model_r.size != retain_r.size:
        # TOFU compares the same forget items on both sides; a different count means different splits.
        raise UipeError(
            f"{retain_forget.path}: {retain_r.size} forget items, but {logs['forget'].path} has {model_r.size}"
            " (model and retain logs must be for the same forget split)"
        )
    out = summarize_logs(logs)
    out["forget_quality"] = metrics.forget_quality(model_r, retain_r)
    return out
