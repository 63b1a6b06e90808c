#!/usr/bin/env bash
# Regenerates the book's result tables and figures from the committed bench
# results (results/**/*.json), using the modules' own renderers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=(cargo run --release -q -p module01_baseline --)
for json in results/cpu/module01_bench.json results/h100/tinyllama-1.1b_h100.json results/h100/smollm2-135m_h100.json; do
    "${bin[@]}" table "$json" > "${json%.json}.txt"
done
mkdir -p book/src/figures
cp results/cpu/module01_bench.svg book/src/figures/module01_smollm2_cpu.svg
cp results/h100/tinyllama-1.1b_h100.svg book/src/figures/module01_tinyllama_h100.svg
echo "book results regenerated"
