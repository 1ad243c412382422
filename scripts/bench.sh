#!/usr/bin/env bash
# The benchmark: the same bank transfer four ways, side by side (Tandem
# through the three-node cluster, bare 2PC, two local commits, one
# database), plus decisions alone through the log; see `tandem bench`.
#
#   scripts/bench.sh [--duration SECONDS] [--concurrency N,...] [--json FILE]
#                    [--modes M,...] [--empty] [--svg FILE] [--transactions N]
#                    [--retention-s S] [--forget-interval-s S]
#                    [--clients-per-connection N]
#
# Sets everything up on free ports: two throwaway PostgreSQL servers with
# fsync on (bench_a, bench_b), the cluster with them as participants. Each
# mode runs DURATION seconds (default 10) at each client count (default
# 1,16,64,256). Prints a table; the results go to FILE as JSON (default
# .tandem/bench/results.json) and the latency/throughput chart to
# .tandem/bench/chart.svg. --transactions N runs each point until N
# transfers are done instead (the long run; from 200,000 up it compares the
# first 100,000's throughput with the last's). --retention-s S keeps
# completed records S seconds (at least 130; the cluster's own files say a
# day), so that a long run shows disk use level off once records expire;
# the longest transaction timeout becomes S - 120 seconds, and the leader
# forgets expired records every 10 s (--forget-interval-s; the cluster's
# files say 60).
# Clients through the cluster share connections, N to one connection per
# node (default 16, as one service's callers would); 1 gives each its own.
# --empty measures the decision log alone (--modes decisions_only):
# decisions through the cluster with no participant work.
# Every 5 s each node's resident memory and data size go to
# .tandem/bench/resources.csv; the end prints their peaks.
#
# The cluster and the client are the release build (`cargo build
# --release`); TANDEM_PROFILE=debug runs the debug build instead.
set -euo pipefail
export TANDEM_PROFILE="${TANDEM_PROFILE:-release}"
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

DURATION=10 CONCURRENCY=1,16,64,256 JSON="" SVG="" MODES=tandem,bare_2pc,non_atomic,single_db,decisions_only
TRANSACTIONS="" RETENTION="" FORGET_INTERVAL=10 FORGET_GIVEN="" PER_CONNECTION=16 EMPTY="" MODES_GIVEN=""
while (($#)); do
    case "$1" in
        --duration) DURATION=$2 ;;
        --concurrency) CONCURRENCY=$2 ;;
        --json) JSON=$2 ;;
        --svg) SVG=$2 ;;
        --modes) MODES=$2 MODES_GIVEN=1 ;;
        --transactions) TRANSACTIONS=$2 ;;
        --retention-s) RETENTION=$2 ;;
        --forget-interval-s) FORGET_INTERVAL=$2 FORGET_GIVEN=1 ;;
        --clients-per-connection) PER_CONNECTION=$2 ;;
        --empty) EMPTY=1; shift; continue ;;
        *) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
    shift 2
done
if [ -n "$EMPTY" ]; then
    [ -z "$MODES_GIVEN" ] || { echo "--empty is --modes decisions_only; give one or the other" >&2; exit 2; }
    MODES=decisions_only
fi
if [ -n "$FORGET_GIVEN" ] && { [ -z "$RETENTION" ] || ! [[ $FORGET_INTERVAL =~ ^[1-9][0-9]*$ ]]; }; then
    echo "--forget-interval-s takes whole seconds above 0, with --retention-s" >&2
    exit 2
fi
export TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem/bench}"
JSON=${JSON:-$TANDEM_HOME/results.json} SVG=${SVG:-$TANDEM_HOME/chart.svg}
pick_port_base
TANDEM_NODES=$(local_nodes)
export TANDEM_NODES
cluster() { "$REPO_ROOT/scripts/cluster.sh" "$@"; }

build_tandem
source "$REPO_ROOT/scripts/pg.sh"
pg_init
finish() {
    cluster down >/dev/null 2>&1 || true
    pg_stop_all
}
trap finish EXIT

# Enough connections for 256 clients on each side, and as many prepared
# transactions; fsync stays on (the default).
export PG_EXTRA_OPTS="-c max_connections=700 -c max_prepared_transactions=600 -c shared_buffers=256MB"
pg_start bench_a
pg_start bench_b
for db in bench_a bench_b; do
    printf '[[participants]]\nname = "%s"\nkind = "postgres"\nurl = "postgres://postgres@127.0.0.1:%s/%s"\npool_size = 256\n\n' \
        "$db" "${PORT[$db]}" "$db"
done >"$PGDIR/participants.toml"
if [ -n "$RETENTION" ]; then
    if ((RETENTION < 130)); then
        echo "--retention-s must be at least 130 (the longest timeout, 10 s or more, plus 120 s)" >&2
        exit 2
    fi
    # The node files with a shorter retention, and the longest transaction
    # timeout it allows (retention.completed_retention_s >= timeout + 120 s),
    # beside the PostgreSQL servers: `cluster wipe` empties TANDEM_HOME.
    timeout_max_ms=$(((RETENTION - 120) * 1000))
    export TANDEM_CONFIG_DIR="$PGDIR/config"
    mkdir -p "$TANDEM_CONFIG_DIR"
    for n in 1 2 3; do
        {
            sed -e "s/^completed_retention_s = .*/completed_retention_s = $RETENTION/" \
                -e "s/^forget_interval_s = .*/forget_interval_s = $FORGET_INTERVAL/" "$REPO_ROOT/cluster/node$n.toml"
            printf '\n[coordinator]\ntimeout_max_ms = %s\ntimeout_default_ms = %s\n' \
                "$timeout_max_ms" $((timeout_max_ms < 30000 ? timeout_max_ms : 30000))
        } >"$TANDEM_CONFIG_DIR/node$n.toml"
    done
fi
cluster wipe >/dev/null
cluster up --participants "$PGDIR/participants.toml" >/dev/null
mkdir -p "$(dirname "$JSON")" "$(dirname "$SVG")"

# Resident memory (kB) and data size (kB) of each node every 5 s.
RESOURCES="$TANDEM_HOME/resources.csv"
echo "seconds,node,rss_kb,data_kb" >"$RESOURCES"
sample_resources() {
    local start=$SECONDS n pid
    while :; do
        for n in 1 2 3; do
            pid=$(cat "$TANDEM_HOME/run/node$n.pid" 2>/dev/null) || continue
            echo "$((SECONDS - start)),$n,$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null)," \
                "$(du -sk "$TANDEM_HOME/data/node$n" 2>/dev/null | cut -f1)" | tr -d ' '
        done >>"$RESOURCES"
        sleep 5
    done
}
sample_resources &
SAMPLER=$!
finish() {
    kill "$SAMPLER" 2>/dev/null || true
    cluster down >/dev/null 2>&1 || true
    pg_stop_all
}

length="${DURATION}s"
run=(--duration-s "$DURATION")
if [ -n "$TRANSACTIONS" ]; then
    length="$TRANSACTIONS transfers"
    run=(--transactions "$TRANSACTIONS")
fi
log "benchmark: $length per mode and client count ($CONCURRENCY clients; $MODES)"
RUST_LOG=${RUST_LOG:-warn} "$TANDEM_BIN" bench --participants "$PGDIR/participants.toml" --modes "$MODES" \
    --concurrency "$CONCURRENCY" "${run[@]}" --clients-per-connection "$PER_CONNECTION" --json "$JSON" --svg "$SVG"
log "results: $JSON; chart: $SVG"
awk -F, 'NR > 1 && $3 != "" {
        if ($3 > rss[$2]) rss[$2] = $3
        if ($4 > disk[$2]) disk[$2] = $4
        last[$2] = $4
    }
    END {
        for (n = 1; n <= 3; n++)
            printf "node %d: peak resident %.1f MB; data peak %.1f MB, at the end %.1f MB\n",
                n, rss[n] / 1024, disk[n] / 1024, last[n] / 1024
    }' "$RESOURCES" >&2
log "memory and data size every 5 s: $RESOURCES"
