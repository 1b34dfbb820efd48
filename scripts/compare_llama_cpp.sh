#!/usr/bin/env bash
# phi-lsp and llama.cpp on the same GGUF files, on this machine, one after the other.
#
# Random weights of Phi-1's exact shape (f16 safetensors, seed 0) are written once, `phi-lsp
# quantize` turns them into q4k, q8_0 and f16 GGUF files in llama.cpp's phi2 layout, and each file
# is timed by llama.cpp's llama-bench (prefill 512; decode 32 tokens at depth 0 and 512, flash
# attention off and on) and by `phi-lsp bench --model FILE` (prefill 512; decode at context 512),
# both on THREADS threads (default 2). Not part of the test suite: building llama.cpp takes ~10
# minutes on 2 cores.
#
# llama-bench is built natively (-DGGML_NATIVE=ON) from the llama.cpp sources vendored in
# llama-cpp-python's source distribution. It repacks weights as it does by default, except on CPUs
# with AMX, where ggml's repacked AMX path died with SIGILL on one of this project's machines: there
# it runs with `--repack 0`. REPACK=0 or REPACK=1 overrides.
#
#   scripts/compare_llama_cpp.sh [WORK_DIR]      # default /tmp/phi-lsp-llama; DTYPES="q4k q8_0 f16"
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${1:-/tmp/phi-lsp-llama}
threads=${THREADS:-2}
tokenizer=${TOKENIZER:-$root/assets/phi-1/tokenizer.json}
config=${CONFIG:-$root/assets/phi-1/config.json}
mkdir -p "$work"
for f in "$tokenizer" "$config"; do
    [ -f "$f" ] || { echo "missing $f (set TOKENIZER / CONFIG)" >&2; exit 2; }
done

if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q numpy safetensors cmake ninja
fi
py=$work/venv/bin/python

bench=$work/build/bin/llama-bench
if [ ! -x "$bench" ]; then
    (cd "$work" && "$work/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d sdist)
    tar -xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
    PATH=$work/venv/bin:$PATH cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    PATH=$work/venv/bin:$PATH cmake --build "$work/build" --target llama-bench -j "$(nproc)"
fi

model=$work/phi1-random
if [ ! -f "$model/model.safetensors" ]; then
    mkdir -p "$model"
    cp "$config" "$model/config.json"
    cp "$tokenizer" "$model/tokenizer.json"
    (cd "$model" && "$py" - <<'EOF'
# Random weights of Phi-1's exact shape (std 0.02, norms ~1), f16: for speed comparisons only.
import json
import numpy as np
from safetensors.numpy import save_file

cfg = json.load(open("config.json"))
h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
rng = np.random.default_rng(0)
tensors = {}


def add(name, shape, mean=0.0, std=0.02):
    tensors[name] = (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)


add("model.embed_tokens.weight", (v, h))
for layer in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{layer}"
    for m, out, inp in [("self_attn.q_proj", h, h), ("self_attn.k_proj", h, h), ("self_attn.v_proj", h, h),
                        ("self_attn.dense", h, h), ("mlp.fc1", i, h), ("mlp.fc2", h, i)]:
        add(f"{p}.{m}.weight", (out, inp))
        add(f"{p}.{m}.bias", (out,), std=0.01)
    add(f"{p}.input_layernorm.weight", (h,), 1.0)
    add(f"{p}.input_layernorm.bias", (h,), std=0.01)
add("model.final_layernorm.weight", (h,), 1.0)
add("model.final_layernorm.bias", (h,), std=0.01)
add("lm_head.weight", (v, h))
add("lm_head.bias", (v,), std=0.01)
save_file(tensors, "model.safetensors")
EOF
    )
fi

cargo build --release -p phi-lsp
phi=$root/target/release/phi-lsp
lscpu | grep -E "Model name|^CPU\(s\)"
if [ -z "${REPACK:-}" ]; then
    if grep -qw amx_tile /proc/cpuinfo; then REPACK=0; else REPACK=1; fi
fi
echo "llama-bench --repack $REPACK"
for dtype in ${DTYPES:-q4k q8_0 f16}; do
    file=$work/phi1-$dtype.gguf
    [ -f "$file" ] || "$phi" quantize --model "$model" --dtype "$dtype" -o "$file"
    echo "=== $dtype: llama.cpp (llama-bench, $threads threads)"
    "$bench" -m "$file" -t "$threads" -p 512 -n 32 -d 0,512 -fa 0,1 -r 3 --repack "$REPACK" -o md
    echo "=== $dtype: phi-lsp (bench, $threads threads)"
    "$phi" bench --model "$file" --tokenizer "$tokenizer" --threads "$threads" --repeats 3 \
        --decode-tokens 32 --skip-server --json 2>/dev/null |
        "$py" -c 'import json, sys
keys = ["dtype", "prefill_tok_s", "first_token_ms_16", "decode_tok_s", "bandwidth_gb_s",
        "decode_ceiling_ratio", "peak_rss_bytes"]
for line in sys.stdin:
    row = json.loads(line)
    print({k: row.get(k) for k in keys})'
done
