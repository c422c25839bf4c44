"""TOFU (Maini et al. 2024, arXiv 2401.06121) and the embedded synthetic TOFU-format world: the benchmark's data
(uipe/data), its evaluator (uipe/eval/evaluate.py: truth ratios, forget quality, model utility, ROUGE-L) and its
metric catalogue. The only place outside uipe/data and uipe/eval that names a TOFU split or metric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uipe.errors import UipeError
from uipe.metrics import Metric, register

if TYPE_CHECKING:
    from uipe.config import EvalConfig, ExperimentConfig
    from uipe.paths import RunPaths

NAME = "tofu"
ROLES = ("forget", "retain", "real_authors", "world_facts", "related", "holdout")  # uipe.eval.evaluate.KINDS
SCORED_ONLY = ("holdout",)  # scored, never generated: no ROUGE-L


def _m(name: str, label: str, short: str, **kw: Any) -> Metric:
    return Metric(name, label, short, benchmark=NAME, **kw)


_KS = "KS p-value vs the retain model"
# Headline metrics first, in the order summaries and tables show them.
HEADLINE = (
    _m("forget_quality", f"forget quality ({_KS})", "FQ", objective=True, needs_reference=True, log_scale=True,
       headline=True),
    _m("forget_quality_select", f"forget quality, selection fold ({_KS})", "FQ (selection fold)", objective=True,
       needs_reference=True, log_scale=True, headline=True),
    _m("forget_quality_report", f"forget quality, report fold ({_KS})", "FQ (report fold)", needs_reference=True,
       log_scale=True, headline=True),
    _m("model_utility", "model utility (harmonic mean of 9 retain/real-author/world-fact scores)", "MU",
       utility=True, needs_generation=True, headline=True),
    _m("forget_prob", "forget probability", "forget prob", direction="min", headline=True),
    _m("forget_rougeL", "forget ROUGE-L recall", "forget ROUGE-L", direction="min", needs_generation=True,
       headline=True),
    _m("related_prob", "related-knowledge probability", "related prob", direction="min", headline=True),
    _m("related_rougeL", "related-knowledge ROUGE-L recall", "related ROUGE-L", direction="min",
       needs_generation=True, headline=True),
    _m("related_forget_quality", f"related-knowledge forget quality ({_KS})", "related FQ", needs_reference=True,
       log_scale=True, headline=True),
    _m("holdout_ks", "holdout KS p-value (forget vs holdout truth ratios)", "holdout KS", objective=True,
       log_scale=True, headline=True),
    _m("mia_loss_auc", "MIA AUC, loss attack (forget vs holdout)", "MIA loss AUC", headline=True),
    _m("mia_min_k_pp_auc", "MIA AUC, Min-K%++ attack (forget vs holdout)", "MIA Min-K%++ AUC", headline=True),
)


def _closeness(attack: str) -> Callable[[Mapping[str, float]], float]:
    """1 - 2|AUC - 0.5|: 1 when the attack cannot tell forget from holdout items (what a reference-free search
    maximises); the evaluator reports it, and a record holding only the AUC derives it."""
    return lambda m: 1.0 - 2.0 * abs(m[f"mia_{attack}_auc"] - 0.5)


OTHERS = (
    _m("mia_loss_closeness", "1 - 2|MIA AUC - 0.5| (loss attack, forget vs holdout)", "MIA loss closeness",
       objective=True, derive=_closeness("loss")),
    _m("mia_min_k_pp_closeness", "1 - 2|MIA AUC - 0.5| (Min-K%++ attack, forget vs holdout)",
       "MIA Min-K%++ closeness", objective=True, derive=_closeness("min_k_pp")),
    _m("scored_utility", "scored utility (the six scoring-pass terms of model utility)", "scored MU"),
    _m("forget_prob_rel", "forget probability / theta_ini's", "forget prob rel.", direction="min"),
    _m("forget_rougeL_rel", "forget ROUGE-L / theta_ini's", "forget ROUGE-L rel.", direction="min",
       needs_generation=True),
    _m("privleak_loss", "PrivLeak, loss attack (vs theta_ini)", "PrivLeak loss"),
    _m("privleak_min_k_pp", "PrivLeak, Min-K%++ attack (vs theta_ini)", "PrivLeak Min-K%++"),
)
_STATS = {"prob": ("probability", False), "truth_ratio": ("truth ratio", False), "rougeL": ("ROUGE-L recall", True)}
PER_SPLIT = tuple(
    _m(f"{role}_{stat}", f"{role.replace('_', ' ')} {label}", f"{role} {stat}", needs_generation=gen)
    for role in ROLES for stat, (label, gen) in _STATS.items()
    if f"{role}_{stat}" not in {m.name for m in HEADLINE} and not (gen and role in SCORED_ONLY))
METRICS = HEADLINE + OTHERS + PER_SPLIT
register(*METRICS)


class Tofu:
    """TOFU behind uipe.benchmarks.base.Benchmark."""

    name = NAME
    metrics = METRICS
    utility = "model_utility"
    screening_utility = "scored_utility"
    forgetting = "forget_prob"
    default_objective = "forget_quality"
    default_signal = "holdout_ks"
    # beside the objective and utility in the console's results table, where the data has them
    table_metrics = ("forget_quality", "forget_prob", "related_prob", "related_rougeL", "related_forget_quality")
    raw_text = False

    def objective_metric(self, objective: str | None, signal: str | None, select_on: str) -> str:
        if objective == "reference_free":
            return signal or self.default_signal
        name = self.default_objective if objective in (None, "pareto") else objective
        if select_on == "selection_fold":  # the study chooses on one author fold and reports on the other
            if f"{name}_select" not in {m.name for m in METRICS}:
                raise UipeError(f"select_on: selection_fold needs a fold variant of the objective, and {name!r} "
                                "has none")
            return f"{name}_select"
        return name

    def ensure_data(self, cfg: ExperimentConfig, paths: RunPaths) -> str:
        from uipe.data import ensure_data

        return ensure_data(cfg, paths)

    def check_reference_free(self, data: str, forget_split: str) -> None:
        from uipe.data import has_split
        from uipe.data.records import holdout_eval_split_for

        holdout = holdout_eval_split_for(forget_split)
        if not has_split(data, holdout):
            raise UipeError(f"{data}: no {holdout} split, which the reference_free objective measures against")

    def eval_splits(self, data: str, forget_split: str) -> Mapping[str, Sequence[Any]]:
        from uipe.data import eval_split_for
        from uipe.data.records import holdout_eval_split_for
        from uipe.eval.evaluate import eval_records

        names = {"forget": eval_split_for(forget_split), "retain": "retain_perturbed",
                 "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed",
                 "related": "related_perturbed", "holdout": holdout_eval_split_for(forget_split)}
        return {names[role]: records for role, records in eval_records(data, forget_split).items()}

    def training_parts(self, data: str, forget_split: str, role: str) -> Mapping[str, Sequence[Any]]:
        from uipe.data import training_parts

        return training_parts(data, forget_split, role)

    def evaluation_records(self, data: str, forget_split: str) -> Mapping[str, Sequence[Any]]:
        from uipe.eval.evaluate import eval_records

        return eval_records(data, forget_split)

    def unlearning_split_names(self, forget_split: str) -> tuple[str, str]:
        from uipe.data import RETAIN_FOR

        return forget_split, RETAIN_FOR[forget_split]

    def unlearning_records(self, data: str, forget_split: str, needs_idk: bool) -> tuple:
        from uipe.data import unlearning_records

        return unlearning_records(data, forget_split, needs_idk)

    def records_hash(self, *records: Any) -> str:
        from uipe.data import records_hash

        return records_hash(*records)

    def evaluator(self, data: str, forget_split: str, tokenizer: Any, template: str, cfg: EvalConfig,
                  max_length: int, reference: str | None) -> Any:
        from uipe.eval.evaluate import Evaluator
        from uipe.eval.reference import load_reference

        evaluator = Evaluator.from_source(data, forget_split, tokenizer, template, cfg, max_length)
        if reference:
            evaluator.set_reference(load_reference(reference))
        return evaluator

    def reference(self, model: str | Path, data: str, forget_split: str, out: Path, template: str, cfg: EvalConfig,
                  dtype: str, max_length: int) -> dict:
        """The retain model's truth ratios on the forget (and related) items, forget quality's reference."""
        from uipe.eval.evaluate import Evaluator
        from uipe.eval.reference import load_or_compute_reference, reference_summary
        from uipe.models import load_tokenizer

        evaluator = Evaluator.from_source(data, forget_split, load_tokenizer(model), template, cfg, max_length)
        return reference_summary(load_or_compute_reference(out, evaluator.full_fidelity(), model, dtype), out)


TOFU = Tofu()
