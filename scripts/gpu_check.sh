#!/usr/bin/env bash
# The GPU proof (issue 24, item 4), for a machine with an NVIDIA GPU, the CUDA toolkit (nvcc) and
# its driver: builds with `--features cuda` and runs, on `cuda` (or $PHI_GPU_DEVICE, e.g. cuda:1):
#   1. the reference tests in f32: logits at every position within 1e-4 of transformers', chunked
#      prefill, greedy tokens, the KV cache against fresh computations (engine/tests/reference.rs)
#   2. greedy tokens in f16 against the fixture's transformers continuation (same file)
#   3. the quantized types q8_0 and q4k: a greedy generation of synthetic Phi-1 weights each; a
#      refusal is reported as such (with the error, which must name the supported dtypes)
#   4. `phi-lsp bench` of synthetic Phi-1 in f16: prefill, decode and keystrokes in process, then
#      keystrokes through one real server session started with `--device cuda`
# then prints one summary, one line per step. Meant to take under 8 minutes on one GPU (most of it
# the first build of candle's CUDA kernels); each step has its own time limit. Exit status 0 when
# every step passed (a quantized type refused with a clear error counts as passed, and is said).
# Usage: scripts/gpu_check.sh   (PHI_GPU_DEVICE, PHI_GPU_LOG=folder for the logs, default a temp dir)
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${PHI_GPU_DEVICE:-cuda}
LOGS=${PHI_GPU_LOG:-$(mktemp -d)}
mkdir -p "$LOGS"
BIN=target/release/phi-lsp
START=$SECONDS
SUMMARY=()
FAILED=0

# step NAME LIMIT_S COMMAND...: runs it with its output in $LOGS/NAME.log, records the outcome.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 5 "$LOGS/$name.log" | sed 's/^/   /'
  if [ $rc -eq 0 ]; then
    SUMMARY+=("PASS  $name ($((SECONDS - start)) s)")
  else
    [ $rc -eq 124 ] && echo "   (timed out after $limit s)"
    SUMMARY+=("FAIL  $name ($((SECONDS - start)) s, exit $rc, log $LOGS/$name.log)")
    FAILED=1
  fi
  return $rc
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "   no nvidia-smi"
nvcc --version 2>&1 | tail -n 1 || echo "   no nvcc on PATH: candle-kernels cannot build"

step build 420 cargo build --release --features cuda -p phi-lsp ||
  { printf '%s\n' "== summary (device $DEVICE, $((SECONDS - START)) s)" "${SUMMARY[@]}"; exit 1; }

export PHI_ENGINE_TEST_DEVICE=$DEVICE
PHI_ENGINE_TEST_DTYPE=f32 step reference-f32 300 \
  cargo test --release -p phi-engine --features cuda --test reference -- --test-threads 1
grep -h "max |logit" "$LOGS/reference-f32.log" | sed 's/^/   /'
PHI_ENGINE_TEST_DTYPE=f16 step greedy-f16 120 \
  cargo test --release -p phi-engine --features cuda --test reference greedy_tokens_match_transformers_generate
unset PHI_ENGINE_TEST_DEVICE

# A quantized type either generates on the GPU or is refused with an error that names the dtypes
# the GPU takes; anything else (a crash, an unclear error) fails.
for dtype in q8_0 q4k; do
  name=quantized-$dtype
  echo "== $name: $BIN generate --model synthetic:phi-1 --device $DEVICE --dtype $dtype"
  start=$SECONDS
  timeout 120 "$BIN" generate --model synthetic:phi-1 --device "$DEVICE" --dtype "$dtype" \
    --prompt "def fibonacci(n):" --max-new-tokens 16 --json >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   /'
  if [ $rc -eq 0 ] && grep -q '"tokens"' "$LOGS/$name.log"; then
    SUMMARY+=("PASS  $name: generates on $DEVICE ($((SECONDS - start)) s)")
  elif [ $rc -ne 124 ] && grep -qi "f16" "$LOGS/$name.log" && grep -qi "f32" "$LOGS/$name.log"; then
    SUMMARY+=("PASS  $name: refused with a clear error: $(tail -n 1 "$LOGS/$name.log")")
  else
    SUMMARY+=("FAIL  $name (exit $rc, log $LOGS/$name.log)")
    FAILED=1
  fi
done

if step bench-f16 300 "$BIN" bench --synthetic phi-1 --device "$DEVICE" --dtype f16 --repeats 2 \
  --keystrokes 8 --json; then
  # The one JSON line: the figures the summary states.
  line=$(grep '^{' "$LOGS/bench-f16.log" | tail -n 1)
  figures=$(python3 - "$line" <<'EOF' 2>/dev/null
import json, sys
r = json.loads(sys.argv[1])
s = r.get("server") or {}
print(f"prefill {r.get('prefill_tok_s')} tok/s, decode {r.get('decode_tok_s')} tok/s, "
      f"keystroke {r.get('keystroke_ms_cached')} ms cached; server --device: load {s.get('load_s')} s, "
      f"p50 {s.get('p50_ms')} ms, p90 {s.get('p90_ms')} ms over {s.get('keystrokes')} keystrokes")
EOF
  )
  SUMMARY+=("      bench-f16: ${figures:-see the log}")
fi

echo "== summary (device $DEVICE, $((SECONDS - START)) s, logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
