# Three hosts on one machine, for the partition fault: each node of the
# local cluster runs in its own network namespace, behind a router
# namespace that can drop the traffic between any two of them while every
# node still reaches the machine (PostgreSQL, the clients).
#
#   host (root namespace)  10.K.0.1 ── router 10.K.0.2
#                                       ├── 10.K.1.1 ── node 1  10.K.1.2
#                                       ├── 10.K.2.1 ── node 2  10.K.2.2
#                                       └── 10.K.3.1 ── node 3  10.K.3.2
#
# Source it; nothing changes until a function is called. Needs root and
# iproute2. Namespaces are named tdmK-r and tdmK-1..3; K is picked free at
# `netns_up`, so two runs do not collide.

NETNS_TAG="" NETNS_NET=""

# True if this shell may create network namespaces.
netns_available() {
    [ "$(id -u)" -eq 0 ] || return 1
    command -v ip >/dev/null 2>&1 || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null 2>&1 || return 1
    }
    local probe="tdm-probe-$$"
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe"
}

# Creates the router and three node namespaces; sets NETNS_TAG (the name
# prefix) and NETNS_NET (10.K).
netns_up() {
    local k
    for k in $(seq 100 199); do
        if ! ip netns list | grep -q "^tdm$k-" && ! ip route | grep -q "^10\.$k\."; then
            NETNS_TAG="tdm$k" NETNS_NET="10.$k"
            break
        fi
    done
    [ -n "$NETNS_TAG" ] || { echo "no free 10.K.0.0/16 for the network namespaces" >&2; return 1; }
    local t=$NETNS_TAG net=$NETNS_NET r="$NETNS_TAG-r" n
    ip netns add "$r"
    ip -n "$r" link set lo up
    ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
    ip link add "$t-h" type veth peer name "$t-hr"
    ip link set "$t-hr" netns "$r"
    ip addr add "$net.0.1/24" dev "$t-h"
    ip link set "$t-h" up
    ip -n "$r" addr add "$net.0.2/24" dev "$t-hr"
    ip -n "$r" link set "$t-hr" up
    for n in 1 2 3; do
        ip netns add "$t-$n"
        ip -n "$t-$n" link set lo up
        ip link add "$t-r$n" type veth peer name "$t-e$n"
        ip link set "$t-r$n" netns "$r"
        ip link set "$t-e$n" netns "$t-$n"
        ip -n "$r" addr add "$net.$n.1/24" dev "$t-r$n"
        ip -n "$r" link set "$t-r$n" up
        ip -n "$t-$n" addr add "$net.$n.2/24" dev "$t-e$n"
        ip -n "$t-$n" link set "$t-e$n" up
        ip -n "$t-$n" route add default via "$net.$n.1"
    done
    ip route add "$net.0.0/16" via "$net.0.2"
}

# Removes the namespaces (their links and the host's route go with them).
netns_down() {
    [ -n "$NETNS_TAG" ] || return 0
    local n
    for n in 1 2 3 r; do ip netns del "$NETNS_TAG-$n" 2>/dev/null || true; done
}

netns_host_addr() { echo "$NETNS_NET.0.1"; }
netns_node_addr() { echo "$NETNS_NET.$1.2"; }

# Drops every packet between node N and the other two nodes, both ways;
# N still reaches the host, and the host N.
netns_cut() {
    local n=$1 m
    for m in 1 2 3; do
        ((m == n)) && continue
        ip -n "$NETNS_TAG-r" rule add from "$NETNS_NET.$n.2" to "$NETNS_NET.$m.2" blackhole
        ip -n "$NETNS_TAG-r" rule add from "$NETNS_NET.$m.2" to "$NETNS_NET.$n.2" blackhole
    done
}

# Undoes netns_cut N.
netns_heal() {
    local n=$1 m
    for m in 1 2 3; do
        ((m == n)) && continue
        ip -n "$NETNS_TAG-r" rule del from "$NETNS_NET.$n.2" to "$NETNS_NET.$m.2" blackhole 2>/dev/null || true
        ip -n "$NETNS_TAG-r" rule del from "$NETNS_NET.$m.2" to "$NETNS_NET.$n.2" blackhole 2>/dev/null || true
    done
}
