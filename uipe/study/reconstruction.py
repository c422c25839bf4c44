"""`uipe experiment reconstruction`: does related knowledge rebuild forgotten facts? (UIPE's mechanism, arXiv
2503.04693 section 4.2, models P_theta1-3.)

    uipe experiment reconstruction --seeds 3 --set "unlearn.methods=[graddiff]"   # tiny preset, 2 CPU cores

Per seed, in <root>/seed-<s>/, three arms with one recipe (theta_0 and tokenizer, epochs, learning rate, schedule,
workers) that differ only in the named facts:
  with/      the standard target, trained on everything, the forget authors' related (tied) facts included, then
             unlearned on the forget split;
  without/   a target trained on the same data minus the forget authors' related facts, unlearned the same way;
  related/   the `with` target unlearned on the forget split and the forget authors' related facts together.
Every epoch (and theta_ini as epoch 0) is scored at alpha 0 with the search's evaluator: the forget split's
probability, ROUGE-L and forget quality (one retain model, the `with` arm's, for all three), the related split's
probability and ROUGE-L, model utility. The mechanism holds on a world if `without` forgets more than `with` at the
same budget, and `related` more than `with`. Every stage is reused when its outputs exist, so a rerun resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from uipe.config import ExperimentConfig
from uipe.console import Task, say, stage
from uipe.errors import UipeError
from uipe.io import atomic_write_json, atomic_write_text, exclusive
from uipe.paths import RunPaths
from uipe.stages import recorded, reuse_or_build, reusable

ARMS = ("with", "without", "related")
METRICS = ("forget_prob", "forget_rougeL", "forget_quality", "related_prob", "related_rougeL", "model_utility")
RESULT_FILE = "reconstruction.json"


def arm_configs(cfg: ExperimentConfig, root: Path, seed: int) -> dict[str, ExperimentConfig]:
    """Each arm's configuration for one seed. `with` is the study's seed configuration; the other two read the data
    folder derived for them, start from `with`'s theta_0 (without) or target (related), and score forget quality
    against `with`'s retain model."""
    from uipe.study.driver import seed_config

    seeded = seed_config(cfg, seed, cfg.tracking.uri or "", cfg.tracking.experiment or "", "")
    raw = seeded.model_dump(mode="json")
    raw["tracking"] = cfg.tracking.model_dump(mode="json")
    out = {"with": ExperimentConfig.model_validate(raw)}
    with_paths = RunPaths.of(root / "with")
    for arm in ("without", "related"):
        arm_raw = json.loads(json.dumps(raw))
        arm_raw["name"] = f"{raw['name']}-{arm}"
        arm_raw["data"]["source"] = str(root / arm / "data")
        arm_raw["eval"]["retain_reference"] = str(with_paths.retain_reference)
        if arm == "without":
            arm_raw["model"]["base"] = str(with_paths.base_model)
            arm_raw["prepare"]["retain"] = False
        else:
            arm_raw["model"]["target"] = str(with_paths.target_model)
        out[arm] = ExperimentConfig.model_validate(arm_raw)
    return out


def derive_data(source: Path, out: Path, forget_split: str, arm: str) -> Path:
    """A copy of the benchmark folder `source` with one file changed: `without`: related.json lacks the forget
    split's authors' facts (the evaluation file related_perturbed.json keeps them, so the arm is still measured
    on them); `related`: the forget split's training file also holds those facts (its evaluation file is
    unchanged, so forget quality is measured on the same items)."""
    from uipe.data import load_split

    related_file = source / "related.json"
    if not related_file.is_file():
        raise UipeError(f"{source}: no related.json; the reconstruction experiment needs a related-knowledge split "
                        "(the synthetic benchmark has one when data.synth.tied > 0)")
    authors = {r.author for r in load_split(source, forget_split)}
    related = json.loads(related_file.read_text(encoding="utf-8"))
    mine = [row for row in related if row.get("author") in authors]
    if not mine:
        raise UipeError(f"{related_file}: no related facts of the {forget_split} authors")
    changed = {"without": ("related.json", [row for row in related if row.get("author") not in authors]),
               "related": (f"{forget_split}.json",
                           json.loads((source / f"{forget_split}.json").read_text(encoding="utf-8")) + mine)}[arm]

    def build(tmp: Path) -> None:
        for f in sorted(source.iterdir()):
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        if changed[1]:
            (tmp / changed[0]).write_text(json.dumps(changed[1], indent=1, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        else:  # forget10 is the largest split: its authors' facts are all the related facts there are
            (tmp / changed[0]).unlink()

    from uipe.io import sha256_bytes

    hashes = [sha256_bytes((source / f).read_bytes()) for f in ("related.json", f"{forget_split}.json")]
    want = {"derived_from": str(source), "source_hashes": hashes, "arm": arm,
            "forget_split": forget_split, "changed": changed[0]}
    return reuse_or_build(out, want, build)


def prepare_workers(cfg: ExperimentConfig) -> int:
    """The workers each reference model of `with` trained on (side by side: half each), so `without`'s target
    trains with the same recipe."""
    side = cfg.prepare.side_by_side and cfg.prepare.retain and not cfg.model.target and cfg.train.num_workers >= 2
    return cfg.train.num_workers // 2 if side else cfg.train.num_workers


def run_seed(cfg: ExperimentConfig, root: Path, seed: int) -> dict:
    """The three arms of one seed, trained, unlearned and scored; {method: {arm: [metrics per epoch, 0 first]}}."""
    from uipe.data import ensure_data
    from uipe.pipeline import ensure_reference
    from uipe.train.recipe import prepare, unlearn_methods

    cfgs = arm_configs(cfg, root, seed)
    paths = {arm: RunPaths.of(root / arm) for arm in ARMS}
    stage(f"reconstruction seed {seed}: the target with related facts, and its retain model")
    data = Path(ensure_data(cfgs["with"], paths["with"]))
    prepare(cfgs["with"], paths["with"].root)
    ensure_reference(cfgs["with"], paths["with"], str(data))
    for arm in ("without", "related"):
        derive_data(data, paths[arm].data, cfg.data.forget_split, arm)
    stage(f"reconstruction seed {seed}: the target without the forget authors' related facts")
    workers = prepare_workers(cfgs["with"])
    prepare(cfgs["without"].model_copy(update={"train": cfgs["without"].train.model_copy(
        update={"num_workers": workers})}), paths["without"].root)
    for arm in ARMS:  # each arm's methods in one fit
        stage(f"reconstruction seed {seed}: unlearn {', '.join(cfg.unlearn.methods)} from `{arm}` "
              f"({cfg.unlearn.epochs} epochs)")
        unlearn_methods(cfgs[arm], paths[arm].root, list(cfg.unlearn.methods))
    return {method: _score(cfgs, paths, method) for method in cfg.unlearn.methods}


def _score(cfgs: dict[str, ExperimentConfig], paths: dict[str, RunPaths], method: str) -> dict[str, list[dict]]:
    """Each arm's epochs at alpha 0 (theta_ini first), one Ray task per arm, cached beside the arm's run."""
    import ray

    from uipe.search.driver import make_setup

    setups = {arm: make_setup(cfgs[arm], paths[arm], method) for arm in ARMS}
    todo, out = {}, {}
    for arm, setup in setups.items():
        cache = paths[arm].root / f"trajectory-{method}.json"
        want = {"setup": setup.identity(), "epochs": sorted(setup.epoch_dirs)}
        have = recorded(cache)
        if have is None or not reusable(have.get("identity"), json.loads(json.dumps(want, default=str)), cache):
            task = ray.remote(_trajectory).options(num_cpus=cfgs[arm].search.cpus_per_trial,
                                                   num_gpus=cfgs[arm].search.gpus_per_trial)
            todo[arm] = (cache, want, task.remote(setup))
        else:
            out[arm] = have["value"]
    progress = Task(f"score {method} arms", len(ARMS))
    progress.update(len(out), "")
    for arm, (cache, want, ref) in todo.items():
        out[arm] = ray.get(ref)
        atomic_write_json(cache, {"identity": json.loads(json.dumps(want, default=str)), "value": out[arm]})
        progress.update(len(out), f"{arm} done")
    progress.finish()
    return {arm: out[arm] for arm in ARMS}


def _trajectory(setup) -> list[dict]:
    """theta_ini's metrics, then every epoch's at alpha 0, in one process (theta_ini first: it reads the freshly
    loaded model)."""
    from uipe.search.trial import evaluate_point, theta_ini_metrics

    rows = [{"epoch": 0, **theta_ini_metrics(setup)}]
    for e in sorted(setup.epoch_dirs):
        rows.append({"epoch": e, **evaluate_point(setup, 0.0, e, 0.0).to_report()})
    return rows


def run_reconstruction(cfg: ExperimentConfig, root: Path, command: str) -> dict:
    """Every seed's arms, then the comparison: reconstruction.json, reconstruction.md, reconstruction.png."""
    from uipe.ray_session import ensure_ray
    from uipe.study.mechanism_report import compare, markdown, plot

    root = root.resolve()
    start = time.time()
    with exclusive(root, "uipe experiment reconstruction"):
        ensure_ray()
        seeds = []
        for i, seed in enumerate(cfg.study.seeds):
            stage(f"reconstruction: seed {seed} ({i + 1} of {len(cfg.study.seeds)})")
            seeds.append({"seed": seed, "methods": run_seed(cfg, root / f"seed-{seed}", seed)})
        result = {"command": command, "config": cfg.model_dump(mode="json"), "seeds": seeds,
                  "comparison": compare(seeds), "seconds": time.time() - start}
        text = markdown(result)
        plot(seeds, root / "reconstruction.png")
        atomic_write_text(root / "reconstruction.md", text)
        atomic_write_json(root / RESULT_FILE, result)
    say(text)
    say(f"Reconstruction done in {time.time() - start:.0f} s: {root / 'reconstruction.md'}, "
        f"{root / 'reconstruction.png'}")
    return result
