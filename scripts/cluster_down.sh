#!/usr/bin/env bash
# Tear the cluster down (all nodes). The shared storage (EFS, S3 or the lab's NFS) is not touched: runs, checkpoints
# and the MLflow data stay for the next cluster; delete them yourself to free the space.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

need_ray
need_yaml
need_provider_access
if [[ "$(provider_type)" == local ]]; then
    # Servers are not terminated, so what runs on them must be stopped: the head's MLflow server and PostgreSQL
    # (their data kept), and Ray on the workers, which Ray 2.60's `ray down` leaves running for this provider
    # (it runs `ray stop` on the head only, and terminating a local node only marks it so in a state file).
    say "stopping the head's MLflow server and PostgreSQL (data kept)"
    ray exec "$CLUSTER_YAML" "bash ~/uipe/deploy/onprem/head_services.sh stop" ||
        say "could not stop the head's services (head unreachable?); continuing"
    key="$(yaml_value ssh_private_key)"
    user="$(yaml_value ssh_user)"
    # shellcheck disable=SC2088  # the ~ is the worker's home: it expands there, not here
    while read -r ip; do
        say "ray stop on worker $ip"
        # -n: ssh must not read the loop's stdin (the list of workers), or every worker after the first is skipped
        ssh -n -i "${key/#\~/$HOME}" -o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=no \
            -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "$user@$ip" '~/uipe-venv/bin/ray stop' >/dev/null ||
            say "could not reach worker $ip; its Ray stops by itself once the head is gone"
    done < <(local_worker_ips)
fi
say "ray down -y $CLUSTER_YAML (stops the head and every worker)"
ray down -y "$CLUSTER_YAML"
say "cluster down; shared storage kept"
