"""What a benchmark is to the rest of uipe: its data, its evaluator and its metric catalogue, behind one Protocol.

The search, the study, the tables and MLflow ask a benchmark for names (which metric is the utility a floor refers
to, which objective a space's words mean, which splits a search scores on) and for an evaluator; they never spell a
benchmark's split or metric themselves. TOFU (uipe/benchmarks/tofu.py) is the first implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from uipe.metrics import Metric

if TYPE_CHECKING:
    from uipe.config import EvalConfig, ExperimentConfig
    from uipe.paths import RunPaths


class Evaluation(Protocol):
    """One evaluation of a model: aggregates by catalogue name, per-item values, and the raw scores a later full
    pass of the same weights may start from."""

    aggregates: dict[str, float]
    per_item: dict[str, dict[str, list]]
    fidelity: str
    scores: Any


class BenchmarkEvaluator(Protocol):
    fidelity: str

    def evaluate(self, model: Any, generate: bool = True, scores: Any = None) -> Evaluation: ...


class Benchmark(Protocol):
    name: str
    metrics: tuple[Metric, ...]  # its catalogue entries (registered when the benchmark module is imported)
    utility: str  # the utility metric floors refer to (needs generation)
    screening_utility: str  # the utility proxy a scoring pass reports (what screening predicts utility from)
    forgetting: str  # a reference-free measure of how much is still known (the study's matched-utility axis)
    default_objective: str
    default_signal: str  # the reference-free objective when a space names none
    table_metrics: tuple[str, ...]  # shown beside the objective and utility in the console's results table
    # Trains on raw text (MUSE), not QA records: a method that needs questions (IdkDPO) does not apply, and
    # prepare's gate is ROUGE-L on passages only (its utility-gap half is TOFU's model utility).
    raw_text: bool

    def objective_metric(self, objective: str | None, signal: str | None, select_on: str) -> str:
        """The catalogue name a search maximises for a space's objective words ("pareto", "reference_free", or a
        metric name) and fold choice; UipeError naming the setting otherwise."""
        ...

    def ensure_data(self, cfg: ExperimentConfig, paths: RunPaths) -> str:
        """The run's data source (written under the run folder for an embedded world)."""
        ...

    def check_reference_free(self, data: str, forget_split: str) -> None:
        """UipeError unless the data can measure forgetting without a retain model."""
        ...

    def eval_splits(self, data: str, forget_split: str) -> Mapping[str, Sequence[Any]]:
        """The evaluation data a search scores every trial on, by the benchmark's split name."""
        ...

    def training_parts(self, data: str, forget_split: str, role: str) -> Mapping[str, Sequence[Any]]:
        """What prepare trains a reference model on, by split name ("target": everything; "retain": never the
        forget data): QA records or raw texts (uipe.prompts.encode_record); prepare's gate checks each part."""
        ...

    def evaluation_records(self, data: str, forget_split: str) -> Mapping[str, Sequence[Any]]:
        """The evaluation data by the evaluator's role (prepare's utility gate scores the reference models on it)."""
        ...

    def unlearning_records(self, data: str, forget_split: str, needs_idk: bool) -> tuple:
        """The records an unlearning run trains on, (forget, retain, idk) (their hash ties a search to the
        checkpoints' data)."""
        ...

    def unlearning_split_names(self, forget_split: str) -> tuple[str, str]:
        """The names of the forget and retain splits an unlearning run trains on (MLflow's dataset inputs)."""
        ...

    def records_hash(self, *records: Any) -> str: ...

    def evaluator(self, data: str, forget_split: str, tokenizer: Any, template: str, cfg: EvalConfig,
                  max_length: int, reference: str | None) -> BenchmarkEvaluator:
        """An evaluator over the data, its reference (a retain model's, where the benchmark has one) loaded."""
        ...

    def reference(self, model: str | Path, data: str, forget_split: str, out: Path, template: str, cfg: EvalConfig,
                  dtype: str, max_length: int) -> dict:
        """The reference model's evaluation its objectives compare against, computed once into `out` (reused while
        the model's files and the evaluated data are unchanged), summarised; `model`: the retain role's model."""
        ...
