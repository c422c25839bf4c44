"""The retain reference: the retain model's per-item truth ratios, against which forget quality is a KS test.

Computed once from the retain model (always over every item, so subset trials and full evaluations share it),
stored as JSON keyed by (model hash, data hash); or read from a folder of TOFU eval logs (eval_log_forget.json),
so a user of the published TOFU models can plug in the benchmark's own logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uipe.errors import UipeError
from uipe.io import atomic_write_json, hash_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from uipe.eval.evaluate import Evaluator

FORMAT = "uipe-retain-reference/1"
HOW_TO = ("make one with `uipe reference --config C` (or `uipe prepare`), or pass --retain-reference DIR "
          "with TOFU eval logs (eval_log_forget.json)")
# TOFU's published logs: forget01 = 40 items, forget05 = 200, forget10 = 400 (300 in the Llama-2 logs).
TOFU_LOG_SIZES = {40: "forget01", 200: "forget05", 300: "forget10", 400: "forget10"}


@dataclass(frozen=True)
class RetainReference:
    forget_split: str
    forget_truth_ratios: tuple[float, ...]  # raw R per item, in split order
    related_truth_ratios: tuple[float, ...] | None
    model_hash: str | None  # None for TOFU logs (the model is not at hand)
    data_hash: str | None
    origin: str  # "uipe" or "tofu-logs:<folder>"

    def to_json(self) -> dict:
        return {"format": FORMAT, "forget_split": self.forget_split, "model_hash": self.model_hash,
                "data_hash": self.data_hash, "origin": self.origin, "subset": None,
                "forget_truth_ratios": list(self.forget_truth_ratios),
                "related_truth_ratios": None if self.related_truth_ratios is None else list(self.related_truth_ratios)}

    def fitted_to(self, forget_split: str, data_hash: str, n_forget: int, n_related: int) -> RetainReference:
        """The reference cut to an evaluation's first n items; UipeError when it is for other data or too few items.

        A subset evaluation takes the first N items of each split, so a full reference restricted to its first N
        truth ratios is exactly the reference of that subset.
        """
        where = f"retain reference ({self.origin})"
        if self.forget_split != forget_split:
            raise UipeError(f"{where}: made for {self.forget_split}, evaluation is on {forget_split}")
        if self.data_hash is not None and self.data_hash != data_hash:
            raise UipeError(f"{where}: made from other evaluation data (data hash {self.data_hash[:12]} != "
                            f"{data_hash[:12]}); {HOW_TO}")
        if len(self.forget_truth_ratios) < n_forget:
            hint = f"; set eval.subset={len(self.forget_truth_ratios)} to use it"
            raise UipeError(f"{where}: {len(self.forget_truth_ratios)} forget items, evaluation has {n_forget}{hint}")
        related = self.related_truth_ratios
        if related is not None and n_related and len(related) < n_related:
            raise UipeError(f"{where}: {len(related)} related items, evaluation has {n_related}")
        return replace(self, forget_truth_ratios=self.forget_truth_ratios[:n_forget],
                       related_truth_ratios=related[:n_related] if related is not None and n_related else None)


def model_hash(model_dir: str | Path) -> str:
    """Weights, config and tokenizer files of a model folder: any change means a different retain model."""
    return hash_dir(model_dir)


def compute_reference(evaluator: Evaluator, retain_model: PreTrainedModel,
                      model_hash: str | None = None) -> RetainReference:
    full = evaluator.full_fidelity()
    ratios = full.truth_ratios(retain_model, ["forget", "related"])
    related = ratios.get("related")
    return RetainReference(evaluator.forget_split, tuple(ratios["forget"].tolist()),
                           None if related is None else tuple(related.tolist()), model_hash, full.data_hash, "uipe")


def save_reference(reference: RetainReference, path: str | Path) -> Path:
    return atomic_write_json(path, reference.to_json())


def _from_json(path: Path) -> RetainReference:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UipeError(f"{path}: cannot read retain reference ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UipeError(f"{path}: not a uipe retain reference (format {FORMAT!r}); {HOW_TO}")
    try:
        related = raw["related_truth_ratios"]
        return RetainReference(str(raw["forget_split"]), tuple(float(x) for x in raw["forget_truth_ratios"]),
                               None if related is None else tuple(float(x) for x in related),
                               raw["model_hash"], raw["data_hash"], str(raw["origin"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UipeError(f"{path}: malformed retain reference ({type(e).__name__}: {e})") from None


def _from_tofu_logs(folder: Path) -> RetainReference:
    from uipe.eval.tofu_logs import forget_truth_ratios

    ratios = forget_truth_ratios(folder)
    split = TOFU_LOG_SIZES.get(ratios.size)
    if split is None:
        raise UipeError(f"{folder}/eval_log_forget.json: {ratios.size} items match no TOFU forget split "
                        f"({', '.join(f'{n} = {s}' for n, s in TOFU_LOG_SIZES.items())})")
    return RetainReference(split, tuple(ratios.tolist()), None, None, None, f"tofu-logs:{folder}")


def load_reference(path: str | Path) -> RetainReference:
    """A uipe reference JSON, or a folder of TOFU eval logs (its eval_log_forget.json truth ratios)."""
    path = Path(path)
    if path.is_dir():
        return _from_tofu_logs(path)
    if not path.is_file():
        raise UipeError(f"{path}: retain reference not found; {HOW_TO}")
    return _from_json(path)


def load_or_compute_reference(path: str | Path, evaluator: Evaluator, retain_model_dir: str | Path,
                              dtype: str = "auto", device: str | None = None) -> RetainReference:
    """The cached reference at `path` if it was made from this retain model and data, else compute and save it."""
    from uipe.stages import reusable

    path, mhash = Path(path), model_hash(retain_model_dir)
    cached = _from_json(path) if path.is_file() else None
    want = {"model_hash": mhash, "data_hash": evaluator.data_hash, "forget_split": evaluator.forget_split}
    if cached is not None and reusable(cached.to_json(), want, path):
        return cached  # data_hash covers every evaluation item
    from uipe.models import default_device, load_model

    model = load_model(retain_model_dir, dtype=dtype, device=device or default_device())
    reference = compute_reference(evaluator, model, mhash)
    save_reference(reference, path)
    return reference


def reference_summary(reference: RetainReference, path: Path | None = None) -> dict:
    r = np.asarray(reference.forget_truth_ratios)
    return {"path": str(path) if path else None, "forget_split": reference.forget_split, "forget_items": int(r.size),
            "related_items": len(reference.related_truth_ratios or ()), "median_truth_ratio": float(np.median(r)),
            "model_hash": reference.model_hash, "data_hash": reference.data_hash, "origin": reference.origin}
