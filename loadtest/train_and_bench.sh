#!/usr/bin/env bash
# The default model's device run, in one call: train it (model/train.py), then serve it in BF16 and in block FP8
# and run bench_accuracy.py against each (with MTP_DEVICE set, also the MTP agreement on the BF16 checkpoint).
#
#   OUT=/somewhere bash loadtest/train_and_bench.sh [TRAIN_SECONDS]
#   TRAIN_ARGS="--init model/data --mixture finetune --lr 1e-3" OUT=... bash loadtest/train_and_bench.sh 150  # stage 2
#
# Writes OUT/trained-* (copy them into model/data/), loss.csv, train.json, acc_bf16.json, acc_fp8.json and log.txt
# (eight files: what a device call returns). Server dependencies the GPU image lacks travel as wheels in .whl/.
set -u
BUDGET=${1:-330}
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
WORK=$(mktemp -d)
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || log "editable install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

log "training for ${BUDGET}s"
timeout $((BUDGET + 90)) python3 -m baleen.model.train "$WORK/train" --time-budget "$BUDGET" --workers 12 ${TRAIN_ARGS:-} \
  >"$WORK/train.log" 2>&1
log "train exit $?"
grep -v "^step=" "$WORK/train.log" | tail -40 >>"$LOG"
cp "$WORK"/train/trained-* "$WORK"/train/loss.csv "$WORK"/train/train.json "$OUT"/ 2>>"$LOG"
ls "$WORK"/train/trained-weights-* >/dev/null 2>&1 || { log "no trained weights"; tail -20 "$WORK/train.log" >>"$LOG"; exit 1; }
cp "$WORK"/train/trained-* model/data/

serve_and_bench() {  # $1: bf16 | fp8
  local fp8=False; [ "$1" = fp8 ] && fp8=True
  local path
  path=$(python3 -c "from baleen.model.make_model import default_model_path; print(default_model_path(fp8=$fp8))")
  log "$1 checkpoint at $path: $(du -sh "$path" | cut -f1)"
  python3 -m baleen.launch_server --model-path "$path" --port 30000 --chat-template deepseek-r1 \
    --reasoning-parser deepseek-r1 --tool-call-parser deepseekv3 ${SERVE_ARGS---cuda-graph-max-bs 32} >"$WORK/server_$1.log" 2>&1 &
  local pid=$!
  local t0=$SECONDS
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:30000/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 $pid 2>/dev/null || [ $((SECONDS - t0)) -gt 90 ]; then
      log "$1 server did not come up"; tail -30 "$WORK/server_$1.log" >>"$LOG"; kill $pid 2>/dev/null; return
    fi
    sleep 1
  done
  log "$1 server up after $((SECONDS - t0))s"
  local mtp=(); [ "$1" = bf16 ] && [ -n "${MTP_DEVICE:-}" ] && mtp=(--mtp-model-path "$path" --mtp-device "$MTP_DEVICE")
  timeout "${BENCH_TIMEOUT:-90}" python3 loadtest/bench_accuracy.py --num "${NUM:-20}" --concurrency 32 --json "$OUT/acc_$1.json" "${mtp[@]}" \
    >"$WORK/bench_$1.log" 2>&1
  log "$1 bench exit $?"
  grep "^|" "$WORK/bench_$1.log" >>"$LOG"
  tail -5 "$WORK/bench_$1.log" >>"$LOG"
  kill -TERM $pid; wait $pid
  grep -iE "error|traceback" "$WORK/server_$1.log" | head -10 >>"$LOG"
}
for variant in ${VARIANTS:-bf16 fp8}; do serve_and_bench "$variant"; done
log "done"
