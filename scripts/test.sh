#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: what CI runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/setup.sh
# A fresh machine builds everything once: incremental caches would only
# take disk (gigabytes, with libtorch in every test binary).
export CARGO_INCREMENTAL=0
echo "[test] cargo test --workspace (lab exercises with their reference solutions)"
cargo test --workspace --all-targets --all-features -- --include-ignored
echo "[test] cargo check (the exercise stubs, as students get them)"
cargo check --workspace --all-targets
echo "[test] python3 -m doctest scripts/ncu_stalls.py (its source reading; the report needs a GPU)"
python3 -m doctest scripts/ncu_stalls.py
echo "[test] mdbook build book"
mdbook build book
./scripts/check-book-includes.sh
./scripts/check-reference-flags.sh
