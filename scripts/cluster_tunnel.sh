#!/usr/bin/env bash
# Forward the head's Ray dashboard (127.0.0.1:8265) and MLflow UI (127.0.0.1:5000) to this machine's
# 127.0.0.1 over SSH. Both services listen on the head's loopback only: the tunnel is the only way in.
# Runs until Ctrl-C. Env: UIPE_CLUSTER_YAML, UIPE_DASHBOARD_PORT (8265), UIPE_MLFLOW_PORT (5000).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

mlflow_port="${UIPE_MLFLOW_PORT:-5000}"
need_ray
need_yaml
if head_on_this_host; then
    say "the head ($(yaml_value head_ip)) is this machine: no tunnel needed, its dashboard and MLflow answer there"
    exit 0
fi
need_token
need_cmd ssh "ray's port forwarding runs ssh -L"

say "forwarding 127.0.0.1:$DASHBOARD_PORT (Ray dashboard) and 127.0.0.1:$mlflow_port (MLflow UI) to the head"
say "dashboard: http://127.0.0.1:$DASHBOARD_PORT (paste the token from 'ray get-auth-token' when asked)"
say "MLflow UI: http://127.0.0.1:$mlflow_port      Ctrl-C closes the tunnel"
# ssh -L binds the local end to localhost only (ssh's default without GatewayPorts).
ray exec "$CLUSTER_YAML" --port-forward "$DASHBOARD_PORT" --port-forward "$mlflow_port" \
    "echo tunnel open; while true; do sleep 3600; done"
