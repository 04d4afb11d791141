# shellcheck shell=bash
# Shared helpers for the scripts that own local test infrastructure
# (kafka.sh, prometheus.sh, alertmanager.sh). Source it; do not execute it.
#
# Layout:
#   cache: ${SRE_CACHE_DIR:-$HOME/.cache/sre-agent}   downloads/builds, shared by clones
#   state: ${SRE_STATE_DIR:-<repo>/.state}/<service>  data, logs, pid file, generated configs

if [[ -n "${_SRE_LIB_LOADED:-}" ]]; then
    return 0
fi
_SRE_LIB_LOADED=1

SRE_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRE_CACHE_DIR="${SRE_CACHE_DIR:-${HOME:-/root}/.cache/sre-agent}"
# Canonical, so a service's marker path is spelled the same by start (which
# spawns with it) and by stop/status (which match it as a whole argument).
SRE_STATE_DIR="$(realpath -m -- "${SRE_STATE_DIR:-$SRE_REPO_ROOT/.state}")"
SRE_BIND_HOST=127.0.0.1

SRE_KAFKA_PORT="${SRE_KAFKA_PORT:-19092}"
SRE_KAFKA_CONTROLLER_PORT="${SRE_KAFKA_CONTROLLER_PORT:-19093}"
SRE_PROMETHEUS_PORT="${SRE_PROMETHEUS_PORT:-19090}"
SRE_ALERTMANAGER_PORT="${SRE_ALERTMANAGER_PORT:-19094}"

log() {
    printf '[%s] %s\n' "${SRE_SERVICE:-sre}" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# Milliseconds since the epoch (for timings).
now_ms() {
    date +%s%3N
}

# service_dir NAME -> absolute state directory of a service (created).
service_dir() {
    local dir="$SRE_STATE_DIR/$1"
    mkdir -p "$dir"
    printf '%s\n' "$dir"
}

# read_pid PIDFILE MARKER -> prints the pid if the file holds one whose process
# is alive and was started with MARKER (the instance's config file, under its
# own state dir) as a whole argument or a flag's value. A substring match took
# a recycled pid of another instance for ours when its state dir merely
# contained ours (/x$SRE_STATE_DIR/...), and stop then killed it.
read_pid() {
    local pidfile="$1" marker="$2" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(tr -cd '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    cmdline_has_path "$pid" "$marker" || return 1
    printf '%s\n' "$pid"
}

# cmdline_has_path PID PATH -> success if an argument of PID is PATH or ends in =PATH.
cmdline_has_path() {
    local arg args=()
    mapfile -d "" -t args 2>/dev/null <"/proc/$1/cmdline" || return 1
    for arg in "${args[@]}"; do
        [[ $arg == "$2" || $arg == *"=$2" ]] && return 0
    done
    return 1
}

# port_open PORT -> success if something accepts TCP connections on loopback:PORT.
port_open() {
    (exec 3<>"/dev/tcp/$SRE_BIND_HOST/$1") 2>/dev/null
}

# require_port_free PORT WHAT
require_port_free() {
    if port_open "$1"; then
        die "port $SRE_BIND_HOST:$1 ($2) is already in use by another process; pick another port (see the SRE_*_PORT variables)"
    fi
}

# exit_if_running NAME PIDFILE MARKER ADDR HEALTH_CMD... -> a start of a running,
# healthy instance is a no-op success (exit 0); running but unhealthy dies naming
# it (a restart here would pull it from under its users); returns if not running.
exit_if_running() {
    local name="$1" pidfile="$2" marker="$3" addr="$4" pid
    shift 4
    pid="$(read_pid "$pidfile" "$marker")" || return 0
    if "$@"; then
        log "$name already running and healthy (pid $pid) on $addr; nothing to start"
        exit 0
    fi
    die "$name is running (pid $pid) on $addr but not healthy; see its log in $(dirname "$pidfile"), or run scripts/$name.sh stop"
}

# http_ok URL -> success if URL answers 2xx.
http_ok() {
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
}

# locked NAME ACTION CMD... -> runs CMD (scripts/NAME.sh ACTION) holding the
# service's lock, $SRE_STATE_DIR/NAME/lock: shared for status, exclusive for
# the rest. Without it a stop run while another invocation's start was still
# spawning read the pid before the child had exec'd (its command line the
# parent script's, or empty), judged it not ours, removed the pid file and
# left the service running untracked; a status then said "not running".
# Waits SRE_LOCK_TIMEOUT seconds (default 600: a cold start fetches jars
# first), then dies naming the holder (a status exits 4, LSB's "unknown",
# which callers must not take for "not running"). A stop, status or reset with no
# service dir has nothing to guard, and creates none.
locked() {
    local name="$1" action="$2" dir lockfile mode=exclusive holder msg
    local timeout="${SRE_LOCK_TIMEOUT:-600}"
    shift 2
    dir="$SRE_STATE_DIR/$name"
    lockfile="$dir/lock"
    if [[ ! -d $dir && $action =~ ^(stop|status|reset)$ ]]; then
        "$@"
        return
    fi
    [[ $action == status ]] && mode=shared
    mkdir -p "$dir"
    # >>: opening must not truncate the note of the holder we wait for
    exec 8>>"$lockfile"
    if ! flock "--$mode" -w "$timeout" 8; then
        holder="$(cat "$lockfile" 2>/dev/null)"
        msg="another scripts/$name.sh (${holder:-holder unknown}) still holds $lockfile after ${timeout}s; retry once it has finished (SRE_LOCK_TIMEOUT sets the wait)"
        if [[ $action == status ]]; then
            # LSB's "status unknown": 1 reads as "dead, pid file left", and
            # callers taking any non-zero for "not running" went on to a start.
            log "$name status unknown: $msg"
            exit 4
        fi
        die "$msg"
    fi
    if [[ $mode == exclusive ]]; then
        printf 'pid %s: %s\n' "$$" "$action" >"$lockfile"
    fi
    "$@"
}

# wipe_service_dir DIR -> deletes everything in DIR but its lock, which the
# caller holds: a new lock file would let the next start run beside a caller
# still waiting on the old one.
wipe_service_dir() {
    [[ -d $1 ]] || return 0
    find "$1" -mindepth 1 -maxdepth 1 ! -name lock -exec rm -rf -- {} +
}

# spawn LOGFILE PIDFILE MARKER CMD... -> starts CMD detached (own session, no
# stdin), stdout/stderr appended to LOGFILE, pid written to PIDFILE. Returns
# once the child has exec'd (its command line shows MARKER) or exited, so that
# read_pid does not mistake the pre-exec fork for a dead service.
spawn() {
    local logfile="$1" pidfile="$2" marker="$3" pid i
    shift 3
    printf '\n===== %s starting: %s\n' "$(date -Is)" "$*" >>"$logfile"
    # 8>&-: the daemon must not inherit, and so hold for its lifetime, the
    # service lock (see locked); every later start and stop would time out.
    setsid nohup "$@" </dev/null >>"$logfile" 2>&1 8>&- &
    pid=$!
    printf '%s\n' "$pid" >"$pidfile"
    wait_exec "$pid" 5 read_pid "$pidfile" "$marker"
}

# wait_exec PID SECONDS CHECK... -> returns once CHECK (which knows the
# service by its exec'd image) succeeds or PID has died, or after SECONDS.
# Until the child's exec completes its /proc entry shows the parent shell or
# an empty command line, so a check made at once would call it dead.
wait_exec() {
    local pid="$1" i
    local tries=$(($2 * 20))
    shift 2
    for ((i = 0; i < tries; i++)); do
        "$@" >/dev/null && return 0
        pid_running "$pid" || return 0
        sleep 0.05
    done
}

# pid_running PID -> success while PID exists and is not a zombie (a child that
# died answers kill -0 until it is reaped).
pid_running() {
    [[ -e /proc/$1 ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# stop_service NAME PIDFILE MARKER [GRACE_SECONDS]
# TERM, wait up to GRACE seconds, then KILL. No-op success if not running.
stop_service() {
    local name="$1" pidfile="$2" marker="$3" grace="${4:-30}" pid i
    if ! pid="$(read_pid "$pidfile" "$marker")"; then
        rm -f "$pidfile"
        log "$name not running"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pidfile"
            log "$name stopped"
            return 0
        fi
        sleep 0.1
    done
    log "$name did not stop within ${grace}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$pidfile"
    log "$name killed"
}

# status_service NAME PIDFILE MARKER ADDR -> exit 0 if running, 3 if not (LSB;
# 4, unknown, comes from locked when another invocation keeps the lock).
status_service() {
    local name="$1" pidfile="$2" marker="$3" addr="$4" pid
    if pid="$(read_pid "$pidfile" "$marker")"; then
        printf '%s running (pid %s) on %s\n' "$name" "$pid" "$addr"
        return 0
    fi
    printf '%s not running\n' "$name"
    return 3
}

# fail_start NAME PIDFILE MARKER LOGFILE MESSAGE -> prints the log tail, stops
# whatever was started, exits non-zero.
fail_start() {
    local name="$1" pidfile="$2" marker="$3" logfile="$4" msg="$5"
    log "$msg"
    log "last 50 lines of $logfile:"
    tail -n 50 "$logfile" >&2 || true
    stop_service "$name" "$pidfile" "$marker" 10 || true
    exit 1
}

# still_running PIDFILE MARKER -> success while the service started from PIDFILE
# lives. A live pid whose command line does not show MARKER yet is between
# exec()s (under load /proc/PID/cmdline can read empty mid-exec): that is
# starting, not dead. A CI run once failed a healthy Prometheus on exactly that.
still_running() {
    local pidfile="$1" marker="$2" pid
    read_pid "$pidfile" "$marker" >/dev/null && return 0
    pid="$(tr -cd '0-9' <"$pidfile" 2>/dev/null)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    # A child that died but is not reaped yet still answers kill -0.
    [[ "$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ]]
}

# wait_http_ready NAME PIDFILE MARKER LOGFILE URL TIMEOUT_SECONDS
wait_http_ready() {
    local name="$1" pidfile="$2" marker="$3" logfile="$4" url="$5" timeout="$6" deadline
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if ! still_running "$pidfile" "$marker"; then
            fail_start "$name" "$pidfile" "$marker" "$logfile" "$name exited during startup"
        fi
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    fail_start "$name" "$pidfile" "$marker" "$logfile" "$name not ready at $url after ${timeout}s"
}

# need_cmd CMD HINT
need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found; run scripts/system-deps.sh ($2)"
}

# write_file FILE -> writes stdin to FILE atomically.
write_file() {
    local file="$1" tmp
    tmp="$(mktemp "$file.XXXXXX")"
    cat >"$tmp"
    mv -f "$tmp" "$file"
}
