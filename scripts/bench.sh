#!/usr/bin/env bash
# The benchmark: the same bank transfer four ways, side by side (Tandem
# through the three-node cluster, bare 2PC, two local commits, one
# database), plus decisions alone through the log; see `tandem bench`.
#
#   scripts/bench.sh [--duration SECONDS] [--concurrency N,...] [--json FILE]
#                    [--modes M,...] [--svg FILE]
#
# Sets everything up on free ports: two throwaway PostgreSQL servers with
# fsync on (bench_a, bench_b), the cluster with them as participants. Each
# mode runs DURATION seconds (default 10) at each client count (default
# 1,16,64,256). Prints a table; the results go to FILE as JSON (default
# .tandem/bench/results.json) and the latency/throughput chart to
# .tandem/bench/chart.svg.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

DURATION=10 CONCURRENCY=1,16,64,256 JSON="" SVG="" MODES=tandem,bare_2pc,non_atomic,single_db,decisions_only
while (($#)); do
    case "$1" in
        --duration) DURATION=$2 ;;
        --concurrency) CONCURRENCY=$2 ;;
        --json) JSON=$2 ;;
        --svg) SVG=$2 ;;
        --modes) MODES=$2 ;;
        *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
    shift 2
done
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
cluster wipe >/dev/null
cluster up --participants "$PGDIR/participants.toml" >/dev/null
mkdir -p "$(dirname "$JSON")" "$(dirname "$SVG")"
log "benchmark: ${DURATION}s per mode and client count ($CONCURRENCY clients; $MODES)"
RUST_LOG=${RUST_LOG:-warn} "$TANDEM_BIN" bench --participants "$PGDIR/participants.toml" --modes "$MODES" \
    --concurrency "$CONCURRENCY" --duration-s "$DURATION" --json "$JSON" --svg "$SVG"
log "results: $JSON; chart: $SVG"
