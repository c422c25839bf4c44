"""deploy/onprem/: the on-premises cluster file, checked offline as `ray up` checks it, and its end-to-end check.

The real run (scripts/onprem_check.sh: three sshd "servers" in their own PID namespaces on 127.0.0.2-4, `ray up`, a
reduced job, a worker killed mid-fit, `ray down`) takes minutes; it runs here only with UIPE_ONPREM_E2E=1, as root,
with unshare and sshd. It never touches another Ray on the machine: its nodes' `ray stop` sees only their namespace.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_cluster import _env, _one_line_error, _run_script, validate_like_ray_up

REPO = Path(__file__).resolve().parent.parent
ONPREM = REPO / "deploy" / "onprem"
CLUSTER = ONPREM / "cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_onprem_file_passes_ray_up_validation() -> None:
    config = _load()
    prepared = validate_like_ray_up(config)
    # The local provider makes its single node type and keeps every listed server.
    (node_type,) = prepared["available_node_types"]
    assert node_type == prepared["head_node_type"] == "local.cluster.node"
    n = len(config["provider"]["worker_ips"])
    assert prepared["available_node_types"][node_type]["min_workers"] == n == prepared["max_workers"]
    head, workers = " ".join(prepared["head_start_ray_commands"]), " ".join(prepared["worker_start_ray_commands"])
    for starts in (head, workers):
        assert "RAY_AUTH_MODE=token ~/uipe-venv/bin/ray start" in starts
        # Several nodes on one host: no fixed agent or object-manager port, the node's address as ray up reached it.
        assert "--dashboard-agent-listen-port=0" in starts and "--object-manager-port" not in starts
        assert "--node-ip-address=\"$(echo $SSH_CONNECTION | cut -d' ' -f3)\"" in starts
    assert "--port=6380" in head and "$RAY_HEAD_IP:6380" in workers  # 6379 is Redis's
    assert "--dashboard-host=127.0.0.1" in head and "--num-gpus=0" in head
    assert "head_services.sh mlflow" in head and "UIPE_SERVICE_HOST=127.0.0.1" in head
    assert any("head_services.sh postgres" in c for c in prepared["head_setup_commands"])


def test_onprem_setup_keeps_cluster_yaml_conventions() -> None:
    """The venv, the pins and ~/.bashrc: the same commands as the cloud file (none of its sudo or apt)."""
    onprem = _load()["setup_commands"]
    cloud = yaml.safe_load((REPO / "cluster.yaml").read_text())["setup_commands"]
    for cmd in onprem:
        if "pip install" in cmd and "ray[default]" not in cmd or "bashrc" in cmd or "chmod 600" in cmd:
            assert cmd in cloud, cmd
    assert not any("sudo" in c or "apt-get" in c for c in onprem)


def test_onprem_services_script() -> None:
    text = (ONPREM / "head_services.sh").read_text()
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in text and '--host "$host"' in text
    assert "listen_addresses = '%s'" in text and "systemctl" not in text.split("set -euo pipefail")[1]
    r = subprocess.run(["bash", str(ONPREM / "head_services.sh"), "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: usage: head_services.sh postgres|mlflow|stop"


def test_onprem_services_script_lints() -> None:
    script = ONPREM / "head_services.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_onprem_path_mentions_no_cloud() -> None:
    words = re.compile(r"\b(aws|ec2|efs|s3|gcp|azure|amazon|boto3|cloud)\b", re.I)
    for path in [*ONPREM.iterdir(), REPO / "scripts" / "onprem_check.sh"]:
        hits = [line for line in path.read_text().splitlines() if words.search(line)]
        assert not hits, f"{path.name}: {hits}"


def test_broken_onprem_copies_fail() -> None:
    from click import ClickException  # what ray's cli_logger.abort raises

    typed = _load() | {"available_node_types": {"gpu": {"resources": {}, "node_config": {}}}}
    with pytest.raises(ClickException, match="available_node_types is not supported"):
        validate_like_ray_up(typed)
    no_head = copy.deepcopy(_load())
    del no_head["provider"]["head_ip"]
    with pytest.raises(ClickException, match="head_ip"):
        validate_like_ray_up(no_head)


def _copy(tmp_path: Path, **provider) -> Path:
    config = _load()
    config["provider"].update(provider)
    config["auth"] = {"ssh_user": "someone", "ssh_private_key": str(tmp_path / "missing_key")}
    path = tmp_path / "onprem.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_scripts_refuse_bad_onprem_files(tmp_path: Path) -> None:
    env = _env(tmp_path, with_ray=True)
    template = env | {"UIPE_CLUSTER_YAML": str(CLUSTER)}
    _one_line_error(_run_script("cluster_up.sh", ["2"], template), "head.REPLACE_ME")
    filled = env | {"UIPE_CLUSTER_YAML": str(_copy(tmp_path, head_ip="10.0.0.1", worker_ips=["10.0.0.2"]))}
    _one_line_error(_run_script("cluster_up.sh", ["1"], filled), "missing_key not readable")
    _one_line_error(_run_script("cluster_down.sh", [], filled), "missing_key not readable")


def test_tunnel_says_it_is_not_needed_for_a_head_on_this_host(tmp_path: Path) -> None:
    env = _env(tmp_path, with_ray=True) | {"UIPE_CLUSTER_YAML": str(_copy(tmp_path, head_ip="127.0.0.2"))}
    r = _run_script("cluster_tunnel.sh", [], env)
    assert r.returncode == 0 and r.stderr.count("\n") == 1 and "no tunnel needed" in r.stderr, r.stderr


def _e2e_skip_reason() -> str | None:
    if os.environ.get("UIPE_ONPREM_E2E") != "1":
        return "the real on-premises run takes minutes: set UIPE_ONPREM_E2E=1 (docs/OPERATIONS.md)"
    if os.geteuid() != 0:
        return "needs root: the check makes PID and mount namespaces"
    if shutil.which("unshare") is None:
        return "unshare not found"
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        return "PID namespaces not available here"
    if not Path("/usr/sbin/sshd").exists() and shutil.which("apt-get") is None:
        return "no sshd and no apt-get to install it"
    return None


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(_e2e_skip_reason() is not None, reason=str(_e2e_skip_reason()))
@pytest.mark.e2e
def test_onprem_check_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ) | {"UIPE_ONPREM_LOG": str(tmp_path / "check.log")}
    r = subprocess.run(["bash", str(REPO / "scripts" / "onprem_check.sh")], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("onprem check passed: up "), r.stdout
