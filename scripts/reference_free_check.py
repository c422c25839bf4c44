"""Do the reference-free signals tell a model that learned the forget facts from one that never saw them?

Scores the target (theta_ini) and the retain model of every seed of a `uipe study` folder on the forget and holdout
splits (no generation: signals need only likelihoods) and prints, per seed and model, the holdout KS p-value and
the membership-inference AUCs of the loss attack and Min-K%++, forget items as members, holdout items as
non-members. A signal that works puts the target far from 0.5 (AUC) or near 0 (KS) and the retain model near 0.5
(AUC) or high (KS).

    python scripts/reference_free_check.py runs/tiny-study          # after `uipe study --seeds 5`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("holdout_ks", "mia_loss_auc", "mia_min_k_pp_auc")


def check(study: Path) -> list[dict]:
    import torch

    from uipe.config import ExperimentConfig
    from uipe.eval.evaluate import Evaluator
    from uipe.models import load_model, load_tokenizer
    from uipe.paths import RunPaths

    torch.set_num_threads(2)
    cfg = ExperimentConfig.model_validate(json.loads((study / "study_config.json").read_text()))
    rows = []
    for seed_dir in sorted(study.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        paths = RunPaths.of(seed_dir)
        for role, folder in (("target", paths.target_model), ("retain", paths.retain_model)):
            ev = Evaluator.from_source(str(paths.data), cfg.data.forget_split, load_tokenizer(folder),
                                       cfg.model.prompt_template, cfg.eval, cfg.model.max_length)
            agg = ev.evaluate(load_model(folder), generate=False).aggregates
            rows.append({"seed": seed_dir.name, "model": role, **{k: agg[k] for k in KEYS}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a `uipe study` folder")
    rows = check(parser.parse_args().study)
    print("| seed | model | holdout KS | loss-attack AUC | Min-K%++ AUC |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['model']} | {r['holdout_ks']:.3g} | {r['mia_loss_auc']:.3f} | "
              f"{r['mia_min_k_pp_auc']:.3f} |")


if __name__ == "__main__":
    main()
