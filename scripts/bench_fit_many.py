"""Fixed cost per additional unlearning method: N methods as N fits (a worker group each, as before issue 27)
against the same N methods in one fit (one worker group), same model, data and workers, in the same run.

    .venv/bin/python scripts/bench_fit_many.py                      # tiny preset's model, the 4 paper methods
    .venv/bin/python scripts/bench_fit_many.py --hidden 1024 --layers 12 --methods ga,graddiff --epochs 1 \
        --max-length 32 --set data.forget_split=forget01

A fit's fixed cost is its wall time minus the seconds its epochs spent in optimizer steps: start-up, loading theta_ini
and the reference, exports, checkpoints, shutdown. Per additional method in one fit: (fixed of the grouped fit - the
mean fixed cost of a one-method fit) / (N - 1). theta_ini is a random-init model of the given size (no prepare).
Goal (issue 27): <= 3 s on the tiny preset; <= 25% of the one-fit-per-method cost at 800M parameters, 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup(root: Path, args: argparse.Namespace):
    """The synthetic world and a random-init model of the asked size, and the config that unlearns from it."""
    from uipe.config import load_config
    from uipe.data.synth import write_benchmark
    from uipe.tiny_model import build_tiny, corpus_from_data

    tiny = [] if args.hidden is None else [
        f"model.tiny.hidden_size={args.hidden}", f"model.tiny.intermediate_size={4 * args.hidden}",
        f"model.tiny.num_hidden_layers={args.layers}", f"model.tiny.num_attention_heads={max(1, args.hidden // 64)}"]
    base_cfg = load_config(None, tiny)
    data = write_benchmark(root / "data", authors=100, facts=8, seed=0)
    base = build_tiny(root / "base", corpus_from_data(data), base_cfg.model.tiny, seed=0)
    extra = [f"unlearn.epochs={args.epochs}"] if args.epochs else []
    extra += [f"model.max_length={args.max_length}"] if args.max_length else []
    cfg = load_config(None, [*tiny, f"data.source={data}", f"model.target={base}", "train.max_failures=0", *extra,
                             *args.set])
    return cfg, base


def fit_and_train_seconds(manifest: Path) -> tuple[float, float]:
    """(the fit's wall time, the seconds this method's epochs spent training)."""
    m = json.loads(manifest.read_text())
    return m["timing"]["fit_seconds"], sum(e["seconds"] for e in m["epochs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="ga,graddiff,npo,simnpo")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default: the tiny preset's model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="unlearn.epochs (default: the preset's)")
    ap.add_argument("--max-length", type=int, default=None, help="model.max_length (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], help="another config override, e.g. data.forget_split=forget01")
    args = ap.parse_args()
    methods = args.methods.split(",")

    import ray
    import torch

    from uipe.models import load_model
    from uipe.train.recipe import unlearn_methods

    root = Path(tempfile.mkdtemp(prefix="uipe-bench-fit-many-"))
    cfg, base = setup(root, args)
    n_params = sum(p.numel() for p in load_model(base).parameters())
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=256 * 2**20, _temp_dir=str(root / "ray"), log_to_driver=False)
    separate = {}
    for method in methods:  # the baseline: one fit per method, each in a run folder of its own
        t0 = time.perf_counter()
        manifest = unlearn_methods(cfg, root / f"alone-{method}", [method])[method]
        fit, train = fit_and_train_seconds(manifest)
        shutil.rmtree(root / f"alone-{method}")  # at 800M a method's exports and training state are ~13 GB
        separate[method] = {"wall_s": time.perf_counter() - t0, "fit_s": fit, "train_s": train, "fixed_s": fit - train}
    t0 = time.perf_counter()
    manifests = unlearn_methods(cfg, root / "together", methods)
    wall = time.perf_counter() - t0
    fit = fit_and_train_seconds(manifests[methods[0]])[0]
    train = sum(fit_and_train_seconds(m)[1] for m in manifests.values())
    timing = {m: json.loads(p.read_text())["timing"] for m, p in manifests.items()}
    ray.shutdown()
    shutil.rmtree(root)
    fixed_alone = sum(s["fixed_s"] for s in separate.values()) / len(methods)
    per_extra = (fit - train - fixed_alone) / max(1, len(methods) - 1)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__, "ray": ray.__version__, "model_params": n_params, "methods": methods,
        "epochs": cfg.unlearn.epochs, "workers": cfg.train.num_workers,
        "separate": {m: {k: round(v, 1) for k, v in s.items()} for m, s in separate.items()},
        "separate_fit_s_total": round(sum(s["fit_s"] for s in separate.values()), 1),
        "one_fit_s": round(fit, 1), "one_fit_wall_s": round(wall, 1), "one_fit_train_s": round(train, 1),
        "one_fit_worker_setup_s": round(timing[methods[0]]["worker_setup_seconds"], 1),
        "job_setup_s": {m: round(t["job_setup_seconds"], 2) for m, t in timing.items()},
        "fixed_s_per_method_alone": round(fixed_alone, 1),
        "fixed_s_per_additional_method_in_one_fit": round(per_extra, 1),
        "ratio_additional_vs_alone": round(per_extra / fixed_alone, 3),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
