# Throwaway PostgreSQL servers for the demo and the chaos run. Source it
# after lib.sh; it changes nothing until a function is called.
#
#   pg_init              find the binaries, make $PGDIR (a temp dir)
#   pg_start NAME        a server on a free port with a database NAME (more
#                        server options in PG_EXTRA_OPTS);
#                        its port goes to PORT[NAME]
#   pg_sql NAME DB SQL   run SQL, print rows unaligned
#   pg_restart NAME      pg_ctl restart -m immediate (a crash, as PostgreSQL sees it)
#   pg_stop_all          stop every server started here, delete $PGDIR
#   pg_participants F    write a [[participants]] file for every server

declare -A PORT
PG_BIN="" PGDIR="" as_pg=()

pg_init() {
    PG_BIN=$(pg_config --bindir 2>/dev/null || true)
    [ -x "$PG_BIN/initdb" ] || PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    # PostgreSQL refuses to run as root: then its servers run as `postgres`.
    as_pg=()
    [ "$(id -u)" -ne 0 ] || as_pg=(runuser -u postgres --)
    PGDIR=$(mktemp -d "${TMPDIR:-/tmp}/tandem-pg.XXXXXX")
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$PGDIR"
}

# A free port, never one of the three the cluster's nodes will listen on
# (TANDEM_PORT_BASE + 1 to 3, picked before the servers start but bound
# only after).
pg_free_port() {
    local p
    while :; do
        p=$(random_port)
        if [ -n "${TANDEM_PORT_BASE:-}" ] && ((p > TANDEM_PORT_BASE && p <= TANDEM_PORT_BASE + 3)); then
            continue
        fi
        (: </dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "$p"; return; }
    done
}

pg_sql() { "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PORT[$1]}" -U postgres -d "$2" -c "$3"; }

pg_ctl_of() { (cd / && "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$PGDIR/$1/data" "${@:2}"); }

pg_start() {
    local name=$1 dir="$PGDIR/$1" port attempt
    (cd / && "${as_pg[@]}" mkdir "$dir" &&
        "${as_pg[@]}" "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null)
    # A port that looked free can be taken before the server binds it:
    # then another port.
    for attempt in 1 2 3; do
        port=$(pg_free_port)
        pg_ctl_of "$name" -l "$dir/server.log" -w -t 60 -o \
            "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c max_prepared_transactions=64 ${PG_EXTRA_OPTS:-}" \
            start >/dev/null && break
        echo "PostgreSQL for $name did not start on port $port (attempt $attempt); its log ends:" >&2
        tail -n 5 "$dir/server.log" >&2 || true
        ((attempt < 3)) || return 1
    done
    PORT[$name]=$port
    pg_sql "$name" postgres "CREATE DATABASE $name"
    log "PostgreSQL for $name on 127.0.0.1:$port ($dir)"
}

pg_restart() { pg_ctl_of "$1" -l "$PGDIR/$1/server.log" -m immediate -w -t 60 restart >/dev/null; }

pg_stop_all() {
    local name
    for name in "${!PORT[@]}"; do
        pg_ctl_of "$name" -m fast -w stop >/dev/null 2>&1 || true
    done
    [ -z "$PGDIR" ] || rm -rf "$PGDIR"
}

pg_participants() {
    local name
    for name in "${!PORT[@]}"; do
        printf '[[participants]]\nname = "%s"\nkind = "postgres"\nurl = "%s"\npool_size = 16\n\n' \
            "$name" "postgres://postgres@127.0.0.1:${PORT[$name]}/$name"
    done >"$1"
}
