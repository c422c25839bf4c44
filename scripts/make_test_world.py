"""Make the test suite's shipped tiny world: the tiny preset's prepared target and retain models, which the session
fixture (tests/conftest.py, `prepared_run`) copies into its run folder so that `prepare` reuses them instead of
training them again (~100 s of every suite on 2 cores; training is checked by the tests that train).

    .venv/bin/python scripts/make_test_world.py            # ~2 minutes on 2 cores; then commit tests/data/tiny_world

Run it when tests/test_train.py's shipped-world test says the models are stale: prepare's identity of a model (its
data, its recipe, the base model's identity) no longer matches the one they were made with. prepare is deterministic
on CPU, so a model made again from the same identity has the same bytes (git then stores no new blob).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import SEARCH_OVERRIDES, SHIPPED_WORLD  # noqa: E402  (the tests' tiny config and world: one source)

ROLES = ("target", "retain")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_WORLD, help="where the world goes (default: %(default)s)")
    args = parser.parse_args()
    from uipe.io import atomic_dir

    with tempfile.TemporaryDirectory(prefix="uipe-test-world-") as tmp:
        run = Path(tmp) / "run"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, never a cluster's
        sets = [x for item in SEARCH_OVERRIDES for x in ("--set", item)]  # the session's config, as the fixture's
        code = subprocess.run([sys.executable, "-m", "uipe.cli", "prepare", "--run-dir", str(run), *sets],
                              env=env).returncode
        if code:  # prepare said why on the console; nothing was written to the world
            print(f"make_test_world: uipe prepare exited {code}; {args.out} is unchanged", file=sys.stderr)
            return code
        with atomic_dir(args.out / "models", overwrite=True) as models:
            for role in ROLES:
                shutil.copytree(run / "models" / role, models / role)
    for role in ROLES:
        weights = args.out / "models" / role / "model.safetensors"
        print(f"{role}: {weights} sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
