#!/usr/bin/env bash
# Formatting, lints and docs. Changes nothing; fails on any finding.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy -D warnings"
cargo clippy --all-targets --features failpoints --quiet -- -D warnings
log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
log "check passed"
