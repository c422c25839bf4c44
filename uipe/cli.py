"""The `uipe` command line. Every stage takes --config (default: the embedded tiny preset), --run-dir (default
runs/<name>) and --set key=value overrides, and writes only under its run folder, so stages chain by folder:

    uipe run                                   # the whole pipeline on the tiny preset, offline, CPU
    uipe data synth --out D --seed 0           # the synthetic TOFU-format benchmark
    uipe prepare                               # target and retain models
    uipe unlearn --method npo                  # one base method, a checkpoint per epoch
    uipe search --method npo                   # Ray Tune + Optuna over alpha and epoch
    uipe study --seeds 5                       # UIPE vs fair baselines over 5 seeds, with intervals (runs/<name>-study)
    uipe experiment reconstruction --seeds 3   # does related knowledge rebuild forgotten facts?
    uipe experiment sweep --vary data.synth.tied=0,1,3,5 --seeds 3   # UIPE's gain as the world varies
    uipe extrapolate --init A --unlearned B --alpha 1.0 --out C
    uipe evaluate --model C --data D --forget-split forget05 --retain-reference R --out metrics.json

Bad input prints one line naming the file, key or tensor and exits 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from uipe.errors import UipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="UIPE unlearning with automatic alpha selection (Ray Train, Ray Tune + Optuna, MLflow).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the experiment configuration.")
data_app = typer.Typer(no_args_is_help=True, help="TOFU-format data.")
experiment_app = typer.Typer(no_args_is_help=True, help="The paper's mechanism, measured (docs/RESULTS.md).")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(experiment_app, name="experiment")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Experiment YAML (default: tiny preset).")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder (default: runs/<name>).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override, e.g. --set unlearn.lr=2e-5.")]
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="ga, graddiff, kl, npo, simnpo, idkdpo, rmu, undial, "
                                                               "wga or satimp.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's, Tune's and transformers' own output "
                                          "on the console (default: in <run-dir>/logs/; also UIPE_VERBOSE=1).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts (uipe's own "
                                       "lines go to stderr).")]


def _quiet(paths, command: str, verbose: bool, data: bool = False):
    """The console shows uipe's stages, progress and results; everything else goes to <run-dir>/logs/. `data`
    (--json): stdout holds the JSON alone."""
    import time

    from uipe.console import quiet, verbose_requested

    log = paths.root / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return quiet(log, verbose_requested(verbose), until_exit=True, data=data)


def _data_source(cfg, paths) -> str:
    """The configured data (data.source; an embedded world is made under the run folder if missing)."""
    from uipe.benchmarks import get_benchmark

    return get_benchmark(cfg.data.benchmark).ensure_data(cfg, paths)


def _setup(config: Path | None, run_dir: Path | None, overrides: list[str] | None):
    from uipe.benchmarks import check_config
    from uipe.config import load_config
    from uipe.paths import RunPaths

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(config, overrides or [])
    check_config(cfg)  # names from the benchmark's catalogue (objective, signal): a typo fails here, not mid-run
    return cfg, RunPaths.of(run_dir or Path("runs") / cfg.name)


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration (defaults filled in, overrides applied) as YAML."""
    from uipe.benchmarks import check_config
    from uipe.config import load_config, to_yaml

    cfg = load_config(config, set_ or [])
    check_config(cfg)
    typer.echo(to_yaml(cfg), nl=False)


@data_app.command("synth")
def data_synth(out: Annotated[Path, typer.Option("--out", help="Folder to write (must not exist).")],
               authors: int = 100, facts: int = 8, seed: int = 0,
               tied: Annotated[int, typer.Option(help="Tied (related) facts per author, 0-5.")] = 5,
               ties: Annotated[str, typer.Option(help="logical (a rule links them) or arbitrary.")] = "logical",
               overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False) -> None:
    """Write the deterministic synthetic benchmark (all TOFU splits + related knowledge)."""
    from uipe.data.synth import write_benchmark

    if out.exists() and not overwrite:
        raise UipeError(f"{out}: already exists (pass --overwrite to replace it)")
    try:
        write_benchmark(out, authors, facts, seed, overwrite=overwrite, tied=tied, ties=ties)
    except ValueError as e:
        raise UipeError(f"uipe data synth: {e}") from None
    typer.echo(f"wrote {len(list(out.glob('*.json')))} files to {out}")


@app.command()
def prepare(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
            verbose: VerboseOpt = False) -> None:
    """Train TOFU's two reference models: target (all data) and retain (retain split + utility sets)."""
    from uipe.console import say
    from uipe.gate import summary_line
    from uipe.train.recipe import prepare as run_prepare

    cfg, paths = _setup(config, run_dir, set_)
    with _quiet(paths, "prepare", verbose):
        models = run_prepare(cfg, paths.root)
        say(summary_line(models))
        for role, meta in models.items():
            say(f"{role}: {meta['path']}")


@app.command()
def unlearn(methods: Annotated[list[str], typer.Option(
                "--method", "-m", help="ga, graddiff, kl, npo, simnpo, idkdpo, rmu, undial, wga or satimp; repeat it "
                                       "for several methods, trained one after another in one fit.")],
            config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
            verbose: VerboseOpt = False) -> None:
    """Run base unlearning methods on Ray Train (FSDP2), writing a HF checkpoint every epoch."""
    from uipe.train.recipe import unlearn_methods

    cfg, paths = _setup(config, run_dir, set_)
    for method in methods:
        cfg.method_params(method)
    from uipe.console import say

    with _quiet(paths, f"unlearn-{'+'.join(methods)}", verbose):
        for manifest in unlearn_methods(cfg, paths.root, methods).values():
            say(str(manifest))


@app.command()
def extrapolate(init: Annotated[Path, typer.Option("--init", help="theta_ini model folder.")],
                unlearned: Annotated[Path, typer.Option("--unlearned", help="theta_un model folder.")],
                alpha: Annotated[float, typer.Option("--alpha", help="UIPE coefficient.")],
                out: Annotated[Path, typer.Option("--out", help="Output model folder.")],
                overwrite: bool = False) -> None:
    """theta = theta_un + alpha * (theta_un - theta_ini), streamed shard by shard (UIPE, arXiv 2503.04693)."""
    import threading

    from uipe.safetensors_io import warm_page_cache

    # Importing torch takes seconds of one core; the disk reads the first shards meanwhile.
    importing = threading.Event()
    threading.Thread(target=warm_page_cache, args=([unlearned, init], importing), daemon=True).start()
    from uipe.extrapolate import extrapolate_folder

    importing.set()
    typer.echo(str(extrapolate_folder(init, unlearned, alpha, out, overwrite=overwrite)))


@app.command()
def evaluate(model: Annotated[Path, typer.Option("--model")],
             out: Annotated[Path, typer.Option("--out", help="metrics.json to write.")],
             data: Annotated[Optional[str], typer.Option("--data", help="Data folder or HF id.")] = None,
             forget_split: Annotated[Optional[str], typer.Option("--forget-split")] = None,
             retain_reference: Annotated[Optional[Path], typer.Option("--retain-reference")] = None,
             subset: Annotated[Optional[int], typer.Option(help="Items per split (lower fidelity).")] = None,
             config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False,
             json_: JsonOpt = False) -> None:
    """Evaluate one model: a table of its headline metrics (forget quality, model utility, related-knowledge
    forgetting); every aggregate and per-item value in --out."""
    from uipe import evaluation
    from uipe.console import data as print_data
    from uipe.console import say, show_table
    from uipe.tables import headline_values, metrics_table

    cfg, paths = _setup(config, run_dir, set_)  # the benchmark's metrics are in the catalogue from here on
    eval_cfg = cfg.eval.model_copy(update={"subset": subset}) if subset else cfg.eval
    with _quiet(paths, "evaluate", verbose, data=json_):
        split = forget_split or cfg.data.forget_split
        result = evaluation.evaluate_model(model, data or _data_source(cfg, paths), split,
                                           retain_reference or paths.retain_reference, out, cfg.model.prompt_template,
                                           eval_cfg, cfg.model.dtype, cfg.model.max_length, cfg.data.benchmark)
        if json_:
            print_data(json.dumps(headline_values(result)))
            return
        show_table(metrics_table(result, f"{model} ({split}, {result.get('fidelity', 'full')})"))
        say(f"every metric and per-item value: {out}")


@app.command()
def reference(model: Annotated[Optional[Path], typer.Option("--model", help="Retain model folder.")] = None,
              out: Annotated[Optional[Path], typer.Option("--out")] = None,
              data: Annotated[Optional[str], typer.Option("--data")] = None,
              forget_split: Annotated[Optional[str], typer.Option("--forget-split")] = None,
              config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Evaluate the retain model once and cache what the objective compares against (TOFU: its truth ratios, the
    reference of forget quality; MUSE: the retrained model's Min-K% AUC, PrivLeak's)."""
    from uipe.evaluation import retain_reference

    cfg, paths = _setup(config, run_dir, set_)
    summary = retain_reference(model or paths.retain_model, data or _data_source(cfg, paths),
                            forget_split or cfg.data.forget_split, out or paths.retain_reference,
                            cfg.model.prompt_template, cfg.eval, cfg.model.dtype, cfg.model.max_length,
                            cfg.data.benchmark)
    typer.echo(json.dumps(summary, indent=1))


@app.command("tofu-report")
def tofu_report(model_logs: Annotated[Path, typer.Option("--model-logs")],
                retain_logs: Annotated[Path, typer.Option("--retain-logs")]) -> None:
    """Forget quality and model utility from two folders of TOFU eval logs, as one JSON object."""
    from uipe.eval.tofu_logs import tofu_report as report

    typer.echo(json.dumps(report(model_logs, retain_logs), indent=1))


@app.command()
def search(method: MethodOpt, config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
           space: Annotated[Optional[Path], typer.Option("--space", help="Space file (default tune_spaces/<m>.yaml).")]
           = None,
           resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted search.")] = False,
           verbose: VerboseOpt = False, json_: JsonOpt = False) -> None:
    """Ray Tune + Optuna over alpha and checkpoint epoch; a cheap extrapolate-then-evaluate trial each. Shows the
    method's rows of `uipe run`'s tables; the whole summary is in <run-dir>/search/<method>/result.json."""
    from uipe.search.driver import run_search
    from uipe.search.outcome import RESULT_FILE

    cfg, paths = _setup(config, run_dir, set_)
    cfg.method_params(method)
    from uipe.console import data as print_data
    from uipe.console import say
    from uipe.tables import show_search_tables

    with _quiet(paths, f"search-{method}", verbose, data=json_):
        summary = run_search(cfg, paths, method, space, resume)
        if json_:
            print_data(json.dumps(summary.to_json(), indent=1, default=str))
            return
        show_search_tables([summary], cfg)
        say(f"summary: {paths.search(summary.label) / RESULT_FILE}")


@app.command()
def run(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """The main job: data, reference models, unlearning per method, alpha search, a results table."""
    from uipe.pipeline import run_pipeline

    cfg, paths = _setup(config, run_dir, set_)
    with _quiet(paths, "run", verbose):
        run_pipeline(cfg, paths)


@app.command()
def study(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None, seeds: SeedsOpt = None,
          verbose: VerboseOpt = False) -> None:
    """UIPE against the base method and the base method run longer, over seeds, at several utility floors."""
    from uipe.study.driver import check_study, run_study

    cfg, paths = _seeded(config, run_dir, set_, seeds, "study")
    check_study(cfg, paths.root)  # before the log folder: a refused study writes nothing
    with _quiet(paths, "study", verbose):
        run_study(cfg, paths.root, " ".join(["uipe", *sys.argv[1:]]))


SeedsOpt = Annotated[Optional[str], typer.Option(
    "--seeds", help="A count (5: seeds 0-4) or a list (0,3,7 or [7]); default study.seeds.")]


def _seeded(config: Path | None, run_dir: Path | None, set_: list[str] | None, seeds: str | None, default: str):
    """The configuration with --seeds applied, and the paths (runs/<name>-<default> unless --run-dir)."""
    overrides = list(set_ or []) + ([f"study.seeds={_seed_list(seeds)}"] if seeds else [])
    cfg, paths = _setup(config, run_dir, overrides)
    if run_dir is None:  # not runs/<name>: each seed is a run folder of its own
        paths = type(paths).of(Path("runs") / f"{cfg.name}-{default}")
    return cfg, paths


@experiment_app.command("reconstruction")
def experiment_reconstruction(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
                              seeds: SeedsOpt = None, verbose: VerboseOpt = False) -> None:
    """Targets trained with and without the forget authors' related facts, unlearned alike, over seeds."""
    from uipe.study.reconstruction import run_reconstruction

    cfg, paths = _seeded(config, run_dir, set_, seeds, "reconstruction")
    with _quiet(paths, "reconstruction", verbose):
        run_reconstruction(cfg, paths.root, " ".join(["uipe", *sys.argv[1:]]))


@experiment_app.command("sweep")
def experiment_sweep(vary: Annotated[str, typer.Option("--vary", help="key=v1,v2,... e.g. data.synth.tied=0,1,3,5")],
                     config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
                     seeds: SeedsOpt = None, verbose: VerboseOpt = False) -> None:
    """A study per value of one setting; UIPE - base per value and floor, with intervals over seeds."""
    from uipe.study.sweep import check_sweep, parse_vary, run_sweep

    key, values = parse_vary(vary)
    cfg, paths = _seeded(config, run_dir, set_, seeds, f"sweep-{key.rsplit('.', 1)[-1]}")
    check_sweep(cfg, paths.root, key, values)  # before the log folder: a refused sweep writes nothing
    with _quiet(paths, "sweep", verbose):
        run_sweep(cfg, paths.root, key, values, " ".join(["uipe", *sys.argv[1:]]))


@experiment_app.command("muse-scal")
def experiment_muse_scal(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
                         verbose: VerboseOpt = False) -> None:
    """MUSE's scalability (C5): scal/forget_1..4, each unlearned from the target and searched."""
    _muse_requests("scal", config, run_dir, set_, verbose)


@experiment_app.command("muse-sust")
def experiment_muse_sust(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None,
                         verbose: VerboseOpt = False) -> None:
    """MUSE's sustainability (C6): sust/forget_1..4 in turn, each from the previous request's chosen model."""
    _muse_requests("sust", config, run_dir, set_, verbose)


def _muse_requests(kind: str, config: Path | None, run_dir: Path | None, set_: list[str] | None,
                   verbose: bool) -> None:
    from uipe.study.muse_requests import run_requests

    cfg, paths = _setup(config, run_dir, set_)
    if cfg.data.benchmark != "muse":
        raise UipeError(f"uipe experiment muse-{kind}: data.benchmark is {cfg.data.benchmark}, not muse "
                        "(--config uipe/presets/tiny_muse.yaml)")
    if run_dir is None:
        paths = type(paths).of(Path("runs") / f"{cfg.name}-{kind}")
    with _quiet(paths, f"muse-{kind}", verbose):
        run_requests(cfg, paths.root, kind, " ".join(["uipe", *sys.argv[1:]]))


def _seed_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").strip("[]").split(",") if x]
    except ValueError:
        raise UipeError(f"--seeds {text!r}: expected a count (5) or a comma-separated list of integers") from None
    if len(values) == 1 and not {",", "["} & set(text):  # "5": a count; "5," or "[5]": seed 5 alone
        if values[0] < 1:
            raise UipeError(f"--seeds {text!r}: a count must be at least 1")
        return list(range(values[0]))
    return values


def main() -> None:
    from uipe.signals import stop_on_sigterm

    stop_on_sigterm()
    try:
        app()
    except UipeError as e:
        from uipe.console import error

        error(f"uipe: error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM before a stage had its log (inside one, quiet() says it)
        from uipe.console import Interrupted, error

        error(f"uipe: error: {Interrupted()}")
        sys.exit(Interrupted.exit_code)


if __name__ == "__main__":
    main()
