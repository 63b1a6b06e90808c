#!/bin/bash
# Session 22 (short of device time): runs of layers in one launch, the decision first. TinyLlama batch-1 bare
# steps (main's binary, the new one a launch per layer, the new one's default run), the GPU tests, Llama-3-8B,
# the timeline, more rounds while the call has time.
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export SPARK_DISAGG_PYTHON=python3
B=.carry/bin; R=$OUT/ab83.txt
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u; } | tee $R
steps() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(' '.join('b%d %.4f' % (b['batch'], b['decode_step_ms']) for b in d['batches']), '|', d['setup'].get('layer_ring'))" $1 2>&1 | tail -1; }
bench() { local label=$1 bin=$2 model=$3; shift 3
  env "$@" timeout 60 $B/$bin bench --random $model --dtype bf16 --prompt-len 512 --output-len 64 --batch-sizes 1 \
    --num-requests 0 --max-batched-tokens 4096 --json /tmp/$label.json --svg /tmp/$label.svg > /tmp/$label.log 2>&1
  echo "$label $(steps /tmp/$label.json) [$SECONDS s]" | tee -a $R; }
tiny() { bench tiny_old_$1 module01_old tinyllama-1.1b X=1; bench tiny_run1_$1 module01 tinyllama-1.1b SPARK_DISAGG_LAYER_RUN=1
  bench tiny_run_$1 module01 tinyllama-1.1b X=1; }
tiny 1
timeout 120 $B/shared_tests fused_decode_matches_the_reference_forward the_layer_timeline_marks_every_stage_and_changes_no_result \
  --test-threads 1 > $OUT/tests83.txt 2>&1; echo "tests rc $? [$SECONDS s]" >> $R; tail -4 $OUT/tests83.txt >> $R
tiny 2
bench l8_run1_1 module01 llama3-8b SPARK_DISAGG_LAYER_RUN=1; bench l8_run_1 module01 llama3-8b X=1
timeout 60 $B/module01 timeline --random tinyllama-1.1b --dtype bf16 --context 576 --json /tmp/tl_run.json > /tmp/tl_run.log 2>&1
cp /tmp/tl_run.log /tmp/tl_run.json $OUT/ || tail -3 /tmp/tl_run.log >> $R
r=3; while [ $SECONDS -lt 190 ]; do tiny $r; r=$((r+1)); done
[ $SECONDS -lt 215 ] && { timeout 60 $B/shared_tests overlapping_launches_change_no_result --test-threads 1 2>&1 | tail -3 >> $R; }
echo "done [$SECONDS s]" >> $R
