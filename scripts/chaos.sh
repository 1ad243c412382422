#!/usr/bin/env bash
# The chaos run: the bank workload (`tandem workload bank`) through a local
# three-node cluster with two throwaway PostgreSQL participants, while faults
# hit it on a schedule; then, once they have healed, the checker
# (`tandem workload check`) proves the invariants: atomicity, conservation,
# no lost acknowledgement, identical decisions on every node, no orphan
# prepared branch; and reports liveness figures. Exits non-zero on any
# violation.
#
#   scripts/chaos.sh --duration SECONDS [--seed N] [--report FILE]
#                    [--kill-every S] [--pause-every S] [--participant-restart-every S]
#                    [--kill-all-every S] [--participant-net-every S]
#                    [--partition-every S] [--workers N]
#
# Faults (0 turns one off): kill -9 the leader and restart it (default every
# 30 s); SIGSTOP the leader for 3 s, longer than the election timeout, then
# SIGCONT (every 60 s); restart a participant with pg_ctl -m immediate
# (every 300 s); delay (300 ms), stall or reset the connections between the
# cluster and one participant for 4 s, through a TCP proxy (every 90 s); cut
# one node (the leader two times in three) off from the other two for 5 s
# while it still reaches the participants and the clients (every 60 s; each
# node runs in its own network namespace, scripts/netns.sh, which needs
# root); kill all three nodes and restart them (off). No fault starts
# in the last 15 s, so the run ends healed. The seed fixes the workload and
# the choice of faults. The report (JSON) goes to FILE (default
# .tandem/chaos/report.json); fault events and outcomes stay in .tandem/chaos.
# The nodes listen on three free ports chosen at start (or TANDEM_PORT_BASE+1..3).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

DURATION=60 SEED=1 REPORT="" KILL_EVERY=30 PAUSE_EVERY=60 PG_EVERY=300 KILL_ALL_EVERY=0 NET_EVERY=90 PARTITION_EVERY=60 WORKERS=8
while (($#)); do
    case "$1" in
        --duration) DURATION=$2 ;;
        --seed) SEED=$2 ;;
        --report) REPORT=$2 ;;
        --kill-every) KILL_EVERY=$2 ;;
        --pause-every) PAUSE_EVERY=$2 ;;
        --participant-restart-every) PG_EVERY=$2 ;;
        --kill-all-every) KILL_ALL_EVERY=$2 ;;
        --participant-net-every) NET_EVERY=$2 ;;
        --partition-every) PARTITION_EVERY=$2 ;;
        --workers) WORKERS=$2 ;;
        *) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
    shift 2
done

export TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem/chaos}"
# Ports chosen now (three free in a row), unless TANDEM_PORT_BASE is set.
pick_port_base
source "$REPO_ROOT/scripts/netns.sh"
if ((PARTITION_EVERY > 0)); then
    if ! netns_available; then
        echo "the partition fault runs each node in its own network namespace, which needs" >&2
        echo "root and iproute2; run as root, or turn it off with --partition-every 0" >&2
        exit 2
    fi
    netns_up
    trap netns_down EXIT
    export TANDEM_NETNS=$NETNS_TAG TANDEM_NETNS_NET=$NETNS_NET
    node_host() { netns_node_addr "$1"; }
    # What the nodes dial to reach the participants' proxies.
    PROXY_HOST=$(netns_host_addr)
else
    node_host() { echo 127.0.0.1; }
    PROXY_HOST=127.0.0.1
fi
export TANDEM_NODES="$(node_host 1):$((TANDEM_PORT_BASE + 1)),$(node_host 2):$((TANDEM_PORT_BASE + 2)),$(node_host 3):$((TANDEM_PORT_BASE + 3))"
REPORT=${REPORT:-$TANDEM_HOME/report.json}
OUT="$TANDEM_HOME/workload" EVENTS="$TANDEM_HOME/events.txt"
cluster() { "$REPO_ROOT/scripts/cluster.sh" "$@"; }
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
event() { echo "$(now_ms) $*" >>"$EVENTS"; log "fault: $*"; }
in_doubt() {
    local db
    for db in accounts_a accounts_b; do
        pg_sql "$db" postgres "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'tdm\_%'" 2>/dev/null || true
    done | sort
}
# After a fault heals: how long until every branch that was prepared then is
# settled (committed or rolled back), as an event for the checker.
resolved() {
    local t0 gids left n
    t0=$(now_ms)
    gids=$(in_doubt)
    for _ in $(seq 1 600); do
        left=$(comm -12 <(echo "$gids") <(in_doubt) | grep -c . || true)
        ((left == 0)) && break
        sleep 0.1
    done
    n=$(echo "$gids" | grep -c . || true)
    # Only a fault that left something in doubt has a resolution time.
    ((n == 0)) || echo "$(now_ms) in-doubt-resolved $(($(now_ms) - t0)) $n" >>"$EVENTS"
}

build_tandem
# Restarts during the run reuse this binary.
export TANDEM_NO_BUILD=1
source "$REPO_ROOT/scripts/pg.sh"
pg_init
workload_pid=""
proxy_pids=()
finish() {
    [ -z "$workload_pid" ] || kill "$workload_pid" 2>/dev/null || true
    ((${#proxy_pids[@]} == 0)) || kill "${proxy_pids[@]}" 2>/dev/null || true
    for n in 1 2 3; do
        f="$TANDEM_HOME/run/node$n.pid"
        [ -f "$f" ] && kill -CONT "$(cat "$f")" 2>/dev/null || true
    done
    cluster down >/dev/null 2>&1 || true
    pg_stop_all
    netns_down
}
trap finish EXIT

pg_start accounts_a
pg_start accounts_b
cluster wipe
mkdir -p "$TANDEM_HOME"
rm -rf "$OUT" "$EVENTS"
# The workload and the checker reach the databases directly; the cluster
# through a proxy per participant, which the network faults switch.
pg_participants "$TANDEM_HOME/participants.toml"
cp "$TANDEM_HOME/participants.toml" "$TANDEM_HOME/proxied.toml"
proxy_pids=()
for db in accounts_a accounts_b; do
    pport=$(pg_free_port)
    echo pass >"$TANDEM_HOME/proxy-$db"
    "$TANDEM_BIN" workload proxy --listen "$PROXY_HOST:$pport" --to "127.0.0.1:${PORT[$db]}" \
        --control "$TANDEM_HOME/proxy-$db" 2>>"$TANDEM_HOME/proxy-$db.log" &
    proxy_pids+=($!)
    sed -i "s|127.0.0.1:${PORT[$db]}/|$PROXY_HOST:$pport/|" "$TANDEM_HOME/proxied.toml"
done
cluster up --participants "$TANDEM_HOME/proxied.toml"

leader_id() {
    "$TANDEM_BIN" cluster status --wait-leader 30 --json 2>/dev/null | grep '"role":"leader"' |
        sed 's/^{"id":\([0-9]*\),.*/\1/' | head -n1
}
node_pid() { cat "$TANDEM_HOME/run/node$1.pid"; }

log "bank workload for ${DURATION}s (seed $SEED, $WORKERS workers)"
"$TANDEM_BIN" workload bank --participants "$TANDEM_HOME/participants.toml" --out "$OUT" --reset \
    --duration-s "$DURATION" --seed "$SEED" --workers "$WORKERS" &
workload_pid=$!

RANDOM=$SEED
start=$(now_ms)
# Each fault is due every N seconds. One runs per turn: the one overdue the
# longest, so every kind happens however long the others take.
declare -A next
every() {
    case "$1" in
        kill_all) echo "$KILL_ALL_EVERY" ;; kill) echo "$KILL_EVERY" ;; pause) echo "$PAUSE_EVERY" ;;
        net) echo "$NET_EVERY" ;; pg) echo "$PG_EVERY" ;; partition) echo "$PARTITION_EVERY" ;;
    esac
}
FAULTS=(kill_all kill pause net pg partition)
for f in "${FAULTS[@]}"; do next[$f]=$(every "$f"); done
pick() { # sets $fault (not in a subshell: it advances next[])
    local f best=""
    for f in "${FAULTS[@]}"; do
        (($(every "$f") > 0 && t >= next[$f])) || continue
        if [ -z "$best" ] || ((next[$f] < next[$best])); then best=$f; fi
    done
    [ -n "$best" ] || return 1
    next[$best]=$((next[$best] + $(every "$best")))
    ((next[$best] > t)) || next[$best]=$((t + $(every "$best")))
    fault=$best
}
while kill -0 "$workload_pid" 2>/dev/null; do
    sleep 1
    t=$((($(now_ms) - start) / 1000))
    ((t < DURATION - 15)) || continue
    pick || continue
    if [ "$fault" = kill_all ]; then
        event kill-all
        for n in 1 2 3; do cluster kill "$n" >/dev/null; done
        sleep 2
        for n in 1 2 3; do cluster restart "$n" >/dev/null; done
        event heal-kill-all
        resolved
    elif [ "$fault" = kill ]; then
        leader=$(leader_id)
        [ -n "$leader" ] || continue
        event kill-leader "$leader"
        cluster kill "$leader" >/dev/null
        sleep 3
        cluster restart "$leader" >/dev/null
        event heal-kill-leader "$leader"
        resolved
    elif [ "$fault" = pause ]; then
        leader=$(leader_id)
        [ -n "$leader" ] || continue
        event pause-leader "$leader"
        kill -STOP "$(node_pid "$leader")"
        sleep 3
        kill -CONT "$(node_pid "$leader")"
        event heal-pause-leader "$leader"
        resolved
    elif [ "$fault" = partition ]; then
        leader=$(leader_id)
        [ -n "$leader" ] || continue
        # The leader two times in three (it goes on running, cut off), else
        # a follower.
        if ((RANDOM % 3)); then cut=$leader; else cut=$((leader % 3 + 1)); fi
        event partition-node "$cut"
        netns_cut "$cut"
        sleep 5
        netns_heal "$cut"
        event heal-partition "$cut"
        resolved
    elif [ "$fault" = net ]; then
        db=$( ((RANDOM % 2)) && echo accounts_a || echo accounts_b)
        mode=$(echo "delay 300|drop|reset" | cut -d'|' -f$((RANDOM % 3 + 1)))
        event "net-${mode%% *}" "$db"
        echo "$mode" >"$TANDEM_HOME/proxy-$db"
        sleep 4
        echo pass >"$TANDEM_HOME/proxy-$db"
        event heal-net "$db"
        resolved
    else
        db=$( ((RANDOM % 2)) && echo accounts_a || echo accounts_b)
        event restart-participant "$db"
        pg_restart "$db"
        event heal-restart-participant "$db"
        resolved
    fi
done
wait "$workload_pid"
workload_pid=""

log "checking the invariants"
rc=0
"$TANDEM_BIN" workload check --participants "$TANDEM_HOME/participants.toml" --out "$OUT" \
    --events "$EVENTS" --report "$REPORT" --cluster-id local || rc=$?
log "report: $REPORT"
exit "$rc"
