#!/usr/bin/env bash
# A local three-node Tandem cluster on loopback.
#
#   scripts/cluster.sh up [--participants FILE]
#                                  build, start nodes 1-3, initialise on first start, wait for a leader;
#                                  FILE lists [[participants]] (your own databases) for every node
#   scripts/cluster.sh down        stop every node (data is kept)
#   scripts/cluster.sh status      every node's role, term, leader, indexes, membership
#   scripts/cluster.sh kill N      kill -9 node N
#   scripts/cluster.sh restart N   stop node N (if running) and start it again
#   scripts/cluster.sh wipe        stop every node and delete all data and logs
#
# State (data, logs, pids) lives under $TANDEM_HOME, by default .tandem/ in
# the repository. Node N listens on 127.0.0.1:700N (cluster/nodeN.toml), or
# on TANDEM_PORT_BASE + N when that is set. With TANDEM_NETNS=tdmK and
# TANDEM_NETNS_NET=10.K (scripts/netns.sh), node N runs in the network
# namespace tdmK-N and listens on 10.K.N.2. TANDEM_CONFIG_DIR names another
# directory of nodeN.toml files (scripts/bench.sh --soak writes its own).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem}"
NODES=(1 2 3)
# Node N listens on 127.0.0.1:(TANDEM_PORT_BASE + N), 7001-7003 by default.
PORT_BASE="${TANDEM_PORT_BASE:-7000}"
CONFIG_DIR="${TANDEM_CONFIG_DIR:-$REPO_ROOT/cluster}"
NETNS="${TANDEM_NETNS:-}"
if [ -n "$NETNS" ]; then
    addr() { echo "$TANDEM_NETNS_NET.$1.2:$((PORT_BASE + $1))"; }
else
    addr() { echo "127.0.0.1:$((PORT_BASE + $1))"; }
fi
ADDRS="$(addr 1),$(addr 2),$(addr 3)"
MEMBERS="1=$(addr 1),2=$(addr 2),3=$(addr 3)"
export TANDEM_NODES="$ADDRS"

pid_file() { echo "$TANDEM_HOME/run/node$1.pid"; }
log_file() { echo "$TANDEM_HOME/logs/node$1.log"; }
data_dir() { echo "$TANDEM_HOME/data/node$1"; }

# True if node N's pid file names a live `tandem serve` (a stale pid may
# belong to another process by now).
running() {
    local f pid
    f="$(pid_file "$1")"
    [ -f "$f" ] || return 1
    pid="$(cat "$f")"
    kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "tandem serve"
}

start_node() {
    local n=$1
    if running "$n"; then
        log "node $n already running (pid $(cat "$(pid_file "$n")"))"
        return
    fi
    mkdir -p "$TANDEM_HOME/run" "$TANDEM_HOME/logs" "$(data_dir "$n")"
    # The participants file given to `up` applies to restarts too.
    local extra=() remembered="$TANDEM_HOME/participants.path"
    if [ -n "${PARTICIPANTS:-}" ]; then
        echo "$PARTICIPANTS" >"$remembered"
    fi
    if [ -f "$remembered" ]; then
        extra=(--participants "$(cat "$remembered")")
    fi
    # `ip netns exec` execs the binary: the pid is still the node's.
    local host=()
    [ -z "$NETNS" ] || host=(ip netns exec "$NETNS-$n")
    RUST_LOG="${RUST_LOG:-info,openraft=warn}" nohup "${host[@]}" "$TANDEM_BIN" serve \
        --config "$CONFIG_DIR/node$n.toml" --data-dir "$(data_dir "$n")" "${extra[@]}" \
        --listen "$(addr "$n")" --advertise "$(addr "$n")" \
        >>"$(log_file "$n")" 2>&1 &
    echo $! >"$(pid_file "$n")"
    log "node $n started (pid $!)"
}

wait_listening() {
    local n=$1
    for _ in $(seq 1 100); do
        if "$TANDEM_BIN" cluster status --nodes "$(addr "$n")" --json 2>/dev/null | grep -q "\"id\":$n,"; then
            return 0
        fi
        # Just started: its pid may still be the shell forked to exec it,
        # so ask only whether the process is there.
        if ! kill -0 "$(cat "$(pid_file "$n")")" 2>/dev/null; then
            echo "node $n exited; see $(log_file "$n")" >&2
            tail -n 20 "$(log_file "$n")" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "node $n is not answering on $(addr "$n"); see $(log_file "$n")" >&2
    exit 1
}

stop_node() {
    local n=$1 signal=${2:-TERM}
    if ! running "$n"; then
        rm -f "$(pid_file "$n")"
        return
    fi
    local pid
    pid="$(cat "$(pid_file "$n")")"
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$(pid_file "$n")"
    log "node $n stopped ($signal)"
}

up() {
    build_tandem
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in "${NODES[@]}"; do wait_listening "$n"; done
    if "$TANDEM_BIN" cluster status --json | grep -q '"initialized":true'; then
        log "cluster already initialised"
    else
        log "initialising the cluster: $MEMBERS"
        "$TANDEM_BIN" cluster init --node "$(addr 1)" --members "$MEMBERS"
    fi
    log "waiting for a leader"
    "$TANDEM_BIN" cluster status --wait-leader 60
    echo
    for n in "${NODES[@]}"; do
        echo "node $n: grpc $(addr "$n")  log $(log_file "$n")  data $(data_dir "$n")"
    done
    echo "state directory: $TANDEM_HOME"
    echo "try: $TANDEM_BIN cluster status"
}

need_node() {
    case "${1:-}" in
        1 | 2 | 3) ;;
        *) echo "usage: $0 $2 1|2|3" >&2; exit 2 ;;
    esac
}

case "${1:-}" in
    up)
        if [ "${2:-}" = "--participants" ]; then
            [ -f "${3:-}" ] || { echo "usage: $0 up [--participants FILE]" >&2; exit 2; }
            PARTICIPANTS="$(cd "$(dirname "$3")" && pwd)/$(basename "$3")"
        fi
        up
        ;;
    down) for n in "${NODES[@]}"; do stop_node "$n"; done ;;
    status)
        [ -x "$TANDEM_BIN" ] || build_tandem
        "$TANDEM_BIN" cluster status
        ;;
    kill) need_node "${2:-}" kill; stop_node "$2" KILL ;;
    restart)
        need_node "${2:-}" restart
        # TANDEM_NO_BUILD=1 restarts the binary as it is (the chaos run).
        [ "${TANDEM_NO_BUILD:-}" = 1 ] || build_tandem
        stop_node "$2"
        start_node "$2"
        wait_listening "$2"
        ;;
    wipe)
        for n in "${NODES[@]}"; do stop_node "$n"; done
        rm -rf "$TANDEM_HOME"
        log "removed $TANDEM_HOME"
        ;;
    *)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
