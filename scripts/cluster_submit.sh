#!/usr/bin/env bash
# Submit the uipe pipeline as a Ray job through the dashboard tunnel and print the job id.
#   scripts/cluster_submit.sh CONFIG [uipe run options...]
#   e.g. scripts/cluster_submit.sh configs/tofu_llama2_7b.yaml --set data.forget_split=forget05
# The run folder lives on the shared storage (/mnt/uipe/runs/<name>), so re-submitting the same command after
# a failure resumes: finished stages are skipped. Env: UIPE_SHARED (the shared storage, /mnt/uipe), UIPE_RUN_ROOT
# ($UIPE_SHARED/runs), UIPE_CLUSTER_YAML (an on-premises head on this machine is reached without a tunnel).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

[[ $# -ge 1 ]] || die "usage: scripts/cluster_submit.sh CONFIG [uipe run options...]"
config="$1"
shift
run_root="${UIPE_RUN_ROOT:-$SHARED_DIR/runs}"

need_ray
cd "$UIPE_REPO" || die "cannot enter the repository root $UIPE_REPO"
[[ -f "$config" ]] || die "$config not found (a path relative to the repository root, e.g. configs/tofu_llama2_7b.yaml)"
[[ "$config" != /* ]] || die "$config: give the config relative to the repository root (it travels with --working-dir)"
need_token
use_tunnel

# The run folder is named after the config's `name:` (uipe's default run folder is runs/<name>).
name="$(sed -n 's/^name:[[:space:]]*["'\'']\{0,1\}\([A-Za-z0-9_.-]*\).*/\1/p' "$config" | head -n 1)"
name="${name:-$(basename "$config" .yaml)}"
job_id="uipe-${name}-$(date +%Y%m%d-%H%M%S)"

# PYTHONPATH=. makes the uploaded working dir's uipe win over the copy installed at `ray up` time, so code
# changes need no new `ray up`. HF_HOME on the shared storage: every node downloads the 7B weights once.
runtime_env='{"env_vars": {"PYTHONPATH": ".", "HF_HOME": "'"$SHARED_DIR"'/hf", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}}'

say "ray job submit --submission-id $job_id --working-dir . -- uipe run --config $config --run-dir $run_root/$name $*"
ray job submit --address "$RAY_ADDRESS" --no-wait --submission-id "$job_id" --working-dir . \
    --runtime-env-json "$runtime_env" \
    -- uipe run --config "$config" --run-dir "$run_root/$name" "$@" >&2
say "follow it: scripts/cluster_logs.sh $job_id    (MLflow UI: http://127.0.0.1:5000 through the tunnel)"
printf '%s\n' "$job_id"
