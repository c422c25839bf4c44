"""The cluster job on two Ray "nodes" simulated on one machine (ray.cluster_utils.Cluster): `uipe unlearn` with one
FSDP2 worker per node over shared local storage, as a `ray job submit` entrypoint would run it on a real cluster.

It runs in a subprocess with its own Ray (two one-CPU nodes); the test session's shared Ray stays idle meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from uipe.config import load_config
    from uipe.train.recipe import unlearn

    run, shared, data, target = sys.argv[1:5]
    # Cluster() records its address in /tmp/ray whatever temp_dir says, and fails if no earlier Ray made that folder
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                      "object_store_memory": 200 * 2**20, "temp_dir": tempfile.mkdtemp(prefix="uipe-2node-")})
    cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    # The session's tiny world: its data and target model (theta_ini), as a cluster job would find them on
    # shared storage; only the unlearning runs here, two epochs.
    overrides = [f"data.source={data}", f"model.target={target}", "train.num_workers=2",
                 f"train.storage_path={shared}", "unlearn.epochs=2"]
    cfg = load_config(None, overrides)
    manifest = unlearn(cfg, run, "ga")
    print(json.dumps({"nodes": [n["Resources"].get("CPU") for n in nodes], "manifest": str(manifest)}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.e2e
def test_unlearn_runs_one_worker_per_node_over_shared_storage(tmp_path: Path, prepared_run) -> None:
    shared = tmp_path / "shared_storage"  # stands in for NFS/EFS or s3:// on a real cluster
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(run), str(shared), str(prepared_run.data),
                           str(prepared_run.target_model)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Two nodes of one CPU each, and two one-CPU workers: Ray must place one worker on each node.
    assert out["nodes"] == [1.0, 1.0]
    manifest = json.loads(Path(out["manifest"]).read_text())
    assert [e["epoch"] for e in manifest["epochs"]] == [1, 2]
    for e in manifest["epochs"]:
        assert any(Path(e["path"]).glob("*.safetensors"))
    # Every epoch's Ray Train checkpoint landed in the shared storage path.
    checkpoints = sorted(p.name for p in shared.rglob("ga-epoch_*") if p.is_dir())
    assert {"ga-epoch_01", "ga-epoch_02"} <= set(checkpoints), checkpoints
