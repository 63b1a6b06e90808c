#!/bin/bash
# Session 23: why a run of layers is slower (TinyLlama 1.15 ms against 0.92, H200, call 83). Steps for runs of
# 1, 2, 4, 11 and 22 layers and for the run build launched one layer at a time (probe binary); timelines of
# the first and a later layer of a run against one layer a launch.
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export SPARK_DISAGG_PYTHON=python3
B=.carry/bin; R=$OUT/ab84.txt
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u; } | tee $R
steps() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(' '.join('b%d %.4f' % (b['batch'], b['decode_step_ms']) for b in d['batches']), '|', d['setup'].get('layer_ring')[-22:])" $1 2>&1 | tail -1; }
bench() { local label=$1 bin=$2; shift 2
  env "$@" timeout 60 $B/$bin bench --random tinyllama-1.1b --dtype bf16 --prompt-len 512 --output-len 64 --batch-sizes 1 \
    --num-requests 0 --max-batched-tokens 4096 --json /tmp/$label.json --svg /tmp/$label.svg > /tmp/$label.log 2>&1
  echo "$label $(steps /tmp/$label.json) [$SECONDS s]" | tee -a $R; }
tl() { local label=$1 bin=$2 layer=$3; shift 3
  env "$@" timeout 60 $B/$bin timeline --random tinyllama-1.1b --dtype bf16 --context 576 --layer $layer \
    --json $OUT/$label.json --svg /tmp/$label.svg > $OUT/$label.txt 2>&1; echo "$label rc $? [$SECONDS s]" >> $R; }
round() { for n in 1 2 4 11 22; do bench r${n}_$1 module01 SPARK_DISAGG_LAYER_RUN=$n; done
  bench probe1_$1 module01_probe SPARK_DISAGG_LAYER_RUN=1 SPARK_DISAGG_PROBE_RUN_BUILD=1; }
round 1
tl tl_run1_l11 module01 11 SPARK_DISAGG_LAYER_RUN=1
tl tl_run22_l0 module01 0 X=1
tl tl_run22_l11 module01 11 X=1
tl tl_probe1_l11 module01_probe 11 SPARK_DISAGG_LAYER_RUN=1 SPARK_DISAGG_PROBE_RUN_BUILD=1
tl tl_run2_l11 module01 11 SPARK_DISAGG_LAYER_RUN=2
round 2
[ $SECONDS -lt 150 ] && round 3
echo "done [$SECONDS s]" >> $R
