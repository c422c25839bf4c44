"""Cluster and operations files, checked offline: nothing here contacts a cloud or a Kubernetes cluster.

- cluster*.yaml: validated as `ray up` validates before it talks to the provider (jsonschema against ray's own
  ray-schema.json, then ray.autoscaler's prepare_config + validate_config); broken copies must fail.
- deploy/kuberay/*.yaml: parse and carry the fields KubeRay v1.7 needs (pinned image, rayVersion, token auth).
- scripts/*.sh: bash -n and shellcheck; the prerequisite checks fail with exit 2 and one line.
- The repository: no service bound to all interfaces by default, nothing that looks like a secret.
- configs/tofu_llama2_7b.yaml: loads with uipe.config.load_config and agrees with the cluster files.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(p for p in REPO.glob("cluster*.yaml"))
KUBERAY = REPO / "deploy" / "kuberay"
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
PAPER_CONFIG = REPO / "configs" / "tofu_llama2_7b.yaml"


# ---------------------------------------------------------------- cluster.yaml, as `ray up` validates it

def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_like_ray_up(config: dict) -> dict:
    """What `ray up` checks before contacting the cloud (ray/autoscaler/_private/commands.py, _bootstrap_config):
    the raw file against ray-schema.json, then prepare_config (merge with the provider's defaults.yaml) and
    validate_config (schema again on the merged config, head_node_type, min/max workers)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, _ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_exists() -> None:
    assert (REPO / "cluster.yaml").is_file()


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_ray_up_validation(path: Path) -> None:
    prepared = validate_like_ray_up(_load(path))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    # The head advertises no GPU: no training or evaluation is ever scheduled there.
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert all(t["min_workers"] == 0 for t in workers)  # GPUs only while a job needs them
    # prepare_config replaces top-level keys with defaults.yaml's when absent: the provider's default head
    # command binds the dashboard to all interfaces, so ours must survive the merge.
    head_cmds = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "--host 127.0.0.1" in head_cmds and "mlflow server" in head_cmds
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup ~/uipe-venv/bin/mlflow server" in head_cmds
    for cmds in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[cmds] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), cmds
    # Setup installs uipe with the pins, torch first.
    setup = prepared["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if '"torch==2.13.0" -c constraints.txt' in c)
    uipe_i = next(i for i, c in enumerate(setup) if '-e ".[dev,postgres]" -c constraints.txt' in c)
    assert torch_i < uipe_i


def test_broken_copies_fail_validation() -> None:
    import jsonschema

    good = _load(REPO / "cluster.yaml")
    unknown_key = copy.deepcopy(good)
    unknown_key["head_nodes"] = {}  # a typo of a real key: the schema allows no additional properties
    with pytest.raises(jsonschema.ValidationError, match="head_nodes"):
        validate_like_ray_up(unknown_key)

    gpu_type = next(n for n, t in good["available_node_types"].items() if t["resources"].get("GPU"))
    fractional = copy.deepcopy(good)
    fractional["available_node_types"][gpu_type]["resources"]["GPU"] = 0.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        validate_like_ray_up(fractional)

    wrong_head = copy.deepcopy(good)
    wrong_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_like_ray_up(wrong_head)


def test_cluster_file_carries_no_inline_credentials() -> None:
    text = (REPO / "cluster.yaml").read_text()
    prepared = _load(REPO / "cluster.yaml")
    assert "ssh_private_key" not in prepared["auth"]  # Ray creates a key pair per cluster
    assert not re.search(r"(?i)aws_(secret_)?access_key", text)


# ---------------------------------------------------------------- KubeRay manifests

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pinned(image: str) -> bool:
    """A tag with a version number; never :latest or no tag at all."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag) is not None


def test_pinned_image_rule() -> None:
    assert _pinned("rayproject/ray:2.60.0-py311-gpu")
    assert not _pinned("rayproject/ray:latest")
    assert not _pinned("rayproject/ray")
    assert not _pinned("localhost:5000/uipe")  # the colon is the registry port, not a tag


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: dashboard must not be exposed"
    assert not head.get("enableIngress", False), where
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] and "template" in g for g in groups), where
    gpu = [g for g in groups for c in _containers(g["template"])
           if str(c["resources"]["limits"].get("nvidia.com/gpu")) == "8"]
    assert gpu, f"{where}: a worker group with nvidia.com/gpu: 8"
    for template in [head["template"]] + [g["template"] for g in groups]:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for c in _containers(template):
            assert _pinned(c["image"]), f"{where}: image {c['image']} is not pinned to a version"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if c["name"].startswith("ray-"):
                assert "/mnt/uipe" in mounts, f"{where}: {c['name']} lacks the shared volume"
                claim = volumes[mounts["/mnt/uipe"]]["persistentVolumeClaim"]["claimName"]
                assert claim == "uipe-shared"


def test_kuberay_raycluster() -> None:
    (doc,) = _docs(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "raycluster.yaml")


def test_kuberay_rayjob() -> None:
    (doc,) = _docs(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("uipe run --config configs/tofu_llama2_7b.yaml")
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside YAML: must parse too
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def test_kuberay_mlflow_uses_postgres_from_a_secret() -> None:
    """MLflow's store is a database server named by a Secret: no SQLite on the shared volume, no password in git."""
    service, statefulset = _docs(KUBERAY / "postgres.yaml")
    assert service["kind"] == "Service" and service["spec"]["type"] == "ClusterIP"
    (pg,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert _pinned(pg["image"])
    password = next(e for e in pg["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "uipe-mlflow-db", "key": "password"}
    for path, spec in ((KUBERAY / "raycluster.yaml", lambda d: d["spec"]),
                       (KUBERAY / "rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"])):
        (doc,) = _docs(path)
        (mlflow,) = [c for c in _containers(spec(doc)["headGroupSpec"]["template"]) if c["name"] == "mlflow"]
        args = " ".join(mlflow["args"])
        assert "sqlite" not in args and "--host 127.0.0.1" in args and "--artifacts-destination" in args, path
        uri = next(e for e in mlflow["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
        assert uri["valueFrom"]["secretKeyRef"] == {"name": "uipe-mlflow-db", "key": "uri"}, path
        env = {e["name"]: e.get("value") for e in mlflow["env"]}
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false", path  # MLflow's job runner: unused, off


def test_kuberay_pvc_is_shared() -> None:
    (doc,) = _docs(KUBERAY / "pvc.yaml")
    assert doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "uipe-shared"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_base_image_pinned() -> None:
    froms = re.findall(r"(?m)^FROM\s+(\S+)", (KUBERAY / "Dockerfile").read_text())
    assert froms and all(_pinned(f) for f in froms)


# ---------------------------------------------------------------- scripts

def test_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    for n in ("up", "submit", "tunnel", "logs", "down"):
        assert f"cluster_{n}.sh" in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if script.name != "cluster_lib.sh":  # the sourced library has no shebang and no options of its own
        assert script.read_text().startswith("#!/usr/bin/env bash")
        assert "set -euo pipefail" in script.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_shellcheck(script: Path) -> None:
    r = subprocess.run(["shellcheck", "-x", script.name], cwd=script.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _run_script(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def _env(tmp_path: Path, with_ray: bool) -> dict[str, str]:
    path = "/usr/bin:/bin"
    if shutil.which("ray", path=path):
        pytest.skip("a system-wide ray on /usr/bin:/bin: cannot build a PATH without ray")
    if with_ray:
        ray = shutil.which("ray") or str(REPO / ".venv" / "bin" / "ray")
        if not Path(ray).exists():
            pytest.skip("ray CLI not found")
        path = f"{Path(ray).parent}:{path}"
    # A private HOME: no token, no AWS profile; nothing here may reach a cloud.
    return {"PATH": path, "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], r.stderr


@pytest.mark.parametrize("name", ["cluster_up.sh", "cluster_down.sh", "cluster_tunnel.sh"])
def test_scripts_need_ray(tmp_path: Path, name: str) -> None:
    _one_line_error(_run_script(name, [], _env(tmp_path, with_ray=False)), "ray not found on PATH")


def test_up_needs_the_cluster_file(tmp_path: Path) -> None:
    env = _env(tmp_path, with_ray=True) | {"UIPE_CLUSTER_YAML": str(tmp_path / "missing.yaml")}
    _one_line_error(_run_script("cluster_up.sh", ["1"], env), "missing.yaml not found")


def test_up_refuses_the_storage_placeholder(tmp_path: Path) -> None:
    # A copy that still has the EFS placeholder: the script must stop before any cloud call (`ray up`).
    copy_ = tmp_path / "cluster.yaml"
    text = (REPO / "cluster.yaml").read_text()
    if "fs-REPLACE_ME" not in text:
        text = re.sub(r"fs-[0-9a-f]+\.efs", "fs-REPLACE_ME.efs", text)
    copy_.write_text(text)
    env = _env(tmp_path, with_ray=True) | {"UIPE_CLUSTER_YAML": str(copy_)}
    _one_line_error(_run_script("cluster_up.sh", ["1"], env), "fs-REPLACE_ME")
    _one_line_error(_run_script("cluster_up.sh", ["two"], env), "whole number")


def test_submit_needs_config_and_token(tmp_path: Path) -> None:
    env = _env(tmp_path, with_ray=True)
    _one_line_error(_run_script("cluster_submit.sh", [], env), "usage")
    _one_line_error(_run_script("cluster_submit.sh", ["configs/nope.yaml"], env), "configs/nope.yaml not found")
    _one_line_error(_run_script("cluster_submit.sh", ["configs/tofu_llama2_7b.yaml"], env), "no Ray auth token")
    _one_line_error(_run_script("cluster_logs.sh", ["some-job"], env), "no Ray auth token")


# ---------------------------------------------------------------- repository-wide: binding and secrets

def _repo_text_files() -> list[Path]:
    """Tracked files plus new ones not ignored (so a file is checked before it is committed)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    files = []
    for rel in out:
        p = REPO / rel
        if p.is_file() and p.stat().st_size < 2_000_000:
            try:
                p.read_text()
            except UnicodeDecodeError:
                continue
            files.append(p)
    return files


ALL_INTERFACES = "0.0.0" + ".0"  # split so this file does not match itself


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line)


def test_nothing_binds_all_interfaces_by_default() -> None:
    """Services bind 127.0.0.1 and are reached through tunnels; prose (Markdown) may explain why not."""
    offenders = []
    for p in _repo_text_files():
        if p.suffix == ".md":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ALL_INTERFACES in _strip_comment(line):
                offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


SECRET_PATTERNS = {
    "AWS access key id": re.compile("AKIA" + r"[0-9A-Z]{16}"),
    "AWS secret key name": re.compile("aws_secret" + "_access_key", re.I),
    "private key": re.compile("-----BEGIN [A-Z ]*PRIV" + "ATE KEY-----"),
    "GitHub token": re.compile("gh" + r"[pousr]_[A-Za-z0-9]{36}"),
    "Hugging Face token": re.compile("hf" + r"_[A-Za-z0-9]{34}"),
}


def test_secret_patterns_match_examples() -> None:
    # Each pattern must be able to fail the scan: an example of each is caught.
    examples = {"AWS access key id": "AKIA" + "ABCDEFGHIJKLMNOP", "AWS secret key name": "AWS_SECRET" + "_ACCESS_KEY=x",
                "private key": "-----BEGIN RSA PRIV" + "ATE KEY-----", "GitHub token": "ghp" + "_" + "a" * 36,
                "Hugging Face token": "hf" + "_" + "B" * 34}
    for name, text in examples.items():
        assert SECRET_PATTERNS[name].search(text), name


def test_no_secrets_in_repository() -> None:
    found = [f"{p.relative_to(REPO)}:{i}: {name}" for p in _repo_text_files()
             for i, line in enumerate(p.read_text().splitlines(), 1)
             for name, pat in SECRET_PATTERNS.items() if pat.search(line)]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- the paper's configuration

def test_paper_config_loads() -> None:
    from uipe.config import load_config

    cfg = load_config(PAPER_CONFIG)
    assert cfg.model.target == "locuslab/tofu_ft_llama2-7b"
    assert cfg.data.source == "locuslab/TOFU" and cfg.data.forget_split == "forget10"
    assert cfg.unlearn.methods == ["ga", "graddiff", "kl", "npo"]
    assert (cfg.unlearn.lr, cfg.unlearn.epochs, cfg.train.effective_batch_size) == (1e-5, 5, 32)
    assert cfg.model.dtype == "bfloat16" and cfg.eval.max_new_tokens == 200
    assert cfg.search.gpus_per_trial == 0.25
    for split in ("forget01", "forget05"):
        assert load_config(PAPER_CONFIG, [f"data.forget_split={split}"]).data.forget_split == split


def test_paper_config_fits_the_cluster() -> None:
    from uipe.config import load_config

    cfg = load_config(PAPER_CONFIG)
    cluster = _load(REPO / "cluster.yaml")
    gpus = max(t["resources"].get("GPU", 0) for t in cluster["available_node_types"].values())
    assert cfg.train.num_workers <= gpus  # one training worker per GPU, on one node
    # Everything durable lives on the storage every node mounts.
    assert cfg.train.storage_path.startswith("/mnt/uipe/")
    assert any("/mnt/uipe" in c for c in cluster["setup_commands"])
    # One writer: the driver logs through the head's MLflow server, whose store is PostgreSQL (never SQLite on NFS).
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--host 127.0.0.1 --port 5000" in start and "sqlite" not in start
    assert "MLFLOW_BACKEND_STORE_URI=" in start and "--artifacts-destination /mnt/uipe/mlartifacts" in start
    setup = " ".join(cluster["head_setup_commands"])
    assert "postgresql" in setup and "~/.pgpass" in setup and "mlflow_backend_uri" in setup


def test_paper_config_retain_references_ship() -> None:
    """forget10 uses TOFU's retain90 logs; the documented overrides for forget05/01 name retain95/99."""
    from uipe.config import load_config

    ref = REPO / load_config(PAPER_CONFIG).eval.retain_reference
    assert ref.name == "llama2-7b_retain90" and ref.is_dir() and any(ref.iterdir()), ref
    for retain in ("llama2-7b_retain95", "llama2-7b_retain99"):
        assert retain in PAPER_CONFIG.read_text()
        assert (ref.parent / retain).is_dir(), retain

