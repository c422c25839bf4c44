#!/usr/bin/env bash
# Launch (or update) the cluster and wait until N GPU worker nodes are up.
#   scripts/cluster_up.sh [N]      N GPU nodes to hold (default 1); 0 releases the hold (scale to demand)
# On-premises servers (provider local: every worker_ips server joins, there is nothing to hold): N worker nodes to
# wait for. Env: UIPE_CLUSTER_YAML (default cluster.yaml), UIPE_GPUS_PER_NODE (8), UIPE_UP_TIMEOUT_S (1800).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

n_nodes="${1:-1}"
gpus_per_node="${UIPE_GPUS_PER_NODE:-8}"
timeout_s="${UIPE_UP_TIMEOUT_S:-1800}"
[[ "$n_nodes" =~ ^[0-9]+$ ]] || die "N must be a whole number of GPU nodes, got '$n_nodes'"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "UIPE_GPUS_PER_NODE must be a positive integer, got '$gpus_per_node'"

need_ray
need_yaml
if grep -q 'fs-REPLACE_ME' "$CLUSTER_YAML"; then
    die "$CLUSTER_YAML: set your EFS file system in the mount command (fs-REPLACE_ME), or remove it and use S3 (docs/OPERATIONS.md)"
fi
placeholder="$(sed 's/#.*//' "$CLUSTER_YAML" | grep -o '[A-Za-z0-9._-]*REPLACE_ME[A-Za-z0-9._-]*' | head -n 1 || true)"
[[ -z "$placeholder" ]] || die "$CLUSTER_YAML: replace the placeholder $placeholder (your servers' addresses, ssh user)"
need_provider_access

if [[ ! -s "$TOKEN_FILE" ]]; then
    say "generating the Ray auth token in $TOKEN_FILE (ray get-auth-token --generate)"
    ray get-auth-token --generate >/dev/null
fi
chmod 600 "$TOKEN_FILE"

say "ray up -y $CLUSTER_YAML (head node, setup, Ray + MLflow on the head)"
ray up -y "$CLUSTER_YAML"

if [[ "$(provider_type)" == local ]]; then
    # The local provider keeps every listed server: wait until N workers (and the head) are alive in `ray status`.
    deadline=$((SECONDS + timeout_s))
    while :; do
        status="$(ray exec "$CLUSTER_YAML" "ray status" 2>/dev/null || true)"
        # Autoscaler v1 lists live nodes per type under "Active:", e.g. " 3 local.cluster.node".
        have="$(printf '%s\n' "$status" | sed -n '/^Active:/,/^Pending:/s/^ *\([0-9][0-9]*\) local\.cluster\.node.*/\1/p' | head -n 1)"
        have="${have:-0}"
        say "nodes up: $have / $((n_nodes + 1)) (head + $n_nodes workers)"
        ((have >= n_nodes + 1)) && break
        if ((SECONDS >= deadline)); then
            printf '%s\n' "$status" >&2
            die "timed out after ${timeout_s}s waiting for $n_nodes worker node(s): see 'ray exec $CLUSTER_YAML \"tail -n 50 /tmp/ray/session_latest/logs/monitor.*\"'"
        fi
        sleep 10
    done
    say "cluster ready. Next: scripts/cluster_submit.sh CONFIG (scripts/cluster_tunnel.sh first unless the head is this machine)"
    exit 0
fi

# Workers have min_workers 0: ask the autoscaler to hold N GPU nodes (a persistent request; N=0 clears it).
say "requesting $n_nodes GPU node(s) of $gpus_per_node GPUs from the autoscaler"
request="import ray; ray.init(address=\"auto\", logging_level=\"ERROR\"); \
from ray.autoscaler.sdk import request_resources; \
request_resources(bundles=[{\"GPU\": $gpus_per_node}] * $n_nodes)"
ray exec "$CLUSTER_YAML" "python -c '$request'"

want_gpus=$((n_nodes * gpus_per_node))
deadline=$((SECONDS + timeout_s))
while :; do
    # `ray status` prints usage lines such as " 0.0/16.0 GPU": the total after the slash counts live GPUs.
    status="$(ray exec "$CLUSTER_YAML" "ray status" 2>/dev/null || true)"
    have_gpus="$(printf '%s\n' "$status" | sed -n 's#.*/\([0-9.]*\) GPU.*#\1#p' | head -n 1)"
    have_gpus="${have_gpus%%.*}"
    have_gpus="${have_gpus:-0}"
    say "GPUs up: $have_gpus / $want_gpus"
    if ((have_gpus >= want_gpus)); then
        break
    fi
    if ((SECONDS >= deadline)); then
        printf '%s\n' "$status" >&2
        die "timed out after ${timeout_s}s waiting for $n_nodes GPU node(s) (capacity or quota?); the cluster stays up: scripts/cluster_down.sh to stop paying"
    fi
    sleep 30
done
say "cluster ready. Next: scripts/cluster_tunnel.sh (another terminal), then scripts/cluster_submit.sh configs/tofu_llama2_7b.yaml"
