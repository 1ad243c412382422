#!/usr/bin/env bash
# The remote-participant walk-through: an order lands in `orders` (a
# PostgreSQL database Tandem manages) and its stock is reserved by an
# inventory service with its own PostgreSQL (examples/inventory_service.rs,
# a participant through the SDK), atomically.
#
# Two throwaway PostgreSQL servers: `orders` and `inventory`. A local
# three-node cluster on free ports has `orders` as a participant. The
# inventory service (seeded with 10 apples) serves tandem.v1.Participant
# for the coordinator and a small reservation API for the order flow. Then:
# an order of 3 (committed: the order row and the reservation), an order of
# 30 (refused by the service: not enough stock; the order row is rolled
# back with it), the service killed with SIGKILL right after reserving and
# before Commit, and started again (its open branch died with it: it votes
# ABORT at the coordinator's retried Prepare, and the order aborts). At the end the stock must equal 10 minus the committed orders, with
# no prepared branch left on either server, or the script exits non-zero.
#
#   scripts/inventory_demo.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
case "${1:-}" in
    "") ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

export TANDEM_HOME="${TANDEM_HOME:-$REPO_ROOT/.tandem/inventory}"
pick_port_base
TANDEM_NODES=$(local_nodes)
export TANDEM_NODES
cluster() { "$REPO_ROOT/scripts/cluster.sh" "$@"; }

build_tandem
log "building the example inventory service"
cargo build --example inventory_service --features failpoints --quiet
INVENTORY="$CARGO_TARGET_DIR/debug/examples/inventory_service"
source "$REPO_ROOT/scripts/pg.sh"
pg_init
service_pid=""
finish() {
    [ -z "$service_pid" ] || kill "$service_pid" 2>/dev/null || true
    cluster down >/dev/null 2>&1 || true
    pg_stop_all
}
trap finish EXIT

pg_start orders
pg_start inventory
pg_sql orders orders "CREATE TABLE orders (id bigserial PRIMARY KEY, txid text NOT NULL, sku text NOT NULL, qty int NOT NULL)"
printf '[[participants]]\nname = "orders"\nkind = "postgres"\nurl = "postgres://postgres@127.0.0.1:%s/orders"\n' \
    "${PORT[orders]}" >"$PGDIR/participants.toml"
cluster wipe >/dev/null
cluster up --participants "$PGDIR/participants.toml" >/dev/null
# The service's two ports, chosen once everything else listens.
PARTICIPANT_ADDR="127.0.0.1:$(pg_free_port)"
while :; do
    API_ADDR="127.0.0.1:$(pg_free_port)"
    [ "$API_ADDR" != "$PARTICIPANT_ADDR" ] && break
done

serve() {
    local seed=()
    [ -z "${1:-}" ] || seed=(--seed "$1")
    "$INVENTORY" serve --db "postgres://postgres@127.0.0.1:${PORT[inventory]}/inventory" \
        --listen "$PARTICIPANT_ADDR" --api "$API_ADDR" "${seed[@]}" --resolve-interval-s 1 \
        >>"$TANDEM_HOME/inventory.log" 2>&1 &
    service_pid=$!
    # Up to a minute: on a busy two-core machine the start (PostgreSQL
    # set-up, the cluster client) can take seconds.
    for _ in $(seq 1 600); do
        port_free "${API_ADDR#*:}" || return 0
        kill -0 "$service_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$service_pid" 2>/dev/null; then
        echo "the inventory service did not serve $API_ADDR within a minute; its log ends:" >&2
    else
        echo "the inventory service exited; its log ends:" >&2
    fi
    tail -n 20 "$TANDEM_HOME/inventory.log" >&2 || true
    exit 1
}
order() { "$INVENTORY" order --sku apple --qty "$1" --orders-participant orders --inventory "$API_ADDR" "${@:2}"; }
stock() { "$INVENTORY" stock --sku apple --inventory "$API_ADDR"; }
orders() { pg_sql orders orders "SELECT coalesce(sum(qty), 0) FROM orders"; }
prepared() { pg_sql "$1" postgres "SELECT count(*) FROM pg_prepared_xacts"; }

mkdir -p "$TANDEM_HOME"
serve apple=10
echo "stock before: $(stock)"

echo
echo "== an order of 3 apples"
order 3
echo "stock: $(stock); apples ordered: $(orders)"

echo
echo "== an order of 30 apples"
if order 30; then
    echo "an order beyond the stock committed" >&2
    exit 1
fi
echo "stock: $(stock); apples ordered: $(orders)"

echo
echo "== the inventory service killed after reserving 2, before Commit"
order 2 --pause-before-commit 3 &
order_pid=$!
sleep 1.5
kill -9 "$service_pid"
wait "$service_pid" 2>/dev/null || true
echo "(inventory service killed; starting it again)"
# Its open branch died with its connection; the coordinator's Prepare,
# retried until the service is back, finds nothing and the vote is ABORT.
serve ""
wait "$order_pid" && { echo "the order committed without its reservation" >&2; exit 1; }
echo "stock: $(stock); apples ordered: $(orders)"

stock_left=$(stock | grep -o '[0-9]* available' | grep -o '[0-9]*')
ordered=$(orders)
left_orders=$(prepared orders) left_inventory=$(prepared inventory)
echo
echo "apples: $stock_left in stock + $ordered ordered (10 at the start); prepared branches left: $left_orders + $left_inventory"
if ((stock_left + ordered != 10 || left_orders + left_inventory != 0)); then
    echo "NOT ATOMIC" >&2
    exit 1
fi
echo "atomic: every order has its stock, and no stock is reserved without its order"
