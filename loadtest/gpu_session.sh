#!/usr/bin/env bash
# The measurements and GPU checks still owed (issues 19, 20), as steps of one script for a device call: each step runs
# under its own time limit, logs to OUT/log.txt, keeps its full output in OUT/<step>.txt and prints its table.
#
#   BUDGET_S=570 LONG_CTX=65536 STEPS="fitests longprobe longchunk long fp8fi" OUT=/somewhere bash loadtest/gpu_session.sh
#   BUDGET_S=570 MIXED_MODES=on TTFT_MODE=engine STEPS="mixed ttft" OUT=... bash loadtest/gpu_session.sh
#   BUDGET_S=570 STEPS="spec tests chaos" OUT=... bash loadtest/gpu_session.sh
#
# Steps (default: all, in this order):
#   variants  the FP8-MMA MLA decode variants against their emulation and beside bf16 (set the fastest correct one
#             as DEFAULT_VARIANT in kernels/mla_decode_gluon_fp8.py)
#   tests     the GPU tests of the FP8 KV cache and the FP8-MMA kernel, and the speculative graphs; the glue kernels
#             (MLA prep's FP8 rows) on CUDA
#   ttft      bench_ttft on the V3-shape model: in process and over HTTP, 16 to 16k tokens, the 8k / 16k cached prefix
#   mixed     bench_mixed_chunk: p99 inter-token latency of 32 streams while 16k-token prompts arrive, for each
#             CHUNK[:MIXED_CHUNK_SIZE] of $MIXED_RUNS (default 512 8192:512 8192:256), $MIXED_MODES (off on)
#   long      bench_one_batch at 32k and 64k context ($LONG_CTX), batch 1 and 32, bf16 and fp8 KV cache
#   longprobe loadtest/probe_long_context.py: the MLA extend kernels over one 32k-65k-token chunk (which faults)
#   spec      bench_speculative on the trained default model, batch 1 and 32, 1/1/2 .. 3/1/4 (issue 19's targets)
#   fitests   the FP8 KV cache on the FlashInfer backend (kernel vs torch, graphs vs eager) and on Triton
#   fp8fi     bench_mla_gluon --section fp8-fi: FlashInfer over bf16 and e4m3 caches beside our kernels
#   longchunk bench_one_batch with one 65,536-token prefill step through the whole model (MAX_CUDA_STEP_TOKENS)
#   chaos     loadtest/chaos.py against the default model on the GPU (CUDA graphs, overlap, speculation, mixed chunks)
#
# BUDGET_S (e.g. 570 under a 600 s device call) cuts each step's limit to the time left and skips the steps that would
# start with under a minute, so one call ends with every finished step's output instead of being killed mid-step.
#
# What the GPU image lacks travels as wheels in .whl/ (../shared/tools/gpu-wheels.sh .whl, plus pytest, pluggy,
# iniconfig, pytest-timeout and httptools for Python 3.12); the checkout is imported as `baleen` through a symlink.
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
fi
mkdir -p /tmp/pkgroot && ln -sfn "$PWD" /tmp/pkgroot/baleen
export PYTHONPATH=/tmp/pkgroot:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its output, print its tables and its tail
  local name=$1 limit=$2; shift 2
  if [ -n "${BUDGET_S:-}" ]; then  # the whole call's budget (a device call's limit): cut a step to what is left
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 60 ]; then log "$name: skipped, ${left} s of BUDGET_S left"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  log "$name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - t0)) s"
  grep -E "^\||^#|passed|failed|error" "$OUT/$name.txt" | tail -60 | tee -a "$LOG"
  [ $rc -eq 0 ] || tail -25 "$OUT/$name.txt" | tee -a "$LOG"
}

for s in ${STEPS:-variants tests ttft mixed long longprobe chaos}; do
  case $s in
    variants) step variants 300 python3 -P loadtest/kernel_bench/bench_mla_gluon.py --section fp8-variants ;;
    tests) step tests 420 python3 -P -m pytest -q -m gpu -o addopts="" -p no:cacheprovider \
      tests/actors/test_kv_cache_dtype.py tests/kernels/test_mla_decode_gluon_fp8.py tests/model/test_spec_graphs.py \
      tests/model/test_fp8_kv_cache.py tests/kernels/test_fused_moe.py tests/kernels/test_mla_decode_gluon.py \
      tests/kernels/test_fp8_gemm.py
      step glue 180 python3 -P -m pytest -q -o addopts="" -p no:cacheprovider tests/kernels/test_glue_kernels.py \
        tests/kernels/test_act_quant.py ;;
    ttft) step ttft 420 python3 -P loadtest/bench_ttft.py --preset v3-shape --device cuda --mode ${TTFT_MODE:-both} \
      --lengths ${TTFT_LENGTHS:-16 256 2048 16384} --cached-prefix 8192 16384 --context-length 20000 ;;
    mixed)  # chunk 1024 gave p99 5.4x the quiet median with the flag (2026-12-07); the target needs ~1 decode step a
      # mixed step: RUN = CHUNK[:MIXED_CHUNK_SIZE] (a whole chunk when no stream decodes, MIXED beside decodes)
      for run in ${MIXED_RUNS:-512 8192:512 8192:256}; do
        chunk=${run%%:*}; mixed=${run#*:}
        extra=(); [ "$mixed" != "$run" ] && extra=(--mixed-chunk-size "$mixed")
        step "mixed_${run/:/_}" 200 python3 -P loadtest/bench_mixed_chunk.py --preset v3-shape --device cuda \
          --context-length 20000 --streams 32 --long-prompt-len 16384 --chunked-prefill-size "$chunk" "${extra[@]}" \
          --modes ${MIXED_MODES:-off on}
      done ;;
    long)
      for ctx in ${LONG_CTX:-32768 65536}; do
        for kv in bf16 fp8_e4m3; do
          step "long_${ctx}_${kv}" 200 python3 -P loadtest/bench_one_batch.py --preset v3-shape --batch-sizes 1 32 \
            --context-len "$ctx" --prefill-tokens 16384 --kv-cache-dtype "$kv"
        done
      done ;;
    spec)  # issue 19 on the trained model: medians of 5 timed batches a configuration (batch 1 moved 1.06-1.60x)
      step spec 300 python3 -P loadtest/bench_speculative.py --device cuda --batch-sizes 1 32 --steps 1 2 3 \
        --max-new-tokens 128
      # grammars under speculation: their steps now replay the verify graphs (only the draft loop runs eagerly)
      step specgrammar 150 python3 -P loadtest/bench_speculative.py --device cuda --grammar --steps 1 3 ;;
    longprobe) step longprobe 300 python3 -P loadtest/probe_long_context.py ;;
    fitests)  # the FP8 cache on FlashInfer: its kernel against torch at 512 + 64 x 128 heads, graphs against eager
      step fitests 300 python3 -P -m pytest -q -m gpu -o addopts="" -p no:cacheprovider \
        tests/model/test_fp8_kv_cache.py tests/actors/test_kv_cache_dtype.py \
        "tests/model/test_gpu_engine.py::test_cuda_graph_decode_equals_eager" \
        "tests/model/test_spec_graphs.py::test_flashinfer_runner_captures_its_speculative_steps_on_the_triton_kernels" ;;
    fp8fi) step fp8fi 200 python3 -P loadtest/kernel_bench/bench_mla_gluon.py --section fp8-fi ;;
    longchunk)  # one 65,536-token step through the whole model (MoE, FP8 GEMMs, act_quant, MLA extend): what
      # MAX_CUDA_STEP_TOKENS guards against until it passes
      step longchunk 300 python3 -P loadtest/bench_one_batch.py --preset v3-shape --batch-sizes 1 \
        --context-len 65536 --prefill-tokens 65536 ;;
    chaos)
      step chaos_spec 240 python3 -P loadtest/chaos.py --seconds 90 --concurrency 16 --serve -- \
        --tool-call-parser deepseekv3 --speculative-algorithm EAGLE --enable-mixed-chunk --cuda-graph-max-bs 32
      step chaos_fp8kv 240 python3 -P loadtest/chaos.py --seconds 90 --concurrency 16 --seed 1 --serve -- \
        --tool-call-parser deepseekv3 --kv-cache-dtype fp8_e4m3 --chat-template deepseek-r1 \
        --reasoning-parser deepseek-r1 ;;
    *) log "unknown step $s" ;;
  esac
done
log "done"
