#!/usr/bin/env bash
# Set up (idempotent) and run the main demo: the real model, on this machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
cargo run --release -p module01_baseline -- generate --prompt "The capital of France is" --max-tokens 16
cargo run --release -p module01_baseline -- generate --chat "Name three things a KV cache stores." --max-tokens 64
# The whole system: etcd, a prefill and a decode worker, the OpenAI-compatible
# frontend; one streamed chat request through it, then everything stops.
cargo run --release -p module06_dynamo -- demo
