#!/usr/bin/env bash
# A two-node network lab on one Linux machine: two network namespaces joined
# by a veth pair, optionally shaped with tc like a real link.
#
#   sudo ./scripts/netns-lab.sh up                       # sd-node1 10.77.0.1 <-> sd-node2 10.77.0.2
#   sudo ./scripts/netns-lab.sh up --rate 10gbit --delay 50us   # a 10 Gbit/s link with 50 µs each way
#   sudo ./scripts/netns-lab.sh status
#   sudo ./scripts/netns-lab.sh down
#
# Then run one side of a module in each namespace, e.g.
#   sudo ip netns exec sd-node2 target/release/module00_env serve --listen 10.77.0.2:7700 &
#   sudo ip netns exec sd-node1 target/release/module00_env check --peer 10.77.0.2:7700
#
# Needs root (or CAP_NET_ADMIN) and iproute2. Shaping uses tc's token bucket
# (tbf) for the rate and netem for the delay, on both ends of the pair.
set -euo pipefail

ns1=sd-node1 ns2=sd-node2
ip1=10.77.0.1 ip2=10.77.0.2
dev1=sd-veth1 dev2=sd-veth2

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# tbf's bucket: 1 ms worth of the rate (at least 64 KB). A bigger bucket lets
# a short transfer after an idle gap pass at full speed, unshaped.
burst_for() {
    local rate=$1 number unit bits
    number="${rate%%[!0-9]*}" unit="${rate#"$number"}"
    case "$unit" in
    gbit) bits=$((number * 1000000000)) ;;
    mbit) bits=$((number * 1000000)) ;;
    kbit) bits=$((number * 1000)) ;;
    *) echo "rate must look like 10gbit, 500mbit or 100kbit" >&2; exit 2 ;;
    esac
    local bytes=$((bits / 8 / 1000))
    [ "$bytes" -lt 65536 ] && bytes=65536
    echo "$bytes"
}

shape() { # namespace device rate delay
    local ns=$1 dev=$2 rate=$3 delay=$4 burst
    [ -n "$rate" ] && burst="$(burst_for "$rate")"
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
    if [ -n "$delay" ]; then
        ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 100000 || {
            echo "tc netem failed: this kernel has no sch_netem (modprobe sch_netem), so --delay cannot work" >&2
            exit 1
        }
        [ -n "$rate" ] && ip netns exec "$ns" tc qdisc add dev "$dev" parent 1: handle 2: \
            tbf rate "$rate" burst "$burst" latency 100ms
    elif [ -n "$rate" ]; then
        ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 100ms
    fi
    return 0
}

cmd="${1:-}"; shift || true
rate="" delay=""
while [ $# -gt 0 ]; do
    case "$1" in
    --rate) rate="$2"; shift 2 ;;
    --delay) delay="$2"; shift 2 ;;
    *) usage ;;
    esac
done

case "$cmd" in
up)
    if ip netns list | grep -qw "$ns1"; then
        echo "lab already up; reshaping only"
    else
        ip netns add "$ns1"
        ip netns add "$ns2"
        ip link add "$dev1" type veth peer name "$dev2"
        ip link set "$dev1" netns "$ns1"
        ip link set "$dev2" netns "$ns2"
        ip -n "$ns1" addr add "$ip1/24" dev "$dev1"
        ip -n "$ns2" addr add "$ip2/24" dev "$dev2"
        for ns in "$ns1" "$ns2"; do ip -n "$ns" link set lo up; done
        ip -n "$ns1" link set "$dev1" up
        ip -n "$ns2" link set "$dev2" up
    fi
    shape "$ns1" "$dev1" "$rate" "$delay"
    shape "$ns2" "$dev2" "$rate" "$delay"
    echo "$ns1 ($ip1) <-> $ns2 ($ip2)${rate:+, rate $rate}${delay:+, delay $delay each way}"
    ;;
status)
    for ns in "$ns1" "$ns2"; do
        ip netns list | grep -qw "$ns" || { echo "$ns: absent (run: $0 up)"; continue; }
        echo "$ns:"; ip -n "$ns" -br addr; ip netns exec "$ns" tc qdisc show
    done
    ;;
down)
    for ns in "$ns1" "$ns2"; do ip netns del "$ns" 2>/dev/null || true; done
    echo "lab removed"
    ;;
*) usage ;;
esac
