"""Benchmark: what telling the sampler finished trials in order (`deterministic: true`, as in uipe study) costs a
TPE search, and whether a seed then repeats it when the trials are timed differently; against `deterministic: false`
(the default), measured in the same run, alternating.

    .venv/bin/python scripts/bench_search_order.py --world /tmp/uipe-chaos-x/world --repeats 2
    .venv/bin/python scripts/bench_search_order.py --world ... --baseline /tmp/uipe-base   # + the same, older code

--baseline: a folder holding another checkout's uipe package (`git archive <rev> uipe tune_spaces | tar -x -C DIR`):
both arms again with that code (PYTHONPATH), in the same rounds. Run the script from outside the repository, since
`python -m` puts the working folder first on sys.path.

--world: a run folder with GA unlearned over 2 epochs (scripts/chaos.py builds one under its --work folder). Each
search is `uipe search --method ga` on a fresh copy of it (sqlite store): TPE, alpha in [0, 2], epochs 1 and 2,
--samples trials, 2 at a time, seed 0. Every other search has its first trial (the base method at epoch 2) slowed by
--delay seconds (a fault point's delay, as on a busy node), so the arms are timed two ways. Per arm: wall time, Tune
overhead, the gap between a slot's trials (bench_trial_gap.py), and how many of its searches tried exactly the
points of its first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trial_gap import one_search  # noqa: E402

SPACE = ("method: ga\nalpha: {{low: 0.0, high: 2.0}}\nepochs: [1, 2]\nsampler: tpe\nstartup_trials: 2\n"
         "num_samples: {samples}\nmax_concurrent_trials: 2\ndeterministic: {deterministic}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2, help="searches per arm and timing")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--delay", type=float, default=3.0)
    ap.add_argument("--set", dest="overrides", action="append", default=["unlearn.epochs=2"])
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout's code, run as two more arms")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uipe-bench-order-"))
    arms = {"in order": ("true", {}), "as finished": ("false", {})}
    if args.baseline is not None:
        code = {"PYTHONPATH": str(args.baseline.resolve())}
        arms |= {"in order (baseline)": ("true", code), "as finished (baseline)": ("false", code)}
    for flag in ("true", "false"):
        (work / f"{flag}.yaml").write_text(SPACE.format(samples=args.samples, deterministic=flag))
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for i in range(2 * args.repeats):
        slowed = {"UIPE_FAULTS": f"trial:delay,seconds={args.delay},alpha=0,epoch=2"} if i % 2 else {}
        for arm in arms if i % 2 == 0 else reversed(arms):
            flag, code = arms[arm]
            name = f"{arm.replace(' ', '-').replace('(', '').replace(')', '')}-{i}"  # "in-order-baseline-1"
            r = one_search(args.world.resolve(), work, name, f"sqlite:///{work / f'{name}.db'}", args.overrides,
                           work / f"{flag}.yaml", slowed | code)
            runs[arm].append(r)
            print(f"{arm} {i} ({'slowed' if slowed else 'plain'}): wall {r['search_s']:.1f} s, overhead "
                  f"{r['tune_overhead']:.3f}, gap {r['between_trials_s']:.3f} s", flush=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
           "searches_per_arm": 2 * args.repeats, "samples": args.samples}
    for arm, rs in runs.items():
        out[arm] = {k: round(statistics.mean(r[k] for r in rs), 3)
                    for k in ("search_s", "tune_overhead", "between_trials_s", "between_trials_max_s")}
        out[arm]["repeat_the_first"] = f"{sum(r['points'] == rs[0]['points'] for r in rs[1:])} of {len(rs) - 1}"
    for suffix in ("", " (baseline)") if args.baseline else ("",):
        out[f"wall_ratio_in_order_vs_as_finished{suffix}"] = round(
            out[f"in order{suffix}"]["search_s"] / out[f"as finished{suffix}"]["search_s"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
