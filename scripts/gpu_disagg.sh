#!/usr/bin/env bash
# Prefill and decode on GPUs, KV moved GPU to GPU (issue 12; book chapters 4 and 6).
#
# Runs on a GPU host after `cargo build --release -p module04_rdma -p module06_dynamo`
# (or with BIN pointing at those binaries built elsewhere):
#   1. the two-process CUDA IPC test, if its binary is given (IPC_TEST);
#   2. module 4's bench with the cuda-ipc backend (one process, GPU memory);
#   3. module 6's bench: one aggregated GPU vs prefill→decode with KV
#      layer-wise over TCP (host-staged) vs one-sided CUDA IPC writes
#      (GPU to GPU), same load, one run.
# Prefill runs on cuda:0 and decode on cuda:1 when two GPUs are visible;
# with one GPU both processes share it (the IPC copy is then device-local).
#
#   MODEL=DIR      a Hugging Face model directory (default: a random-weight
#                  TinyLlama-1.1B made from TOKENIZER's tokenizer files)
#   TOKENIZER=DIR  tokenizer.json (+ tokenizer_config.json, chat_template.jinja)
#   OUT=DIR        where the JSON results go (default results/gpu)
set -euo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
# Multicast stays off on shared GPU hosts (NCCL is not used here, but a
# library that loads it must not turn it on).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

gpus=$(nvidia-smi -L | wc -l)
nvidia-smi -L
prefill_device=cuda:0
decode_device=cuda:$((gpus > 1 ? 1 : 0))
echo "prefill on $prefill_device, decode on $decode_device ($gpus GPU(s))"

if [[ -n "${IPC_TEST:-}" ]]; then
    "$IPC_TEST" --exact cuda_ipc_writes_land_in_another_process_gpu_memory --nocapture
fi

"$BIN/module04_rdma" bench --backend cuda-ipc --json "$OUT/module04_bench_cuda_ipc.json"

if [[ -z "${MODEL:-}" ]]; then
    MODEL=${TMPDIR:-/tmp}/spark-disagg-tinyllama-random
    [[ -f "$MODEL/config.json" ]] ||
        python3 "$(dirname "$0")/random_hf_model.py" --tokenizer "${TOKENIZER:?set MODEL or TOKENIZER}" \
            --out "$MODEL" --preset tinyllama-1.1b
fi

"$BIN/module06_dynamo" bench --model "$MODEL" \
    --prefill-device "$prefill_device" --decode-device "$decode_device" \
    --transfer-backend cuda-ipc --kv-cache-gb 8 \
    --only baseline,disagg-tcp,disagg-onesided \
    --conversations "${CONVERSATIONS:-32}" --turns 3 --rate "${RATE:-4}" --max-tokens "${MAX_TOKENS:-64}" \
    --slo-ttft-ms 200 --slo-itl-ms 30 \
    --json "$OUT/module06_bench_gpu.json"
