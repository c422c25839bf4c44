"""MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", arXiv 2407.06460) and
the embedded synthetic MUSE-format world: the benchmark's data (uipe/data/muse.py, uipe/data/synth_muse.py), its
evaluator (uipe/eval/muse_evaluate.py: VerbMem, KnowMem, Min-K% AUC, PrivLeak) and its metric catalogue. The only
place outside uipe/data and uipe/eval that names a MUSE split or metric.

Objectives. MUSE asks for C1-C3 to look like a retrained model's and C4 to stay. PrivLeak's ideal is 0 (a leak as
the retrained model's), not an extreme, so a search maximises `privleak_closeness` = 1 - |PrivLeak| / 100: 1 at the
retrained model, 0 at PrivLeak -100 (AUC 0: the forget set recognised every time, a target model's typical value).
It orders points exactly as -|PrivLeak| does (the choice changes no search decision) but reads on the same
"1 is ideal" scale as TOFU's closeness objectives in tables and plots. Without a retrained model, `min_k_closeness`
= 1 - 2|AUC - 0.5| asks the same of the AUC against chance (a never-seen forget set's AUC is about 0.5).

Training is on raw text (MUSE's baselines train causal LMs on its corpora): prepare's target on every forget fold +
retain1 + retain2, its retrained model (the "retain" role) on retain1 + retain2; unlearning on raw/forget with
raw/retain1 as the retain stream. Each text is encoded into max_length windows by uipe.prompts.encode_record. A
method that needs questions (IdkDPO's "I don't know" answers) does not apply: `raw_text` says so to the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uipe import metrics
from uipe.errors import UipeError
from uipe.metrics import Metric, register

if TYPE_CHECKING:
    from uipe.config import EvalConfig, ExperimentConfig
    from uipe.paths import RunPaths

NAME = "muse"
NO_QUESTIONS = ("muse: MUSE's forget set is raw text, with no questions to answer \"I don't know\" to "
                "(a method that needs them, IdkDPO, does not apply)")


def _m(name: str, label: str, short: str, **kw: Any) -> Metric:
    return Metric(name, label, short, benchmark=NAME, **kw)


def _closeness(key: str, ideal: float, scale: float) -> Callable[[Mapping[str, float]], float]:
    """1 - |m[key] - ideal| / scale: 1 at the ideal value, what a search maximises."""
    return lambda m: 1.0 - abs(m[key] - ideal) / scale


_AUC = "Min-40% AUC, forget vs holdout"
# Headline metrics first, in the order summaries and tables show them (MUSE's four headline numbers and the AUC).
HEADLINE = (
    _m("verbmem_rougeL", "VerbMem: ROUGE-L F1 of forget-excerpt continuations (C1)", "VerbMem", direction="min",
       objective=True, needs_generation=True, headline=True),
    _m("knowmem_forget_rougeL", "KnowMem on forget questions: ROUGE-L F1 (C2)", "KnowMem forget", direction="min",
       objective=True, needs_generation=True, headline=True),
    _m("knowmem_retain_rougeL", "KnowMem on retain questions: ROUGE-L F1 (C4, utility)", "KnowMem retain",
       utility=True, needs_generation=True, headline=True),
    _m("privleak", f"PrivLeak: relative difference of the {_AUC} from the retrained model's, % (C3)", "PrivLeak",
       needs_reference=True, headline=True),
    _m("min_k_auc", f"{_AUC} (0: forget set memorised, ~0.5: never seen)", "Min-K% AUC", headline=True),
)
OTHERS = (
    _m("privleak_closeness", "1 - |PrivLeak| / 100 (1: leaks as the retrained model does)", "PrivLeak closeness",
       objective=True, needs_reference=True, derive=_closeness("privleak", 0.0, 100.0)),
    _m("min_k_closeness", f"1 - 2|{_AUC} - 0.5| (1: forget and holdout indistinguishable)", "Min-K% closeness",
       objective=True, derive=_closeness("min_k_auc", 0.5, 0.5)),
    _m("knowmem_forget_prob", "probability of the forget answers behind the knowmem prompt", "KnowMem forget prob",
       direction="min"),
    _m("knowmem_retain_prob", "probability of the retain answers behind the knowmem prompt", "KnowMem retain prob"),
)
METRICS = HEADLINE + OTHERS
register(*METRICS)


def _plain(item: Any) -> Any:
    """A record as JSON-ready data (QA and verbmem items are dataclasses; texts are strings)."""
    return asdict(item) if is_dataclass(item) else item


class Muse:
    """MUSE behind uipe.benchmarks.base.Benchmark. data.forget_split names the forget file unlearning trains on:
    raw/forget (MUSE's forget set, the first fold), scal/forget_k or sust/forget_k (uipe experiment muse-scal and
    muse-sust); the evaluation is always MUSE's (verbmem, knowmem and privleak are about the first fold)."""

    name = NAME
    metrics = METRICS
    utility = "knowmem_retain_rougeL"
    screening_utility = "knowmem_retain_prob"  # the same questions and answers, teacher-forced: no generation
    forgetting = "knowmem_forget_prob"
    default_objective = "privleak_closeness"
    default_signal = "min_k_closeness"
    table_metrics = ("verbmem_rougeL", "knowmem_forget_rougeL", "privleak", "min_k_auc")
    raw_text = True

    def objective_metric(self, objective: str | None, signal: str | None, select_on: str) -> str:
        reference_free = objective == "reference_free"
        if reference_free:
            key, name = "signal", signal or self.default_signal
        else:
            key, name = "objective", self.default_objective if objective in (None, "pareto") else objective
        allowed = metrics.objectives(reference=not reference_free, benchmark=NAME)
        if name not in allowed:
            kind = "a reference-free objective" if reference_free else "an objective"
            raise UipeError(f"{key}: {name!r} is not {kind} of the muse benchmark (choose from {', '.join(allowed)})")
        if select_on == "selection_fold":
            raise UipeError(f"select_on: selection_fold needs a fold variant of the objective, and {name!r} has none")
        return name

    def ensure_data(self, cfg: ExperimentConfig, paths: RunPaths) -> str:
        """data.source "synth": the embedded MUSE world under the run folder, written once per (authors, facts,
        seed) (its benchmark.json is the record); anything else is a MUSE folder used where it is."""
        from uipe.config import SynthConfig
        from uipe.data.synth_muse import VERSION, write_muse_benchmark
        from uipe.stages import recorded, reusable

        if cfg.data.source != "synth":
            return cfg.data.source
        synth, default = cfg.data.synth, SynthConfig()
        if (synth.tied, synth.ties) != (default.tied, default.ties):
            raise UipeError("data.synth.tied/ties: the MUSE world writes every tied fact; it has no such knob")
        want = {"generator": "uipe.data.synth_muse", "version": VERSION, "authors": synth.authors,
                "facts": synth.facts, "seed": synth.seed}
        if not reusable(recorded(paths.data / "benchmark.json"), want, paths.data):
            try:
                write_muse_benchmark(paths.data, synth.authors, synth.facts, synth.seed, overwrite=True)
            except ValueError as e:  # the world's own bounds (facts per author, the pool of names and titles)
                raise UipeError(f"data.synth: {e}") from None
        return str(paths.data)

    def check_reference_free(self, data: str, forget_split: str) -> None:
        # the loader refuses a folder without privleak/holdout, the split the reference-free signal reads
        from uipe.data.muse import load_muse

        load_muse(data)

    def eval_splits(self, data: str, forget_split: str) -> Mapping[str, Sequence[Any]]:
        from uipe.eval.muse_evaluate import ROLES, muse_records

        return {ROLES[role]: [_plain(r) for r in records] for role, records in muse_records(data).items()}

    def training_parts(self, data: str, forget_split: str, role: str) -> Mapping[str, Sequence[Any]]:
        """Raw texts by MUSE file (MuseData.training_parts): the target's forget folds + retain1 + retain2, the
        retrained ("retain") model's retain1 + retain2."""
        from uipe.data.muse import load_muse

        return load_muse(data).training_parts("target" if role == "target" else "retrained")

    def evaluation_records(self, data: str, forget_split: str) -> Mapping[str, Sequence[Any]]:
        from uipe.eval.muse_evaluate import muse_records

        return muse_records(data)

    def unlearning_split_names(self, forget_split: str) -> tuple[str, str]:
        return forget_split, "raw/retain1"  # a MUSE forget file and its baselines' retain stream

    def unlearning_records(self, data: str, forget_split: str, needs_idk: bool) -> tuple:
        """(the forget file's texts, raw/retain1, no idk): data.forget_split is raw/forget (MUSE's forget corpus), a
        scalability set scal/forget_k or a sustainability request sust/forget_k."""
        from uipe.data.muse import load_muse

        if needs_idk:
            raise UipeError(NO_QUESTIONS)
        muse = load_muse(data)
        family, name = forget_split.split("/")
        folds = {"raw": muse.raw, "scal": muse.scal, "sust": muse.sust}[family]
        if name not in folds:
            raise UipeError(f"{data}: no {forget_split}.json (data.forget_split; MUSE-Books has no scal/ or sust/)")
        return folds[name], muse.raw["retain1"], ()

    def records_hash(self, *records: Any) -> str:
        from uipe.data import records_hash

        return records_hash(*([_plain(r) for r in split] for split in records))

    def evaluator(self, data: str, forget_split: str, tokenizer: Any, template: str, cfg: EvalConfig,
                  max_length: int, reference: str | None) -> Any:
        """MUSE's evaluator; `reference`: a retrained model's evaluation (its min_k_auc is PrivLeak's reference).
        `template` and `max_length` are TOFU's: MUSE prompts a base model with raw text and scores whole texts
        (up to muse_evaluate.PRIVLEAK_MAX_TOKENS), not training windows."""
        from uipe.eval.muse_evaluate import MuseEvaluator

        return MuseEvaluator.from_source(data, tokenizer, cfg, reference=reference)

    def reference(self, model: str | Path, data: str, forget_split: str, out: Path, template: str, cfg: EvalConfig,
                  dtype: str, max_length: int) -> dict:
        """The retrained model's Min-40% AUC on privleak/forget vs privleak/holdout (PrivLeak's reference), over
        every text whatever eval.subset says, with each text's score (a subset search's reference is their first
        texts' AUC)."""
        from uipe.eval.muse_evaluate import MuseEvaluator, load_or_compute_reference
        from uipe.models import load_tokenizer

        evaluator = MuseEvaluator.from_source(data, load_tokenizer(model), cfg.model_copy(update={"subset": None}))
        doc = load_or_compute_reference(out, evaluator, model, dtype)
        return {"path": str(out), "min_k_auc": doc["min_k_auc"], "model": str(model), "model_hash": doc["model_hash"],
                "data_hash": doc["data_hash"], "texts": {r: len(v) for r, v in doc["min_k_scores"].items()}}


MUSE = Muse()
