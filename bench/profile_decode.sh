#!/usr/bin/env bash
# Where a batch-1 decode step's time goes on a GPU (issue #11). Run on the
# GPU machine from a directory holding a release `module01_baseline` and
# `profile_decode.py` (the device tool carries them as .carry/); writes under
# $OUT (default: current directory). Needs Nsight Compute (ncu).
#
#   LD_LIBRARY_PATH=<torch>/lib ./profile_decode.sh
set -euo pipefail
out="${OUT:-.}"
bench=(./module01_baseline bench --random tinyllama-1.1b --prompt-len 512 --num-requests 0)
# Without the profiler: the time per token to compare with.
"${bench[@]}" --output-len 128 --batch-sizes 1,32 --json "$out/plain.json" > "$out/plain.txt" 2>&1
# With it: every kernel's duration for a short run (8 decode steps per phase).
ncu --csv --metrics gpu__time_duration.sum --clock-control none --launch-count 40000 \
    "${bench[@]}" --output-len 8 --batch-sizes 1 --json /tmp/profiled.json > "$out/ncu.csv" 2> "$out/ncu.err"
ms=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['single']['decode_ms_per_token'])" "$out/plain.json")
python3 profile_decode.py "$out/ncu.csv" "$ms"
