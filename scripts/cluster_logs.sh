#!/usr/bin/env bash
# Follow a job's logs (progress lines from every stage) through the dashboard tunnel.
#   scripts/cluster_logs.sh JOB_ID        (the id cluster_submit.sh printed; 'ray job list' shows all)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

[[ $# -eq 1 ]] || die "usage: scripts/cluster_logs.sh JOB_ID"
need_ray
cd "$UIPE_REPO" || die "cannot enter the repository root $UIPE_REPO"
need_token
use_tunnel
say "ray job status $1"
ray job status --address "$RAY_ADDRESS" "$1"
say "ray job logs --follow $1 (Ctrl-C stops following; the job keeps running)"
ray job logs --address "$RAY_ADDRESS" --follow "$1"
