#!/usr/bin/env bash
# Regenerates the book's result tables and figures from the committed bench
# results (results/**/*.json), using the modules' own renderers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=(cargo run --release -q -p module01_baseline --)
for json in results/cpu/module01_bench.json results/h100/tinyllama-1.1b_h100{,_fix32,_fix30,_fix29,_fix26,_fix23,_fix22,_fix21,_fix21_again,_fix20b,_fix20a,_fix18,_fix16,_fix15,_fix14,_fix14a,_fix13,_fix12,_fix11,_fix10,_fix8,_matvec,_cublas,_torch_ops,_eager,_eager_cudnn,_prefill2048,_prefill2048_fix20,_prefill2048_fix20a,_prefill2048_fix18,_prefill2048_fix16,_prefill2048_fix3}.json results/h100/smollm2-135m_h100{,_eager}.json; do
    "${bin[@]}" table "$json" > "${json%.json}.txt"
done
# The H100 runs side by side, at the H100 SXM's 3350 GB/s for every floor
# (one run's bench was given an H200's figure).
mapfile -t runs < <(grep -v '^#' results/h100/module01_history_runs.txt)
"${bin[@]}" history "${runs[@]}" --mem-bandwidth-gbps 3350 \
    --svg results/h100/module01_history.svg > results/h100/module01_history.txt
for model in tinyllama-1.1b tinyllama-1.1b_split tinyllama-1.1b_fix26 smollm2-135m smollm2-135m_fix26; do
    json=results/h100/module01_timeline_$model.json
    "${bin[@]}" table "$json" --svg "${json%.json}.svg" > "${json%.json}.txt"
done
env=(cargo run --release -q -p module00_env --)
"${env[@]}" show results/h100/module00_env.json > results/h100/module00_env.txt
"${env[@]}" show results/cpu/module00_env.json > results/cpu/module00_env.txt
{
    for rate in none 10gbit 1gbit; do
        printf '%-8s %s\n' "$rate" "$("${env[@]}" show "results/cpu/module00_netns_$rate.json")"
    done
    printf '%-8s %s\n' "loopback" "$("${env[@]}" show results/h100/module00_loopback.json)"
} > results/cpu/module00_netns.txt
# Module 2 has no saved-result renderer: its tables come from running its
# studies, whose timings change from run to run (and chapter 2's prose quotes
# the committed run). Only with --module02 are they run again.
if [[ "${1:-}" == "--module02" ]]; then
    cargo run --release -q -p module02_kvcache -- --out results/cpu > /dev/null
fi
for run in loopback netns_10gbit netns_1gbit; do
    cargo run --release -q -p module03_tcp -- show "results/cpu/module03_$run.json" > /dev/null
done
cargo run --release -q -p module05_routing -- show-live results/cpu/module05_live.json > /dev/null
for json in results/cpu/module06_bench.json results/h100/module06_bench_h100{,_mps,_fix14,_fix18,_fix18_again}.json; do
    cargo run --release -q -p module06_dynamo -- show "$json" > /dev/null
done
# Module 4's bench writes its own tables (results/{cpu,h100}/module04_bench*.txt).
mkdir -p book/src/figures
cp results/cpu/module03_netns_1gbit.svg book/src/figures/module03_netns_1gbit.svg
cp results/cpu/module05_mooncake_20k.svg book/src/figures/module05_mooncake_20k.svg
cp results/cpu/module02_scaling.svg book/src/figures/module02_scaling.svg
cp results/cpu/module01_bench.svg book/src/figures/module01_smollm2_cpu.svg
cp results/h100/tinyllama-1.1b_h100.svg book/src/figures/module01_tinyllama_h100.svg
cp results/h100/module01_history.svg book/src/figures/module01_history_h100.svg
cp results/h100/module01_timeline_tinyllama-1.1b.svg book/src/figures/module01_timeline_tinyllama_h100.svg
echo "book results regenerated"
