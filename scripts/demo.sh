#!/usr/bin/env bash
# The demo: bank transfers between two PostgreSQL databases, each one atomic
# through Tandem's two-phase commit, while the Raft leader is killed.
#
# Two throwaway PostgreSQL servers hold accounts_a and accounts_b, 10 accounts
# of 1000 each. A local three-node cluster (scripts/cluster.sh) has them as
# participants. Workers send random transfers from an account in one database
# to an account in the other: one `tandem txn transact` each, a debit branch
# and a credit branch, with its own idempotency key. A transfer that would
# take a balance below zero fails the CHECK constraint and aborts as a whole.
# A few may time out (10 s): two transfers going opposite ways can each hold
# a row the other waits for, in different databases, where neither server
# sees the deadlock; the transaction timeout ends it with an abort.
# Part-way, the leader is killed with SIGKILL; transfers go on through the
# new leader, and the old one is restarted. At the end the money over both
# databases must be what it was and no prepared branch may be left, or the
# script exits non-zero.
#
#   scripts/demo.sh          run it, then stop the cluster and both servers
#   scripts/demo.sh --keep   leave everything running; prints how to stop it
#
# DEMO_SECONDS (40), DEMO_WORKERS (4) and DEMO_KILL_AFTER (15 s) change the
# workload. Cluster state is in .tandem/demo (TANDEM_HOME), the servers in a
# temporary directory.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

keep=false
case "${1:-}" in
    --keep) keep=true ;;
    "") ;;
    *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
DURATION=${DEMO_SECONDS:-40} WORKERS=${DEMO_WORKERS:-4} KILL_AFTER=${DEMO_KILL_AFTER:-15}
ACCOUNTS=10 DBS=(accounts_a accounts_b)
DEBIT='UPDATE balances SET balance = balance - $1 WHERE id = $2'
CREDIT='UPDATE balances SET balance = balance + $1 WHERE id = $2'

export TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem/demo}"
export TANDEM_NODES="127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
cluster() { "$REPO_ROOT/scripts/cluster.sh" "$@"; }
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
t_begin=$(now_ms)

build_tandem # installs PostgreSQL, the compilers and libclang if missing
source "$REPO_ROOT/scripts/pg.sh"
pg_init
WORK="$PGDIR/workload"
pids=()

finish() {
    ((${#pids[@]} == 0)) || kill "${pids[@]}" 2>/dev/null || true
    if $keep; then
        echo
        echo "left running; psql -h 127.0.0.1 -U postgres -p ${PORT[accounts_a]:-?} accounts_a (-p ${PORT[accounts_b]:-?} accounts_b)"
        echo "stop everything with:"
        echo "  TANDEM_HOME=$TANDEM_HOME $REPO_ROOT/scripts/cluster.sh down"
        for db in "${!PORT[@]}"; do echo "  ${as_pg[*]} $PG_BIN/pg_ctl -D $PGDIR/$db/data stop"; done
        echo "  rm -rf $PGDIR"
        return
    fi
    cluster down || true
    pg_stop_all
    echo "cluster and PostgreSQL servers stopped; node logs in $TANDEM_HOME/logs"
}
trap finish EXIT

balance() { pg_sql "$1" "$1" "SELECT sum(balance) FROM balances"; }
prepared() { pg_sql "$1" postgres "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'tdm\_%'"; }

for db in "${DBS[@]}"; do
    pg_start "$db"
    pg_sql "$db" "$db" "CREATE TABLE balances (id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
        INSERT INTO balances SELECT g, 1000 FROM generate_series(1, $ACCOUNTS) g"
done
before_a=$(balance accounts_a) before_b=$(balance accounts_b)

cluster wipe
pg_participants "$PGDIR/participants.toml"
cluster up --participants "$PGDIR/participants.toml"

leader_id() {
    "$TANDEM_BIN" cluster status --json | grep '"role":"leader"' | sed 's/^{"id":\([0-9]*\),.*/\1/' | head -n1
}

# One line per transfer in $WORK/wN.log: end time (ms), committed|aborted|
# failed, node that ran it (from the txid, …t<term>n<node>s<seq>), txid, reason.
worker() {
    local w=$1 i=0 from to amount out rc txid outcome reason class node
    RANDOM=$((BASHPID + w))
    while [ ! -e "$WORK/stop" ]; do
        i=$((i + 1))
        if ((RANDOM % 2)); then from=accounts_a to=accounts_b; else from=accounts_b to=accounts_a; fi
        amount=$((RANDOM % 400 + 1))
        rc=0
        out=$("$TANDEM_BIN" txn transact --idempotency-key "$RUN-w$w-$i" --timeout-ms 10000 \
            --participant "$from" --sql "$DEBIT" --param "int:$amount" --param "int:$((RANDOM % ACCOUNTS + 1))" \
            --participant "$to" --sql "$CREDIT" --param "int:$amount" --param "int:$((RANDOM % ACCOUNTS + 1))" \
            2>"$WORK/w$w.last") || rc=$?
        cat "$WORK/w$w.last" >>"$WORK/w$w.err"
        read -r txid outcome reason <<<"${out%%$'\n'*}" || true
        node=-
        [[ ${txid:-} =~ t[0-9]+n([0-9]+)s ]] && node=${BASH_REMATCH[1]}
        if ((rc != 0)); then
            class=failed reason=$(tail -n1 "$WORK/w$w.last")
        elif [ "$outcome" = COMMITTED ] || [[ $reason == *"already belongs to committed transaction"* ]]; then
            class=committed # the second: a retry, after an unknown outcome, of a committed transfer
            [[ $reason != *repeat* && $reason != *"already belongs"* ]] || reason="a repeat answered by its key"
        else
            class=aborted
        fi
        echo "$(now_ms) $class $node ${txid:--} ${reason:-}" >>"$WORK/w$w.log"
    done
}

RUN="demo$(date +%s)"
mkdir -p "$WORK"
log "$WORKERS workers sending transfers for ${DURATION}s; the leader is killed after ${KILL_AFTER}s"
t_start=$(now_ms)
for w in $(seq 1 "$WORKERS"); do
    touch "$WORK/w$w.log"
    worker "$w" &
    pids+=($!)
done

sleep "$KILL_AFTER"
"$TANDEM_BIN" cluster status --wait-leader 30 >/dev/null
old=$(leader_id)
log "killing the leader (node $old) with SIGKILL"
t_kill=$(now_ms)
cluster kill "$old"
first=""
for _ in $(seq 1 300); do
    first=$(cat "$WORK"/w*.log | awk -v t="$t_kill" -v old="$old" \
        '$2 == "committed" && $1 > t && $3 != old && $3 != "-" { if (m == "" || $1 < m) m = $1 } END { print m }')
    [ -n "$first" ] && break
    sleep 0.1
done
failover="no commit within 30 s of the kill"
[ -z "$first" ] || failover="$((first - t_kill)) ms from the kill of node $old to the first commit after it"
log "failover: $failover"
log "restarting node $old"
cluster restart "$old"

sleep "$(((t_start + DURATION * 1000 - $(now_ms)) / 1000))" 2>/dev/null || true
touch "$WORK/stop"
log "stopping the workers"
wait "${pids[@]}"
pids=()

log "waiting (at most 60 s) for recovery to finish every prepared branch"
for _ in $(seq 1 60); do
    left=$(($(prepared accounts_a) + $(prepared accounts_b)))
    ((left == 0)) && break
    sleep 1
done
after_a=$(balance accounts_a) after_b=$(balance accounts_b)
"$TANDEM_BIN" cluster status

count() { cat "$WORK"/w*.log | awk -v c="$1" -v r="${2:-}" '$2 == c && (r == "" || index($0, r))' | wc -l; }
reasons() {
    cat "$WORK"/w*.log | awk -v c="$1" '$2 == c' | cut -d' ' -f5- |
        sed 's/^.*check constraint.*$/balance would go below 0 (CHECK constraint)/' | cut -c1-100 | sort | uniq -c | sort -rn | sed 's/^/    /'
}
echo
log "summary after $((($(now_ms) - t_begin) / 1000)) s"
echo "  transfers committed:       $(count committed) (of which repeats answered by their idempotency key: $(count committed 'answered by its key'))"
echo "  transfers aborted:         $(count aborted)"
reasons aborted
echo "  transfers failed/unknown:  $(count failed)"
reasons failed
echo "  total balance before:      $((before_a + before_b)) (accounts_a $before_a + accounts_b $before_b)"
echo "  total balance after:       $((after_a + after_b)) (accounts_a $after_a + accounts_b $after_b)"
echo "  prepared branches left:    $left"
echo "  failover:                  $failover"
ok=true
((before_a + before_b == after_a + after_b)) || { echo "FAIL: the total changed" >&2; ok=false; }
((left == 0)) || { echo "FAIL: prepared branches are left" >&2; ok=false; }
[ -n "$first" ] || { echo "FAIL: nothing committed after the kill" >&2; ok=false; }
$ok
