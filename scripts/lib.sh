# Shared by the scripts: where things are, and installing what is missing.
# Source it; it changes nothing until a function is called.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One build cache outside the clone, shared by tests, demo and CI, so
# RocksDB's C++ is compiled once per machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tandem/target}"
# TANDEM_PROFILE=release (the benchmark's default) builds and runs the
# optimised binary, without fail points; otherwise the debug one below.
TANDEM_PROFILE="${TANDEM_PROFILE:-debug}"
export TANDEM_PROFILE
TANDEM_BIN="$CARGO_TARGET_DIR/$TANDEM_PROFILE/tandem"

log() { printf '==> %s\n' "$*" >&2; }

port_free() { ! (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# A port to listen on, drawn below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768 and up here): a port from inside it
# can be taken as the source port of any outgoing connection between the
# check and the bind.
random_port() { echo $((10000 + RANDOM % 22000)); }

# Exports TANDEM_PORT_BASE, three free ports in a row above it for a local
# cluster (scripts/cluster.sh), unless it is set already.
pick_port_base() {
    if [ -z "${TANDEM_PORT_BASE:-}" ]; then
        while :; do
            TANDEM_PORT_BASE=$(random_port)
            port_free $((TANDEM_PORT_BASE + 1)) && port_free $((TANDEM_PORT_BASE + 2)) &&
                port_free $((TANDEM_PORT_BASE + 3)) && break
        done
    fi
    export TANDEM_PORT_BASE
}

# The local cluster's addresses on loopback, comma-separated.
local_nodes() {
    echo "127.0.0.1:$((TANDEM_PORT_BASE + 1)),127.0.0.1:$((TANDEM_PORT_BASE + 2)),127.0.0.1:$((TANDEM_PORT_BASE + 3))"
}

# Installs the Debian packages the build and the tests need, if missing.
ensure_build_deps() {
    local missing=()
    dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
    # Tests start throwaway PostgreSQL servers with initdb/pg_ctl.
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed; install Rust (rustup) first" >&2
        exit 1
    fi
    for component in rustfmt clippy; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            log "installing rust component $component"
            rustup component add "$component"
        fi
    done
}

# The scripts' binary is the tests' binary: with the fail points compiled
# in (inert unless a test arms one through Cluster.SetFailPoint), so that a
# script never replaces the binary a test run is using, and CI compiles the
# crate once. Production builds (`cargo build --release`) leave them out.
build_tandem() {
    ensure_build_deps
    log "building tandem ($TANDEM_PROFILE; target dir $CARGO_TARGET_DIR)"
    if [ "$TANDEM_PROFILE" = release ]; then
        (cd "$REPO_ROOT" && cargo build --release --bin tandem --quiet)
    else
        (cd "$REPO_ROOT" && cargo build --bin tandem --features failpoints --quiet)
    fi
}
