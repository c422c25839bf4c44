"""The experiment configuration: pydantic models (extra="forbid") loaded from YAML, with `--set a.b=v` overrides.

One file describes data, model, training, unlearning, evaluation, search and tracking. The tiny preset
(uipe/presets/tiny.yaml) is just such a file; a 7B cluster run is another.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from uipe.data.muse import FORGET_FILES as MUSE_FORGET_FILES
from uipe.data.records import FORGET_SPLITS
from uipe.data.synth import TIED_FACTS, TIES
from uipe.errors import UipeError
from uipe.methods import UNLEARN_METHODS, check_method
from uipe.methods.ga import Params as GAParams
from uipe.methods.graddiff import Params as GradDiffParams
from uipe.methods.idkdpo import Params as IdkDPOParams
from uipe.methods.kl import Params as KLParams
from uipe.methods.npo import Params as NPOParams
from uipe.methods.rmu import Params as RMUParams
from uipe.methods.satimp import Params as SatImpParams
from uipe.methods.simnpo import Params as SimNPOParams
from uipe.methods.undial import Params as UNDIALParams
from uipe.methods.wga import Params as WGAParams
from uipe.schema import Strict, one_line

PRESETS = ("tiny",)
# The utility floors a result is shown at (fractions of theta_ini's utility); the space file's utility_floor picks
# which one's point becomes the registered champion.
FLOORS = (0.95, 0.90, 0.85, 0.80)
MethodName = Literal[UNLEARN_METHODS]  # type: ignore[valid-type]  # the registry's names, nowhere else
ForgetSplit = Literal[FORGET_SPLITS + MUSE_FORGET_FILES]  # type: ignore[valid-type]


class SynthConfig(Strict):
    """The embedded synthetic TOFU-format benchmark (uipe data synth)."""

    authors: int = Field(100, ge=20)
    facts: int = Field(8, ge=4, le=10)
    seed: int = 0
    # Related knowledge (issue 15's knobs): how many tied facts per author (0-5), and whether they follow from a base
    # fact by a rule the model learns (logical) or are drawn at random (arbitrary).
    tied: int = Field(len(TIED_FACTS), ge=0, le=len(TIED_FACTS))
    ties: Literal[TIES] = "logical"  # type: ignore[valid-type]


class DataConfig(Strict):
    benchmark: str = "tofu"  # a name in uipe.benchmarks (its data layout, evaluator and metric catalogue)
    # "synth": generate the embedded benchmark under <run_dir>/data; otherwise a local folder of TOFU-format
    # files or a Hugging Face dataset id such as locuslab/TOFU.
    source: str = "synth"
    synth: SynthConfig = SynthConfig()
    forget_split: ForgetSplit = "forget05"  # TOFU's split names, or MUSE's forget files (raw/forget, scal/..., sust/...)

    @model_validator(mode="after")
    def _split_of_the_benchmark(self) -> DataConfig:
        if (self.forget_split in MUSE_FORGET_FILES) != (self.benchmark == "muse"):
            names = ", ".join(MUSE_FORGET_FILES if self.benchmark == "muse" else FORGET_SPLITS)
            raise ValueError(f"{self.forget_split!r} is not a forget split of {self.benchmark} (choose from {names})")
        return self


class TinyModelConfig(Strict):
    """A small LlamaConfig trained from scratch on the synthetic corpus, with a locally trained BPE tokenizer."""

    vocab_size: int = Field(1200, ge=300)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    max_position_embeddings: int = 256


class ModelConfig(Strict):
    # "tiny" builds the embedded model; otherwise a local HF folder or a hub id (loaded with safetensors only).
    base: str = "tiny"
    tiny: TinyModelConfig = TinyModelConfig()
    # An already fine-tuned target model (e.g. locuslab/tofu_ft_llama2-7b): `uipe prepare` then skips training it.
    target: str | None = None
    prompt_template: Literal["llama2", "plain"] = "llama2"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    max_length: int = Field(128, ge=16)
    trust_remote_code: bool = False


class TrainConfig(Strict):
    """Shared by `prepare` (fine-tuning) and `unlearn`: how Ray Train runs the loop."""

    num_workers: int = Field(2, ge=1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    micro_batch_size: int = Field(16, ge=1)  # per worker, per step
    effective_batch_size: int = Field(32, ge=1)  # across workers and accumulation steps
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    threads_per_worker: int = Field(1, ge=1)
    storage_path: str | None = None  # Ray storage (local, NFS, s3://); default <run_dir>/ray
    max_failures: int = Field(1, ge=0)
    # Epochs whose sharded training state (model + optimizer, DCP: ~14 bytes/param) stays in Ray's checkpoints; older
    # ones keep only their HF export (the search candidates) and state.json. Resume needs only the latest.
    keep_train_states: int = Field(1, ge=1)
    seed: int = 0
    # FSDP2: free the gathered weights after forward (ZeRO-3, least memory) or keep them for backward (one all-gather
    # per micro-batch instead of two: faster when the model fits unsharded, e.g. on CPU; see docs/BENCHMARKS.md).
    reshard_after_forward: bool = True
    # Write each epoch's HF export on a thread while the next epoch trains, its Ray checkpoint reported once written
    # (uipe/train/saving.py); no: write and report each epoch before training on (the same bytes). auto: yes when
    # training runs on GPUs. On CPU the writer competes with training for the same cores: measured on 2 cores, a
    # 204M model's fit took 11% longer with it (docs/BENCHMARKS.md "Exports and checkpoints off the critical path").
    overlap_exports: Literal["auto", "yes", "no"] = "auto"

    @field_validator("use_gpu", "overlap_exports", mode="before")
    @classmethod
    def _yes_no(cls, value: object) -> object:
        # YAML (and so --set train.use_gpu=yes) reads yes/no as booleans
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


class PrepareConfig(Strict):
    epochs: int = Field(30, ge=1)
    lr: float = Field(5e-3, gt=0)
    schedule: Literal["linear", "cosine"] = "linear"  # decay after the warm-up (linear: TOFU's trainer)
    # The gate (uipe/gate.py): greedy ROUGE-L recall the reference models must reach on every split they trained
    # on (a deterministic sample of gate_items questions per split), and the largest relative difference allowed
    # between the target's and the retain model's model utility (null: not checked).
    min_rouge: float = Field(0.9, ge=0, le=1)
    gate_items: int = Field(200, ge=1)
    max_utility_gap: float | None = Field(0.1, ge=0)
    # TOFU's retain model (trained without the forget data): the reference of forget quality. A deployment has none:
    # false trains only the target, and the search then needs objective reference_free (search.objective).
    retain: bool = True
    # Train target and retain at the same time, each on half of train.num_workers (same effective batch). On a
    # small model FSDP2's collectives cost more than a second worker saves, so two one-worker jobs finish sooner.
    side_by_side: bool = False


class UnlearnConfig(Strict):
    """The base methods to run and, per method, its parameters (each defined beside its loss in methods/<name>.py)."""

    methods: list[MethodName] = ["ga", "graddiff", "kl", "npo"]
    epochs: int = Field(5, ge=1)
    lr: float = Field(3e-4, gt=0)
    ga: GAParams = GAParams()
    graddiff: GradDiffParams = GradDiffParams()
    kl: KLParams = KLParams()
    npo: NPOParams = NPOParams()
    simnpo: SimNPOParams = SimNPOParams()
    idkdpo: IdkDPOParams = IdkDPOParams()
    rmu: RMUParams = RMUParams()
    undial: UNDIALParams = UNDIALParams()
    wga: WGAParams = WGAParams()
    satimp: SatImpParams = SatImpParams()


class EvalConfig(Strict):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(200, ge=1)
    subset: int | None = Field(None, ge=1)  # items per split, for cheaper (lower-fidelity) trials
    # A retain reference file, or a folder of TOFU eval logs; default: computed from the retain model and cached.
    retain_reference: str | None = None


class SearchConfig(Strict):
    space_dir: str = "tune_spaces"  # tune_spaces/<method>.yaml
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    # A trial's model sharded over this many Ray Train workers (FSDP2), for a model larger than one accelerator; each
    # worker then takes cpus_per_trial and gpus_per_trial (uipe/search/sharded.py).
    workers_per_trial: int = Field(1, ge=1)
    seed: int = 0
    num_samples: int | None = Field(None, ge=1)  # overrides the space file's, e.g. for a quick run
    # overrides every space file's objective (and signal), e.g. reference_free for a run without a retain model
    # (names from the metric catalogue, uipe/metrics.py; checked against the run's benchmark by uipe.benchmarks)
    objective: str | None = None
    signal: str | None = None
    select_on: Literal["all", "selection_fold"] | None = None  # overrides the space files' (uipe study: the fold)
    # overrides the space files' extrapolation form (uipe.coefficients: global, groups, weighted) and anchor option,
    # e.g. --set search.form=groups; a search of another form than global gets a folder of its own
    form: Literal["global", "groups", "weighted"] | None = None
    anchor: bool | None = None
    # overrides the space files' `deterministic` (a seed repeats the search however its trials are timed, at some
    # cost in time; uipe study turns it on)
    deterministic: bool | None = None
    # Two-fidelity trials (uipe/search/screening.py): a sampled point is scored without generation first and gets the
    # full evaluation (greedy generation, ROUGE-L, model utility) only when it is on or near the front so far; the
    # base method's points always get it, and only fully evaluated points can be chosen.
    screening: bool = False


class TrackingConfig(Strict):
    uri: str | None = None  # default sqlite:///<run_dir>/mlflow.db
    # Where a new experiment keeps artifacts (default <run_dir>/mlartifacts for the local store); on a cluster a
    # shared path such as /mnt/uipe/mlartifacts, else a client writing to sqlite would use ./mlruns.
    artifact_location: str | None = None
    experiment: str | None = None  # default uipe-<name>
    register_model: bool = True
    registered_model_name: str | None = None  # default uipe-<name>-<method>
    parent_run_id: str | None = None  # nest the search runs under this MLflow run (uipe study: each seed's run)


class StudyConfig(Strict):
    """`uipe study`: the whole pipeline once per seed (a fresh synthetic world, fresh training and search), UIPE
    against the base method at its best epoch and the base method run `longer_factor` times as many epochs."""

    seeds: list[int] = Field([0, 1, 2, 3, 4], min_length=1)
    floors: list[float] = Field(list(FLOORS), min_length=1)  # fractions of theta_ini's model utility
    longer_factor: int = Field(2, ge=2)
    # false: only the base method and UIPE (a sweep over worlds that asks only "how much does UIPE add"), saving
    # the longer unlearning run and its scoring per method and seed
    more_baseline: bool = True
    # forms beyond one alpha (uipe.coefficients), each an arm searched on the same checkpoints: groups, weighted,
    # anchor (the global form from an earlier epoch); each reported like UIPE, against `more` and against UIPE
    forms: list[Literal["groups", "weighted", "anchor"]] = []

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seed {repeated[0]} appears more than once")
        return seeds

    @field_validator("floors")
    @classmethod
    def _fractions(cls, floors: list[float]) -> list[float]:
        bad = [f for f in floors if not 0 < f <= 1]
        if bad:
            raise ValueError(f"floor {bad[0]} is outside (0, 1] (a fraction of theta_ini's model utility)")
        return sorted(set(floors), reverse=True)


class ExperimentConfig(Strict):
    name: str = Field("tiny", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prepare: PrepareConfig = PrepareConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    eval: EvalConfig = EvalConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    study: StudyConfig = StudyConfig()

    @model_validator(mode="after")
    def _batches_divide(self) -> ExperimentConfig:
        per_step = self.train.micro_batch_size * self.train.num_workers
        if self.train.effective_batch_size % per_step:
            raise ValueError(
                f"train.effective_batch_size ({self.train.effective_batch_size}) must be a multiple of "
                f"train.micro_batch_size x train.num_workers ({per_step})"
            )
        return self

    def method_params(self, method: str) -> Strict:
        return getattr(self.unlearn, check_method(method))


def preset_path(name: str = "tiny") -> Path:
    return Path(str(resources.files("uipe") / "presets" / f"{name}.yaml"))


def _parse_scalar(text: str) -> object:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise UipeError(f"--set {item!r}: expected key=value, e.g. --set unlearn.lr=2e-5")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UipeError(f"--set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config (default: the tiny preset) and apply overrides; UipeError on any problem."""
    path = Path(path) if path else preset_path("tiny")
    if not path.is_file():
        raise UipeError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UipeError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise UipeError(one_line(e, str(path))) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
