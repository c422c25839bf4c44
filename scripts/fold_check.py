"""Can the study's two author folds be trusted? Forget quality of the selection and report folds beside every other
author partition of the same sizes, for every point a finished run scored.

For theta_ini, each epoch of the base method (alpha 0) and each extrapolated point of the run's search, the per-item
truth ratios on the forget split are scored (no generation) and compared with the retain reference's by TOFU's KS
test: on the whole split, on the folds `data.records.author_folds` gives, and on each of the C(k, ceil(k/2))
partitions of the k forget authors into folds of the same sizes (or --partitions random ones). It prints:

- per point: log10 forget quality on fold A (selection) and B (report), the gap A - B, where that gap falls among all
  partitions (percentile), its spread over author partitions beside its spread over random item partitions of the
  same sizes (what independent items would give), and the median log truth ratio of the model on each fold;
- per partition: the gap averaged over points and how many points share its sign (is the gap a property of the
  partition, shared by every model, rather than of the point?);
- per utility floor: the study's choice (best fold-A forget quality, then higher utility, then smaller alpha) made on
  fold A of each partition and read on both folds: the winner's curse is the mean gap over all partitions; and the
  same gap cross-fitted (also chosen on B and read on A, the two averaged);
- per forget author: its fold and how far its items' truth ratios sit from the reference's (theta_ini, chosen point);
- with --worlds N: per-fold answer lengths of the alternating folds over N synthetic worlds (no models): does the
  generator make odd- and even-ranked forget authors differ?

    .venv/bin/python scripts/fold_check.py runs/foldcheck --method graddiff \
        --set data.synth.authors=120 [--partitions 0] [--worlds 200]

`--config`/`--set` must be those the run was made with (the forget split, template and length come from them).
CPU-sized: one scoring pass over the forget split per point; about 20 s for a 17-point run on an idle 2-core VM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np


def log10_fq(model_r: np.ndarray, ref_r: np.ndarray, idx: np.ndarray) -> float:
    from uipe.eval.metrics import forget_quality

    return math.log10(max(forget_quality(model_r[idx], ref_r[idx]), 1e-300))


def author_ids(records) -> list[str]:
    from uipe.data.records import TOFU_ITEMS_PER_AUTHOR

    return [r.author or f"block-{i // TOFU_ITEMS_PER_AUTHOR}" for i, r in enumerate(records)]


def partitions(authors: list[str], alternating: tuple[list[int], list[int]], limit: int,
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Item indices (A, B) of author partitions with |A| = the alternating fold A's number of authors; the alternating
    one first. Every partition when limit is 0 or there are at most `limit`, else `limit` random ones."""
    names = list(dict.fromkeys(authors))
    n_a = len(dict.fromkeys(authors[i] for i in alternating[0]))
    combos = list(itertools.combinations(range(len(names)), n_a))
    if limit and len(combos) > limit:
        combos = random.Random(seed).sample(combos, limit)
    item = np.array([names.index(a) for a in authors])
    first = (np.array(alternating[0]), np.array(alternating[1]))
    out = [first]
    for c in combos:
        a = np.flatnonzero(np.isin(item, c))
        if not np.array_equal(a, first[0]):
            out.append((a, np.flatnonzero(~np.isin(item, c))))
    return out


def score_points(paths, cfg, method: str) -> tuple[list[dict], np.ndarray, list]:
    """Every point the run's search scored (theta_ini first), each with its forget truth ratios; the reference's."""
    import torch

    from uipe.eval.evaluate import Evaluator
    from uipe.eval.reference import load_reference
    from uipe.models import load_model, load_tokenizer
    from uipe.report import from_csv
    from uipe.update_vector import cached_update_vector

    torch.set_num_threads(2)
    manifest = json.loads(paths.manifest(method).read_text())
    theta_ini, dirs = manifest["theta_ini"], {int(e["epoch"]): e["path"] for e in manifest["epochs"]}
    ev = Evaluator.from_source(str(paths.data), cfg.data.forget_split, load_tokenizer(theta_ini),
                               cfg.model.prompt_template, cfg.eval, cfg.model.max_length).full_fidelity()
    ref = np.asarray(load_reference(cfg.eval.retain_reference or paths.retain_reference).forget_truth_ratios)
    summary = json.loads((paths.search(method) / "result.json").read_text())
    rows = [r for r in from_csv((paths.search(method) / "results.csv").read_text()) if r.full]
    model = load_model(theta_ini)
    points = [{"label": "theta_ini", "alpha": 0.0, "epoch": 0, "utility": summary["theta_ini"]["model_utility"],
               "r": ev.truth_ratios(model, ["forget"])["forget"], "row": None}]
    for r in sorted(rows, key=lambda r: (r.alpha != 0, r.epoch, r.alpha)):
        cached_update_vector(theta_ini, dirs[r.epoch]).apply(model, r.alpha)
        label = f"epoch {r.epoch}" if r.alpha == 0 else f"a={r.alpha:.2f} e{r.epoch}"
        points.append({"label": label, "alpha": r.alpha, "epoch": r.epoch, "utility": r.utility,
                       "r": ev.truth_ratios(model, ["forget"])["forget"], "row": r})
    return points, ref, ev.splits["forget"]


def chosen(points: list[dict], fq: np.ndarray, floor_utility: float) -> int | None:
    """The study's rule (uipe.decisions.best): best forget quality on the fold, then higher utility, smaller alpha."""
    ok = [i for i, p in enumerate(points) if p["row"] is not None and p["utility"] >= floor_utility]
    return max(ok, key=lambda i: (fq[i], points[i]["utility"], -points[i]["alpha"])) if ok else None


def ks_grid(n: int) -> str:
    """The exact two-sample KS p-values at D = 1/4 and 1/2 for n items on each side (the fold's grid)."""
    from scipy.stats import ks_2samp

    base = np.arange(n, dtype=float)
    return ", ".join(f"{ks_2samp(base, base + round(n * d)).pvalue:.2g}" for d in (0.25, 0.5))


def author_table(points: list[dict], ref: np.ndarray, authors: list[str], fold_a: np.ndarray, k: int) -> None:
    """Per forget author: its fold and median log truth ratio, model - reference, of theta_ini and point k."""
    names = list(dict.fromkeys(authors))
    print(f"\n| author rank | fold | median log R - reference's: theta_ini | {points[k]['label']} |")
    print("|---|---|---|---|")
    for rank, name in enumerate(names, 1):
        f = np.array([i for i, a in enumerate(authors) if a == name])
        d = [float(np.median(np.log(points[j]['r'][f]) - np.log(ref[f]))) for j in (0, k)]
        print(f"| {rank} | {'A' if f[0] in fold_a else 'B'} | {d[0]:+.2f} | {d[1]:+.2f} |")


def world_check(n: int, authors: int, forget_split: str) -> None:
    """Mean answer / paraphrase - perturbed length (characters) of fold A minus fold B over n synthetic worlds."""
    from uipe.data.records import author_folds
    from uipe.data.synth import build_benchmark

    gaps = []
    for seed in range(n):
        recs = build_benchmark(authors=authors, seed=seed)[0][f"{forget_split}_perturbed"]
        a, b = author_folds(recs)
        ans = [np.mean([len(recs[i].answer) for i in f]) for f in (a, b)]
        pp = [np.mean([len(recs[i].paraphrased_answer) - np.mean([len(p) for p in recs[i].perturbed_answer])
                       for i in f]) for f in (a, b)]
        gaps.append((ans[0] - ans[1], pp[0] - pp[1]))
    g = np.array(gaps)
    se = g.std(0, ddof=1) / math.sqrt(n)
    print(f"\n{n} worlds of {authors} authors, {forget_split}, fold A - fold B (mean +- s.e.): answer length "
          f"{g[:, 0].mean():+.2f} +- {se[0]:.2f} chars, paraphrase - perturbed length {g[:, 1].mean():+.2f} +- "
          f"{se[1]:.2f} chars")


def choice_table(points: list[dict], lq: np.ndarray, n_parts: int) -> float:
    """Per floor: the study's choice made on fold A of every partition, read on both folds, and cross-fitted (also
    chosen on fold B and read on A, the two selected-minus-read gaps averaged). Returns theta_ini's utility."""
    from uipe.config import FLOORS

    print("\n| floor | alternating: chosen point, A, B, A - B | all partitions: mean A - B, sd [2.5%, 97.5%], "
          "share A < B | cross-fitted (choose on each fold, read the other, average): alternating; all partitions |")
    print("|---|---|---|---|")
    start = points[0]["utility"]
    for floor in FLOORS:
        picks = [chosen(points, lq[:, j, 0], floor * start) for j in range(n_parts)]
        back = [chosen(points, lq[:, j, 1], floor * start) for j in range(n_parts)]  # chosen on fold B
        if picks[0] is None:
            continue
        g = np.array([lq[k, j, 0] - lq[k, j, 1] for j, k in enumerate(picks)])
        # cross-fitting: the selected-minus-read gap of both directions, averaged; a fold's own offset cancels
        cross = (g + np.array([lq[k, j, 1] - lq[k, j, 0] for j, k in enumerate(back)])) / 2
        k = picks[0]
        print(f"| {floor} | {points[k]['label']}, {lq[k, 0, 0]:.2f}, {lq[k, 0, 1]:.2f}, {g[0]:+.2f} | "
              f"{g.mean():+.2f}, {g.std():.2f} [{np.quantile(g, 0.025):+.2f}, {np.quantile(g, 0.975):+.2f}], "
              f"{np.mean(g < 0):.2f} | {cross[0]:+.2f}; {cross.mean():+.2f} [{np.quantile(cross, 0.025):+.2f}, "
              f"{np.quantile(cross, 0.975):+.2f}] |")
    return start


def main() -> None:
    from uipe.config import FLOORS, load_config
    from uipe.data.records import author_folds
    from uipe.paths import RunPaths

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished `uipe run` folder (its search done)")
    p.add_argument("--method", default="graddiff")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--partitions", type=int, default=0, help="random partitions to compare (0: every one)")
    p.add_argument("--worlds", type=int, default=0, help="also check the generator over this many worlds")
    args = p.parse_args()
    cfg, paths = load_config(args.config, args.overrides), RunPaths.of(args.run)
    points, ref, records = score_points(paths, cfg, args.method)
    authors = author_ids(records)
    alt = author_folds(records)
    parts = partitions(authors, alt, args.partitions)
    # lq[point, partition, fold]: log10 forget quality
    lq = np.array([[[log10_fq(pt["r"], ref, f) for f in ab] for ab in parts] for pt in points])
    gap = lq[:, :, 0] - lq[:, :, 1]
    # the same gap over random item partitions of the same sizes, authors ignored: what independent items would give
    rng = np.random.default_rng(0)
    perms = [rng.permutation(len(ref)) for _ in range(200)]
    item_parts = [(q[: len(alt[0])], q[len(alt[0]):]) for q in perms]
    item_sd = [np.std([log10_fq(pt["r"], ref, fa) - log10_fq(pt["r"], ref, fb) for fa, fb in item_parts])
               for pt in points]
    whole = [log10_fq(pt["r"], ref, np.arange(len(ref))) for pt in points]
    check = [abs(10 ** lq[i, 0, 0] - pt["row"].metric("forget_quality_select")) for i, pt in enumerate(points)
             if pt["row"] is not None]
    print(f"{args.run}: {len(set(authors))} forget authors, folds of {len(alt[0])} and {len(alt[1])} items, "
          f"{len(parts)} partitions; fold A forget quality matches results.csv to {max(check):.1e}")
    med = lambda r, f: float(np.median(np.log(r[f])))  # noqa: E731
    a, b = parts[0]
    print(f"reference median log R: fold A {med(ref, a):+.3f}, fold B {med(ref, b):+.3f}; KS p-value at D = 1/4, "
          f"1/2: fold A {ks_grid(len(a))}, fold B {ks_grid(len(b))}\n")
    print("| point | utility | log10 FQ all | A | B | A - B | percentile of A - B | mean A - B, sd (all partitions) "
          "| sd, item partitions | median log R A / B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, pt in enumerate(points):
        pct = 100 * np.mean(gap[i] <= gap[i, 0])
        print(f"| {pt['label']} | {pt['utility']:.3f} | {whole[i]:.2f} | {lq[i, 0, 0]:.2f} | {lq[i, 0, 1]:.2f} | "
              f"{gap[i, 0]:+.2f} | {pct:.0f} | {gap[i].mean():+.2f}, {gap[i].std():.2f} | "
              f"{item_sd[i]:.2f} | {med(pt['r'], a):+.2f} / {med(pt['r'], b):+.2f} |")
    print("\n| partition (fold A authors' ranks) | mean A - B over points | points with that sign |")
    print("|---|---|---|")
    names = list(dict.fromkeys(authors))
    for j, (fa, _) in enumerate(parts):
        ranks = sorted({names.index(authors[i]) + 1 for i in fa})
        m = gap[:, j].mean()
        print(f"| {ranks}{' (alternating)' if j == 0 else ''} | {m:+.2f} | "
              f"{int(np.sum(np.sign(gap[:, j]) == np.sign(m)))}/{len(points)} |")
    # how much of the gap is the partition's (shared by all points) and how much the point's
    between, within = gap.mean(0).var(), (gap - gap.mean(0)).var()
    print(f"\nvariance of A - B: between partitions {between:.3f}, within a partition (over points) {within:.3f}")
    start = choice_table(points, lq, len(parts))
    author_table(points, ref, authors, a, chosen(points, lq[:, 0, 0], FLOORS[0] * start) or 0)
    if args.worlds:
        world_check(args.worlds, cfg.data.synth.authors, cfg.data.forget_split)


if __name__ == "__main__":
    main()
