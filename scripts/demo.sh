#!/usr/bin/env bash
# The demo: a local three-node cluster, decisions written through different
# nodes, the leader killed part-way, writes continuing on the new leader, the
# old leader restarted and catching up.
#
# Two-phase commit against databases comes with the next stage; today the
# demo shows the replicated decision log that 2PC stands on.
#
#   scripts/demo.sh          run it, then stop the cluster (data kept in .tandem/)
#   scripts/demo.sh --keep   leave the cluster running afterwards
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

keep=false
[ "${1:-}" = "--keep" ] && keep=true

export TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem/demo}"
export TANDEM_NODES="127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
cluster() { "$REPO_ROOT/scripts/cluster.sh" "$@"; }
finish() {
    if ! $keep; then
        cluster down
        echo "cluster stopped; data in $TANDEM_HOME (scripts/cluster.sh wipe removes it)"
    fi
}
trap finish EXIT

# A fresh cluster each run.
cluster wipe
cluster up

leader_id() {
    "$TANDEM_BIN" cluster status --json | grep '"role":"leader"' | sed 's/.*"id":\([0-9]*\).*/\1/' | head -n1
}

run_id="d$(date +%s)"
log "writing 30 decisions, each through a different node"
for i in $(seq 1 30); do
    node="127.0.0.1:700$(((i % 3) + 1))"
    if ((i % 5 == 0)); then
        "$TANDEM_BIN" log decide --nodes "$node" --txid "${run_id}t$i" --abort "demo: changed our mind" >/dev/null
    else
        "$TANDEM_BIN" log decide --nodes "$node" --txid "${run_id}t$i" --commit accounts_a,accounts_b \
            --idempotency-key "transfer-$run_id-$i" >/dev/null
    fi
done

log "the compare-and-set: an ABORT for an already committed txid loses"
"$TANDEM_BIN" log decide --txid "${run_id}t1" --abort "too late"

log "an idempotency key already bound to another txid is refused"
"$TANDEM_BIN" log decide --txid "${run_id}x1" --commit accounts_a --idempotency-key "transfer-$run_id-1" || true

old=$(leader_id)
log "killing the leader (node $old) with SIGKILL"
cluster kill "$old"
t0=$(date +%s%N)
log "writing 30 more decisions while the cluster elects a new leader"
for i in $(seq 31 60); do
    "$TANDEM_BIN" log decide --txid "${run_id}t$i" --commit accounts_a,accounts_b >/dev/null
    if [ "$i" -eq 31 ]; then
        failover_ms=$((($(date +%s%N) - t0) / 1000000))
    fi
done
log "first write after the kill was acknowledged after ${failover_ms} ms"
"$TANDEM_BIN" cluster status

log "restarting node $old; it catches up from its own RocksDB data and the leader"
cluster restart "$old"
"$TANDEM_BIN" cluster status --wait-leader 60 >/dev/null
sleep 1

log "every node's own state machine:"
for n in 1 2 3; do
    count=$("$TANDEM_BIN" log list --nodes "127.0.0.1:700$n" --local --limit 1000 | grep -c "^${run_id}" || true)
    echo "  node $n holds $count of 60 decisions"
done
"$TANDEM_BIN" log get "${run_id}t1"
"$TANDEM_BIN" cluster status
