#!/bin/bash
# Session 23: which part of a run costs ~10 us per layer after the first (call 84: runs of 2/4/11/22 layers
# 1.13/1.20/1.23/1.24 ms against 1.02; the run build launched per layer 1.02; only later layers' attention slow).
# Probe binary (probe85.patch): PROBE_COPY_HOLD (the copying warp starts a layer's tiles only once its block
# starts the layer, with the start burst, as a launch per layer does), PROBE_GRID_BARRIER (a grid barrier
# before each later layer's staging).
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export SPARK_DISAGG_PYTHON=python3
B=.carry/bin; R=$OUT/ab85.txt
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u; } | tee $R
steps() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(' '.join('b%d %.4f' % (b['batch'], b['decode_step_ms']) for b in d['batches']), '|', d['setup'].get('layer_ring')[-22:])" $1 2>&1 | tail -1; }
bench() { local label=$1; shift
  env "$@" timeout 60 $B/module01_probe2 bench --random tinyllama-1.1b --dtype bf16 --prompt-len 512 --output-len 64 --batch-sizes 1 \
    --num-requests 0 --max-batched-tokens 4096 --json /tmp/$label.json --svg /tmp/$label.svg > /tmp/$label.log 2>&1
  echo "$label $(steps /tmp/$label.json) [$SECONDS s]" | tee -a $R; }
tl() { local label=$1; shift
  env "$@" timeout 60 $B/module01_probe2 timeline --random tinyllama-1.1b --dtype bf16 --context 576 --layer 11 \
    --json $OUT/$label.json --svg /tmp/$label.svg > $OUT/$label.txt 2>&1; echo "$label rc $? [$SECONDS s]" >> $R; }
round() { bench run1_$1 SPARK_DISAGG_LAYER_RUN=1; bench run22_$1 X=1
  bench hold_$1 SPARK_DISAGG_PROBE_DEFINES=-DPROBE_COPY_HOLD=1
  bench barrier_$1 SPARK_DISAGG_PROBE_DEFINES=-DPROBE_GRID_BARRIER=1
  bench both_$1 "SPARK_DISAGG_PROBE_DEFINES=-DPROBE_COPY_HOLD=1 -DPROBE_GRID_BARRIER=1"; }
round 1
tl tl_hold SPARK_DISAGG_PROBE_DEFINES=-DPROBE_COPY_HOLD=1
tl tl_barrier SPARK_DISAGG_PROBE_DEFINES=-DPROBE_GRID_BARRIER=1
round 2
[ $SECONDS -lt 120 ] && round 3
echo "done [$SECONDS s]" >> $R
