#!/usr/bin/env bash
# The head's services for MLflow, run on the head by deploy/onprem/cluster.yaml (the one place these commands live):
#   head_services.sh postgres   once per `ray up` (head_setup_commands): MLflow's PostgreSQL store, its role and database
#   head_services.sh mlflow     every start (head_start_ray_commands): the store up, then the MLflow server
#   head_services.sh stop       scripts/cluster_down.sh: both stopped, their data kept for the next `ray up`
# Why not systemd and sudo: a lab's servers are shared and the ssh user is rarely an administrator (and some hosts
# have no init at all), so uipe runs its own PostgreSQL instance, started directly with pg_ctl, in a data folder
# of its own, on its own port, listening on the head's loopback only. It needs PostgreSQL's server programs
# installed (apt-get install postgresql). A URI already in ~/.uipe/mlflow_backend_uri (a database the lab runs,
# password in ~/.pgpass) is used as it is and nothing is started. Every failure is one line and exit 2.
# Env: UIPE_SERVICE_HOST (127.0.0.1), UIPE_PG_PORT (5433), UIPE_PG_DATA, UIPE_MLFLOW_PORT (5000), UIPE_SHARED
# (/mnt/uipe: MLflow's artifacts), UIPE_VENV (~/uipe-venv).
set -euo pipefail

# The settings of the last postgres/mlflow call, so that `stop` (and a restart) needs none; the environment wins.
saved="$HOME/.uipe/services.env"
if [[ -f "$saved" ]]; then
    while IFS='=' read -r k v; do [[ -n "${!k:-}" ]] || export "$k=$v"; done < "$saved"
fi
host="${UIPE_SERVICE_HOST:-127.0.0.1}"
port="${UIPE_PG_PORT:-5433}"
mlflow_port="${UIPE_MLFLOW_PORT:-5000}"
shared="${UIPE_SHARED:-/mnt/uipe}"
venv="${UIPE_VENV:-$HOME/uipe-venv}"
state="$HOME/.uipe"
uri_file="$state/mlflow_backend_uri"
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# PostgreSQL refuses to run as root: then the instance belongs to the distribution's `postgres` user, in a folder
# that user can reach (root's home is closed to it).
if [[ $(id -u) -eq 0 ]]; then
    cd /  # the postgres user may not enter the current folder
    owner=(runuser -u postgres --)
    data="${UIPE_PG_DATA:-/var/lib/postgresql/uipe-mlflow}"
else
    owner=()
    data="${UIPE_PG_DATA:-$state/pgdata}"
fi

save_settings() {
    mkdir -p "$state" && chmod 700 "$state"
    printf 'UIPE_SERVICE_HOST=%s\nUIPE_PG_PORT=%s\nUIPE_PG_DATA=%s\nUIPE_MLFLOW_PORT=%s\nUIPE_SHARED=%s\n' \
        "$host" "$port" "$data" "$mlflow_port" "$shared" > "$saved"
}

pg_bin() {
    local d
    for d in "${UIPE_PG_BIN:-}" "$(dirname "$(command -v initdb 2>/dev/null || echo /x/x)")" \
        $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/psql" ]] && { echo "$d"; return; }
    done
    die "PostgreSQL's server programs (initdb, pg_ctl) not found on the head: install them (apt-get install postgresql), set UIPE_PG_BIN, or put a database URI in $uri_file"
}

ours() { [[ ! -f "$uri_file" ]] || grep -qx "postgresql://uipe@$host:$port/mlflow" "$uri_file"; }

pg_up() {
    local bin
    bin="$(pg_bin)"
    if [[ ! -f "$data/PG_VERSION" ]]; then
        mkdir -p "$data"
        [[ ${#owner[@]} -eq 0 ]] || chown postgres: "$data"
        chmod 700 "$data"
        "${owner[@]}" "$bin/initdb" -D "$data" -E UTF8 --auth-local=peer --auth-host=scram-sha-256 >/dev/null ||
            die "initdb failed in $data"
        # Loopback only, and the socket in the data folder: the instance is invisible to the server's own PostgreSQL.
        printf "listen_addresses = '%s'\nport = %s\nunix_socket_directories = '%s'\n" "$host" "$port" "$data" |
            "${owner[@]}" tee -a "$data/postgresql.conf" >/dev/null
    fi
    if ! "${owner[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        "${owner[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null ||
            die "PostgreSQL did not start on $host:$port (is the port taken?): see $data/server.log"
    fi
}

psql_admin() { "${owner[@]}" "$(pg_bin)/psql" -h "$data" -p "$port" -d postgres -v ON_ERROR_STOP=1 -tAq "$@"; }

cmd_postgres() {
    save_settings
    ours || { echo "MLflow store: $(cat "$uri_file") (given; nothing started)"; return; }
    pg_up
    (test -f "$state/pg_password" || (umask 077 && openssl rand -hex 24 > "$state/pg_password"))
    local pw
    pw="$(cat "$state/pg_password")"
    [[ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname='uipe'")" == 1 ]] ||
        psql_admin -c "CREATE ROLE uipe LOGIN PASSWORD '$pw'" || die "cannot create the role uipe"
    [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname='mlflow'")" == 1 ]] ||
        psql_admin -c "CREATE DATABASE mlflow OWNER uipe" || die "cannot create the database mlflow"
    # Add our line to ~/.pgpass; the user's other lines stay.
    touch "$HOME/.pgpass" && chmod 600 "$HOME/.pgpass"
    grep -q "^$host:$port:mlflow:uipe:" "$HOME/.pgpass" || echo "$host:$port:mlflow:uipe:$pw" >> "$HOME/.pgpass"
    echo "postgresql://uipe@$host:$port/mlflow" > "$uri_file"
    echo "MLflow store: PostgreSQL on $host:$port, data in $data"
}

cmd_mlflow() {
    [[ -f "$uri_file" ]] || die "no $uri_file: run 'head_services.sh postgres' first (ray up does)"
    save_settings
    ! ours || pg_up  # after a reboot of the head, its own store comes back first
    mkdir -p "$shared/mlartifacts" || die "cannot create $shared/mlartifacts (the shared storage)"
    if [[ -f "$HOME/mlflow.pid" ]] && kill -0 "$(cat "$HOME/mlflow.pid")" 2>/dev/null; then
        echo "mlflow server already running"; return
    fi
    # MLflow 3 answers only Host headers it trusts (loopback and private ranges by default): another address the
    # server binds (scripts/onprem_check.sh uses the head's 127.0.0.x) is added, and the tunnel's 127.0.0.1 kept.
    local allowed=()
    [[ "$host" == 127.0.0.1 ]] || allowed=(--allowed-hosts "$host,$host:$mlflow_port,127.0.0.1,127.0.0.1:$mlflow_port")
    # MLflow 3's GenAI job runner (huey consumers) is off: uipe runs none of its jobs.
    MLFLOW_BACKEND_STORE_URI="$(cat "$uri_file")" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        nohup "$venv/bin/mlflow" server --host "$host" --port "$mlflow_port" --workers 2 "${allowed[@]}" \
        --artifacts-destination "$shared/mlartifacts" > "$HOME/mlflow-server.log" 2>&1 &
    echo $! > "$HOME/mlflow.pid"
    # Fail here, at `ray up`, rather than at the first job.
    for _ in $(seq 90); do  # a fresh store's migrations take about a minute on 2 busy cores
        "$venv/bin/python" -c "import urllib.request as u; u.urlopen('http://$host:$mlflow_port/health', timeout=2)" \
            2>/dev/null && { echo "mlflow server on http://$host:$mlflow_port"; return; }
        kill -0 "$(cat "$HOME/mlflow.pid")" 2>/dev/null || break
        sleep 2
    done
    die "mlflow server did not answer on $host:$mlflow_port: see ~/mlflow-server.log"
}

cmd_stop() {
    if [[ -f "$HOME/mlflow.pid" ]] && kill -0 "$(cat "$HOME/mlflow.pid")" 2>/dev/null; then
        kill "$(cat "$HOME/mlflow.pid")"
        for _ in $(seq 20); do kill -0 "$(cat "$HOME/mlflow.pid")" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$HOME/mlflow.pid"
    if ours && [[ -f "$data/PG_VERSION" ]]; then
        "${owner[@]}" "$(pg_bin)/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    echo "mlflow server and its store stopped (data kept in $data)"
}

case "${1:-}" in
postgres) cmd_postgres ;;
mlflow) cmd_mlflow ;;
stop) cmd_stop ;;
*) die "usage: head_services.sh postgres|mlflow|stop" ;;
esac
