# shellcheck shell=bash
# Shared helpers for scripts/cluster_*.sh (sourced, not run). Every check fails with one line and exit 2.

# The repository root: the scripts run `ray` from there so file_mounts (".") and --working-dir (".") point at it.
UIPE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Which cluster file, for every cluster_*.sh: UIPE_CLUSTER_YAML=deploy/onprem/cluster.yaml for a lab's own servers.
CLUSTER_YAML="${UIPE_CLUSTER_YAML:-cluster.yaml}"
# The head's dashboard, as seen through the tunnel (scripts/cluster_tunnel.sh).
DASHBOARD_PORT="${UIPE_DASHBOARD_PORT:-8265}"
# The storage every node mounts: run folders, checkpoints, the HF cache (read by the scripts that source this).
# shellcheck disable=SC2034
SHARED_DIR="${UIPE_SHARED:-/mnt/uipe}"
TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH ($2)"
}

need_ray() {
    need_cmd ray "install the repository's environment: pip install -e '.[dev]' -c constraints.txt"
}

need_yaml() {
    cd "$UIPE_REPO" || die "cannot enter the repository root $UIPE_REPO"
    [[ -f "$CLUSTER_YAML" ]] || die "$UIPE_REPO/$CLUSTER_YAML not found (set UIPE_CLUSTER_YAML to choose another file)"
}

provider_type() {
    sed -n 's/^[[:space:]]*type:[[:space:]]*\([a-z]*\).*/\1/p' "$CLUSTER_YAML" | head -n 1
}

# A top-level-ish scalar of the cluster file (head_ip, ssh_user, ssh_private_key), without a YAML parser.
yaml_value() {
    sed -n "s/^[[:space:]]*$1:[[:space:]]*[\"']\{0,1\}\([^\"'#[:space:]]*\).*/\1/p" "$CLUSTER_YAML" | head -n 1
}

# The on-premises provider with its head on this very machine (a loopback address other than 127.0.0.1, as in
# scripts/onprem_check.sh): the head's services listen on that address and no tunnel is needed.
head_on_this_host() {
    [[ -f "$CLUSTER_YAML" && "$(provider_type)" == local && "$(yaml_value head_ip)" == 127.* ]]
}

# The on-premises provider's worker addresses, one a line (ray's own Python reads the YAML).
local_worker_ips() {
    "$(dirname "$(command -v ray)")/python" -c \
        'import sys, yaml; print("\n".join(yaml.safe_load(open(sys.argv[1]))["provider"]["worker_ips"]))' "$CLUSTER_YAML"
}

# Provider access for `ray up`/`ray down`, checked before anything is launched.
need_provider_access() {
    case "$(provider_type)" in
    local)
        local key
        key="$(yaml_value ssh_private_key)"
        key="${key/#\~/$HOME}"
        [[ -r "$key" ]] || die "$CLUSTER_YAML: ssh_private_key $key not readable (the key that logs in to every server)"
        need_cmd ssh "ray up reaches the servers over SSH"
        need_cmd rsync "ray up copies the repository with rsync"
        # Ray 2.60's `ray up` starts autoscaler v2 by default, which does not drive the local provider.
        export RAY_UP_enable_autoscaler_v2=0
        ;;
    aws)
        if command -v aws >/dev/null 2>&1; then
            aws sts get-caller-identity >/dev/null 2>&1 ||
                die "AWS credentials not usable (aws sts get-caller-identity failed): run 'aws configure' or 'aws sso login'"
        else
            say "aws CLI not found: skipping the credential check (ray up uses boto3's credential chain)"
        fi
        ;;
    gcp)
        if command -v gcloud >/dev/null 2>&1; then
            gcloud auth application-default print-access-token >/dev/null 2>&1 ||
                die "GCP credentials not usable: run 'gcloud auth application-default login'"
        else
            say "gcloud CLI not found: skipping the credential check"
        fi
        ;;
    esac
}

# The Ray auth token is a shared secret: it lives in ~/.ray/auth_token (mode 600), never in the repository.
need_token() {
    [[ -s "$TOKEN_FILE" ]] ||
        die "no Ray auth token at $TOKEN_FILE: run scripts/cluster_up.sh (or 'ray get-auth-token --generate')"
}

# Clients (ray job submit/logs) talk to the head's dashboard through the local tunnel, with the token.
use_tunnel() {
    export RAY_AUTH_MODE=token
    local host=127.0.0.1
    head_on_this_host && host="$(yaml_value head_ip)"
    export RAY_ADDRESS="http://${UIPE_DASHBOARD_HOST:-$host}:${DASHBOARD_PORT}"
    if command -v curl >/dev/null 2>&1; then
        # Any HTTP answer (even 401) means the tunnel is up; 000 means nothing listens.
        local code
        code="$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$RAY_ADDRESS/api/version" || true)"
        local hint="run scripts/cluster_tunnel.sh in another terminal"
        head_on_this_host && hint="is the cluster up? (scripts/cluster_up.sh)"
        [[ "$code" != "000" && -n "$code" ]] || die "Ray dashboard not reachable at $RAY_ADDRESS: $hint"
    fi
}
