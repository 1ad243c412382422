#!/usr/bin/env bash
# Installs what is missing, builds, checks and runs every test.
#
# The build has the fail points compiled in (src/failpoint.rs). The tests
# end with the remote-participant walk-through (scripts/inventory_demo.sh),
# a one-second-per-point benchmark run (scripts/bench.sh) and a short chaos
# run (scripts/chaos.sh, a fixed seed).
# Integration tests start their own nodes on ports chosen at run time and
# run one at a time (the machine has few cores; Raft timing needs slack).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
ensure_build_deps
log "building (target dir $CARGO_TARGET_DIR)"
cargo build --all-targets --features failpoints --quiet
"$REPO_ROOT/scripts/check.sh"
log "running tests"
cargo test --features failpoints --quiet -- --test-threads=1
log "the remote-participant walk-through"
mkdir -p "$REPO_ROOT/.tandem"
"$REPO_ROOT/scripts/inventory_demo.sh" >"$REPO_ROOT/.tandem/inventory_demo.log" 2>&1 ||
    { tail -n 40 "$REPO_ROOT/.tandem/inventory_demo.log"; exit 1; }
log "the benchmark, briefly (that it runs; its figures mean nothing at this length)"
TANDEM_PROFILE=debug "$REPO_ROOT/scripts/bench.sh" --duration 1 --concurrency 1,4 >"$REPO_ROOT/.tandem/bench_smoke.log" 2>&1 ||
    { tail -n 40 "$REPO_ROOT/.tandem/bench_smoke.log"; exit 1; }
log "a short chaos run (fixed seed): faults under the bank workload, then the checker"
"$REPO_ROOT/scripts/chaos.sh" --duration 90 --seed 42 --kill-every 20 --pause-every 35 \
    --partition-every 30 --participant-restart-every 50 --report "$REPO_ROOT/.tandem/chaos/report.json"
