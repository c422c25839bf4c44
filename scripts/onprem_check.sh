#!/usr/bin/env bash
# deploy/onprem/cluster.yaml for real, on this one machine: a head and two worker "servers", each a loopback address
# (127.0.0.2-4) with its own sshd in its own PID and mount namespace (its own /proc, /tmp and home), then
#   ray up (scripts/cluster_up.sh) -> 3 nodes; a reduced `uipe run` through scripts/cluster_submit.sh;
#   one worker killed (its whole namespace) mid-unlearning and "rebooted"; the job must still finish with every
#   trial logged once in the head's MLflow on PostgreSQL; scripts/cluster_down.sh; nothing of ours left running.
# Prints one summary line. Needs root (namespaces, bind mounts), no Docker, no systemd; installs openssh-server if
# sshd is missing. Run it under `flock /tmp/uipe-ray.lock` where other Ray work shares the machine.
# Env: UIPE_ONPREM_WORK (/var/tmp/uipe-onprem-check, deleted at the end), UIPE_ONPREM_LOG (its log, kept),
# UIPE_ONPREM_PG_PORT (5433), UIPE_ONPREM_TIMEOUT_S (the job's deadline, 900).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${UIPE_ONPREM_WORK:-/var/tmp/uipe-onprem-check}"
LOG="${UIPE_ONPREM_LOG:-/var/tmp/uipe-onprem-check.log}"
PG_PORT="${UIPE_ONPREM_PG_PORT:-5433}"
JOB_TIMEOUT_S="${UIPE_ONPREM_TIMEOUT_S:-900}"
HEAD=127.0.0.2
WORKERS=(127.0.0.3 127.0.0.4)
NODES=("$HEAD" "${WORKERS[@]}")
VICTIM="${WORKERS[1]}"
CLUSTER=uipe-onprem-check
PY="$REPO/.venv/bin/python"
T0=$SECONDS

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
ns_pid() { cat "$WORK/nodes/$1/pid" 2>/dev/null || true; }

# --- refusals, one line each, before anything starts
[[ $(id -u) -eq 0 ]] || die "run as root: the check makes PID and mount namespaces"
command -v unshare >/dev/null || die "unshare not found (util-linux)"
[[ -x "$PY" && -x "$REPO/.venv/bin/ray" ]] || die "$REPO/.venv not found: create the repository's environment first"
if [[ ! -x /usr/sbin/sshd ]]; then
    say "installing openssh-server (the distribution's)"
    apt-get install -y -q openssh-server >/dev/null 2>&1 || die "cannot install openssh-server (apt-get install -y openssh-server)"
fi
command -v rsync >/dev/null || die "rsync not found: ray up copies the repository with it"
unshare --pid --fork --mount-proc true 2>/dev/null || die "cannot create PID namespaces here (unshare --pid --fork --mount-proc)"
port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
for ip in "${NODES[@]}"; do port_free "$ip" 22 || die "port $ip:22 is taken: a previous check still running? ($0 cleans up on exit)"; done
for p in 6380 8265 5000 "$PG_PORT"; do port_free "$HEAD" "$p" || die "port $HEAD:$p is taken"; done
# The GCS listens on every interface: its port must be free on 127.0.0.1 too.
port_free 127.0.0.1 6380 || die "port 6380 (the GCS's) is taken"
PG_BIN="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
[[ -x "$PG_BIN/initdb" ]] || die "PostgreSQL's server programs not found (apt-get install postgresql)"

# --- clean up on every exit path
SHELL_FILES=(/root/.bashrc /root/.profile /root/.pgpass /root/.ray/auth_token)
sums() { for f in "${SHELL_FILES[@]}"; do [[ -f "$f" ]] && sha256sum "$f" || echo "absent $f"; done; }
BEFORE="$(sums)"
kill_node() {  # the namespace's PID 1 (a bash holding sshd): SIGKILL to it kills everything inside
    local pid
    pid="$(ns_pid "$1")"
    [[ -n "$pid" ]] && grep -q "$WORK/nodes/$1/" "/proc/$pid/cmdline" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -f "$WORK/nodes/$1/pid"
}
cleanup() {
    local rc=$?
    for ip in "${NODES[@]}"; do kill_node "$ip" || true; done
    local ctl
    ctl="/tmp/ray_ssh_$(printf root | sha256sum | cut -c1-10)/$(printf %s "$CLUSTER" | sha256sum | cut -c1-10)"
    sleep 1  # the launcher's ssh masters (ControlPersist 10s) lose their servers and exit
    rm -rf "$ctl" "$WORK"
    [[ $rc -eq 0 ]] || say "failed (exit $rc); the log: $LOG"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the machines
say "preparing $WORK (log: $LOG)"
: > "$LOG"
rm -rf "$WORK"
mkdir -p "$WORK/client/.ssh" "$WORK/shared" "$WORK/client/tmp"
chmod 755 "$WORK"
ssh-keygen -q -t ed25519 -N '' -C uipe-onprem-check -f "$WORK/client/.ssh/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -C uipe-onprem-check -f "$WORK/hostkey"
mkdir -p /run/sshd
# Each server's venv sees the repository's packages through a .pth file, so setup's pip installs find torch and
# ray installed (a lab's servers would download them once); uipe itself is installed from the synced copy.
base_prefix="$("$PY" -c 'import sys; print(sys.base_prefix)')"
base_exe="$("$PY" -c 'import sys; print(sys._base_executable)')"
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
start_node() {  # $1 address; a fresh /tmp each time (a reboot), the same home (the disk)
    local ip=$1 d="$WORK/nodes/$1" mounts=""
    mkdir -p "$d/home/.ssh" "$d/tmp" && chmod 700 "$d/home" && chmod 1777 "$d/tmp" && rm -rf "${d:?}/tmp/"*
    if [[ ! -f "$d/home/.profile" ]]; then
        cp /etc/skel/.bashrc /etc/skel/.profile "$d/home/"
        cp "$WORK/client/.ssh/id_ed25519.pub" "$d/home/.ssh/authorized_keys"
    fi
    if [[ "$base_prefix" == /root/* ]]; then  # the interpreter lives in the home each node hides: bring it back
        mkdir -p "$d/home/${base_prefix#/root/}"
        mounts="mount --bind $base_prefix $d/home/${base_prefix#/root/} && "
    fi
    cat > "$d/sshd_config" <<EOF
ListenAddress $ip:22
HostKey $WORK/hostkey
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxSessions 64
MaxStartups 64
Subsystem sftp internal-sftp
EOF
    unshare --pid --fork --mount-proc bash -c "${mounts}mount --rbind $d/home /root && mount --bind $d/tmp /tmp &&
        /usr/sbin/sshd -D -f $d/sshd_config -E $d/sshd.log & wait" >> "$LOG" 2>&1 < /dev/null &
    local outer=$! pid=""
    for _ in $(seq 50); do
        pid="$(pgrep -P "$outer" || true)"
        [[ -n "$pid" ]] && ! port_free "$ip" 22 && break
        sleep 0.2
    done
    port_free "$ip" 22 && die "sshd did not start on $ip:22: see $d/sshd.log"
    echo "$pid" > "$d/pid"
}
for ip in "${NODES[@]}"; do
    start_node "$ip"
    ssh -i "$WORK/client/.ssh/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR "root@$ip" "$base_exe -m venv ~/uipe-venv && echo $site > ~/uipe-venv/lib/python3.11/site-packages/uipe-base.pth" ||
        die "cannot log in to $ip over SSH"
    for tool in ray mlflow; do  # their commands, which pip does not write for packages it finds installed
        sed "1s|.*|#!/root/uipe-venv/bin/python|" "$REPO/.venv/bin/$tool" > "$WORK/nodes/$ip/home/uipe-venv/bin/$tool"
        chmod 755 "$WORK/nodes/$ip/home/uipe-venv/bin/$tool"
    done
done

# --- the cluster file: deploy/onprem/cluster.yaml with this machine's addresses, paths and sizes
export HOME="$WORK/client" RAY_AUTH_MODE=token RAY_TMPDIR="$WORK/client/tmp" PATH="$REPO/.venv/bin:$PATH"
export UIPE_CLUSTER_YAML="$WORK/cluster.yaml" UIPE_SHARED="$WORK/shared" UIPE_UP_TIMEOUT_S=420
"$PY" - "$REPO/deploy/onprem/cluster.yaml" "$UIPE_CLUSTER_YAML" "$HEAD" "${WORKERS[*]}" "$WORK" "$PG_PORT" "$CLUSTER" <<'EOF'
import sys, yaml
src, dst, head, workers, work, pg_port, name = sys.argv[1:]
c = yaml.safe_load(open(src))
c["cluster_name"] = name
c["provider"].update(head_ip=head, worker_ips=workers.split())
c["auth"] = {"ssh_user": "root", "ssh_private_key": f"{work}/client/.ssh/id_ed25519"}
def fix(cmd, extra=""):
    # 127.0.0.1 is every node's (and other users') loopback here: the head's services use the head's own address.
    cmd = cmd.replace("/mnt/uipe", f"{work}/shared").replace("UIPE_SERVICE_HOST=127.0.0.1", f"UIPE_SERVICE_HOST={head}")
    cmd = cmd.replace("UIPE_PG_PORT=5433", f"UIPE_PG_PORT={pg_port} UIPE_PG_DATA={work}/pg")
    cmd = cmd.replace("--dashboard-host=127.0.0.1", f"--dashboard-host={head}")
    return cmd + extra if "ray start" in cmd else cmd
# Small nodes on a 2-core machine: one CPU per worker spreads a 2-worker fit over both; the head runs drivers only.
store = " --object-store-memory=300000000"
for key, extra in [("setup_commands", ""), ("head_setup_commands", ""),
                   ("head_start_ray_commands", " --num-cpus=0" + store),
                   ("worker_start_ray_commands", " --num-cpus=1" + store)]:
    c[key] = [fix(x, extra) for x in c[key]]
yaml.safe_dump(c, open(dst, "w"), sort_keys=False, width=1000)
EOF

lap() { echo $((SECONDS - $1)); }
t=$SECONDS
say "ray up: scripts/cluster_up.sh 2"
"$REPO/scripts/cluster_up.sh" 2 >> "$LOG" 2>&1 || die "cluster_up.sh failed: see $LOG"
T_UP=$(lap $t)
say "up in ${T_UP}s"

# --- the job: the tiny preset, reduced (one method, few epochs and trials, the gate relaxed)
RUN="$WORK/shared/runs/tiny"
OVERRIDES=(--set "tracking.uri=http://$HEAD:5000" --set "train.storage_path=$WORK/shared/ray" --set train.max_failures=3
    --set prepare.epochs=6 --set prepare.min_rouge=0 --set prepare.max_utility_gap=null --set prepare.gate_items=20
    --set "unlearn.methods=[npo]" --set unlearn.epochs=6 --set search.num_samples=6 --set eval.max_new_tokens=8)
submit() { "$REPO/scripts/cluster_submit.sh" uipe/presets/tiny.yaml "${OVERRIDES[@]}" 2>> "$LOG"; }
job_state() {
    local out
    out="$(ray job status --address "http://$HEAD:8265" "$1" 2>&1 || true)"
    case "$out" in *"' succeeded"*) echo SUCCEEDED ;; *"' failed"*) echo FAILED ;; *"was stopped"*) echo STOPPED ;; *) echo RUNNING ;; esac
}
t=$SECONDS
JOB="$(submit)" || die "cluster_submit.sh failed: see $LOG"
say "submitted $JOB; waiting for unlearning's first epoch to kill worker $VICTIM"
FAULT="not injected"
RESUBMITTED=no
deadline=$((SECONDS + JOB_TIMEOUT_S))
# One loop for the fault and the job: a job that fails before unlearning's first epoch (and is resubmitted) still
# gets its worker killed, and a check whose fault never fired fails instead of passing untested.
while :; do
    if [[ $FAULT == "not injected" && -d "$RUN/unlearn/npo/epoch_01" && ! -f "$RUN/unlearn/npo/manifest.json" ]]; then
        kill_node "$VICTIM"
        say "killed worker $VICTIM (its namespace) after unlearning epoch 1; rebooting it in 5 s"
        sleep 5
        start_node "$VICTIM"
        FAULT="worker $VICTIM killed after unlearning epoch 1"
    fi
    state="$(job_state "$JOB")"
    case "$state" in
    SUCCEEDED) break ;;
    FAILED | STOPPED)
        ray job logs --address "http://$HEAD:8265" "$JOB" > "$WORK/job.log" 2>&1 || true
        cat "$WORK/job.log" >> "$LOG"
        [[ $RESUBMITTED == no ]] || die "the resubmitted job $JOB ended $state, so the fault lost work: $(grep -m1 'uipe: error' "$WORK/job.log" | cut -c1-300)"
        say "job $JOB ended $state ($(grep -m1 'uipe: error' "$WORK/job.log" | cut -c1-200)): resubmitting the same command (finished stages are skipped)"
        RESUBMITTED=yes
        JOB="$(submit)" || die "cluster_submit.sh failed: see $LOG"
        ;;
    esac
    ((SECONDS < deadline)) || die "job $JOB not finished after ${JOB_TIMEOUT_S}s: see $LOG"
    sleep 0.5
done
[[ $FAULT != "not injected" ]] || die "job $JOB finished before unlearning's first epoch could be interrupted: no fault was injected"
T_JOB=$(lap $t)
say "job $JOB succeeded in ${T_JOB}s (resubmitted: $RESUBMITTED)"
ray job logs --address "http://$HEAD:8265" "$JOB" >> "$LOG" 2>&1 || true

# --- proof: where the work ran (Ray's state API), what MLflow holds (the head's PostgreSQL)
PLACEMENT="$("$PY" - "$HEAD" <<'EOF'
import json, subprocess, sys, collections
addr = ["--address", f"http://{sys.argv[1]}:8265"]
def ls(kind):
    out = subprocess.run(["ray", "list", kind, *addr, "--detail", "--format", "json", "--limit", "10000"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)
ips = {n["node_id"]: n["node_ip"] for n in ls("nodes")}
where = collections.defaultdict(set)
for a in ls("actors"):
    where[a["class_name"]].add(ips.get(a.get("node_id"), "?"))
print("; ".join(f"{k} on {','.join(sorted(v))}" for k, v in sorted(where.items())))
EOF
)" || PLACEMENT="(ray list failed)"
echo "placement: $PLACEMENT" >> "$LOG"
# What Ray Train did about the lost worker, from the run's own log (Ray's output goes there).
RECOVERY="$(grep -hoE "(\[FailurePolicy\] [A-Z]+|Error count: [0-9]+|ActorDiedError)" "$RUN"/logs/*.log |
    sort | uniq -c | tr -s ' ' | tr '\n' ';' || true)"
echo "recovery: ${RECOVERY:-nothing logged}" >> "$LOG"
cat "$RUN"/logs/*.log >> "$LOG" 2>/dev/null || true
psql_mlflow() { runuser -u postgres -- "$PG_BIN/psql" -h "$WORK/pg" -p "$PG_PORT" -d mlflow -tAq -c "$1"; }
TRIALS="$(psql_mlflow "SELECT count(*) || '/' || count(DISTINCT value) FROM tags WHERE key = 'uipe.trial_id'")"
RUNS="$(psql_mlflow "SELECT count(*) FROM runs")"
[[ "${TRIALS%/*}" -ge 6 && "${TRIALS%/*}" == "${TRIALS#*/}" ]] ||
    die "MLflow holds $TRIALS trial runs/distinct trials: lost or logged twice"
for ip in "${WORKERS[@]}"; do
    grep -q "TrainWorker[^;]*$ip" <<< "$PLACEMENT" || die "no training worker ran on $ip: $PLACEMENT"
done

# --- tear down, then look for anything left
t=$SECONDS
"$REPO/scripts/cluster_down.sh" >> "$LOG" 2>&1 || die "cluster_down.sh failed: see $LOG"
T_DOWN=$(lap $t)
LEFT=""
for ip in "${NODES[@]}"; do
    ns="$(readlink "/proc/$(ns_pid "$ip")/ns/pid")"
    # Inside a node only its init (bash) and sshd may remain; anything else is what cluster_down.sh missed.
    others="$(ps -e -o pid=,comm= | while read -r p c; do
        if [[ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" == "$ns" && $c != sshd && $c != bash ]]; then echo "$c"; fi
    done | sort -u | tr '\n' ' ')"
    [[ -z "$others" ]] || LEFT+="$ip: $others"
done
for ip in "${NODES[@]}"; do kill_node "$ip"; done
sleep 1
for ip in "${NODES[@]}"; do port_free "$ip" 22 || LEFT+="sshd on $ip "; done
port_free "$HEAD" "$PG_PORT" || LEFT+="PostgreSQL on $HEAD:$PG_PORT "
[[ "$(sums)" == "$BEFORE" ]] || LEFT+="root's shell files changed "
[[ -z "$LEFT" ]] || die "left behind after cluster_down.sh: $LEFT"
echo "placement: $PLACEMENT" >&2
echo "recovery: ${RECOVERY:-nothing logged}" >&2
printf 'onprem check passed: up %ss (3 nodes), job %ss (%s, resubmitted: %s; %s MLflow runs, %s trials logged once), down %ss, nothing left, total %ss\n' \
    "$T_UP" "$T_JOB" "$FAULT" "$RESUBMITTED" "$RUNS" "${TRIALS%/*}" "$T_DOWN" "$((SECONDS - T0))"
