#!/usr/bin/env bash
# Module 6 across two "hosts": etcd, the frontend and a prefill worker in
# network namespace sd-node1; a decode worker in sd-node2; joined by a veth
# shaped with tc to RATE (default 10gbit). Every prefill goes remote, so every
# prompt's KV crosses the shaped link. Needs root (ip netns, tc).
#
#   sudo ./scripts/module06-two-hosts.sh 10gbit
#   sudo ./scripts/module06-two-hosts.sh 1gbit --transfer onesided
#
# Results: results/cpu/module06_netns_<rate>.{json,txt}. Extra arguments go to
# the frontend (e.g. --transfer bulk, --policy round-robin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rate="${1:-10gbit}"
shift || true
cargo build --release -q -p module06_dynamo
bin="$PWD/target/release/module06_dynamo"
etcd_data="$(mktemp -d)"

./scripts/netns-lab.sh up --rate "$rate"
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$etcd_data"
}
trap cleanup EXIT
in1() { ip netns exec sd-node1 "$@"; }
in2() { ip netns exec sd-node2 "$@"; }

in1 etcd --data-dir "$etcd_data" --listen-client-urls http://10.77.0.1:2379 \
    --advertise-client-urls http://10.77.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    > "$etcd_data/etcd.log" 2>&1 & pids+=($!)
sleep 2
one_sided=()
[[ " $* " == *" --transfer onesided "* ]] && one_sided=(--one-sided --transfer-backend tcp)
in2 "$bin" worker --role decode --listen 10.77.0.2:7801 --etcd 10.77.0.1:2379 --name decode-node2 "${one_sided[@]}" & pids+=($!)
in1 "$bin" worker --role prefill --listen 10.77.0.1:7800 --etcd 10.77.0.1:2379 --name prefill-node1 & pids+=($!)
in1 "$bin" frontend --etcd 10.77.0.1:2379 --port 8000 --min-remote-prefill 0 "$@" & pids+=($!)

# The workers load the model first; wait until the frontend sees both.
for _ in $(seq 600); do
    if in1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8000; printf "GET /health HTTP/1.0\r\n\r\n" >&3; cat <&3' 2>/dev/null |
        grep prefill-node1 | grep -q decode-node2; then
        break
    fi
    sleep 0.2
done
in1 "$bin" bench --url http://127.0.0.1:8000 --name "2 hosts, $rate" \
    --json "results/cpu/module06_netns_$rate.json"
