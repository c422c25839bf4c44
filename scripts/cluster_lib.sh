# shellcheck shell=bash
# Shared helpers for scripts/cluster_*.sh (sourced, not run). Every check fails with one line and exit 2.

# The repository root: the scripts run `ray` from there so file_mounts (".") and --working-dir (".") point at it.
UIPE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Which cluster file: UIPE_CLUSTER_YAML=cluster-gcp.yaml for the GCP variant.
CLUSTER_YAML="${UIPE_CLUSTER_YAML:-cluster.yaml}"
# The head's dashboard, as seen through the tunnel (scripts/cluster_tunnel.sh).
DASHBOARD_PORT="${UIPE_DASHBOARD_PORT:-8265}"
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

# Cloud credentials for `ray up`/`ray down`, checked before anything is launched.
need_cloud_credentials() {
    case "$(provider_type)" in
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
    export RAY_ADDRESS="http://127.0.0.1:${DASHBOARD_PORT}"
    if command -v curl >/dev/null 2>&1; then
        # Any HTTP answer (even 401) means the tunnel is up; 000 means nothing listens.
        local code
        code="$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$RAY_ADDRESS/api/version" || true)"
        [[ "$code" != "000" && -n "$code" ]] ||
            die "Ray dashboard not reachable at $RAY_ADDRESS: run scripts/cluster_tunnel.sh in another terminal"
    fi
}
