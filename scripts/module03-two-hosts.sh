#!/usr/bin/env bash
# Module 3 across two "hosts": the decode server in network namespace
# sd-node2, the prefill server and the client in sd-node1, joined by a veth
# shaped with tc to RATE (default 10gbit). Needs root (ip netns, tc).
#
#   sudo ./scripts/module03-two-hosts.sh 10gbit
#   sudo ./scripts/module03-two-hosts.sh 1gbit
#
# Results: results/cpu/module03_netns_<rate>.{json,txt,svg}. Extra arguments go to
# the client (e.g. --max-tokens 32 --repeat 4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rate="${1:-10gbit}"
shift || true
cargo build --release -q -p module03_tcp
bin="$PWD/target/release/module03_tcp"

./scripts/netns-lab.sh up --rate "$rate"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
ip netns exec sd-node2 "$bin" decode --listen 10.77.0.2:7801 --one-sided & pids+=($!)
ip netns exec sd-node1 "$bin" prefill --listen 127.0.0.1:7800 --decode 10.77.0.2:7801 & pids+=($!)
# The servers load the model first; wait until both accept connections.
for _ in $(seq 600); do
    if ip netns exec sd-node2 bash -c 'exec 3<>/dev/tcp/10.77.0.2/7801' 2>/dev/null &&
        ip netns exec sd-node1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/7800' 2>/dev/null; then
        break
    fi
    sleep 0.2
done
ip netns exec sd-node1 "$bin" client --prefill 127.0.0.1:7800 --decode 10.77.0.2:7801 \
    --link "two network namespaces, veth shaped to $rate" \
    --json "results/cpu/module03_netns_$rate.json" --svg "results/cpu/module03_netns_$rate.svg" "$@"
"$bin" show "results/cpu/module03_netns_$rate.json" > /dev/null
