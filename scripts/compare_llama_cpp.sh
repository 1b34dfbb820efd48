#!/usr/bin/env bash
# phi-lsp against llama.cpp (and, given a build, ik_llama.cpp) on the files users download: GGUF
# files made by llama.cpp's own converter and `llama-quantize`, on this machine, one sitting.
#
# Random weights of Phi-1's exact shape (f16 safetensors, seed 0) are written once; llama.cpp's
# `convert_hf_to_gguf.py` turns them into an F16 GGUF file and its `llama-quantize` into Q8_0 and
# Q4_K_M (the file most people download: q4k with q6k for `output` and half the layers' `attn_v`
# and `ffn_down`). Each file is timed, ROUNDS times alternating between the engines, by
#   - llama.cpp's llama-bench (flash attention off and on),
#   - ik_llama.cpp's llama-bench where IK_LLAMA_BENCH names one (flash attention off/on x run-time
#     repack -rtr off/on; built from its source with `cmake -DGGML_NATIVE=ON`, targets
#     llama-bench),
#   - `phi-lsp bench --model FILE`,
# all on THREADS threads (default 2): prefill of a 512-token prompt and decode of 32 tokens after
# a 512-token prompt (llama.cpp's `-n 32 -d 512`, ik_llama.cpp's `-gp 512,32`; phi-lsp's decode
# runs at context 512), in tok/s.
# The last lines are one table: each engine's best setting per figure (median over the rounds),
# phi-lsp's ratio to each, and the machine. Not part of the test suite: building llama.cpp takes
# ~10 minutes on 2 cores.
#
# llama.cpp is built natively (-DGGML_NATIVE=ON) from the sources vendored in llama-cpp-python's
# source distribution (0.3.36). It repacks weights as it does by default, except on CPUs with AMX,
# where ggml's repacked AMX path died with SIGILL on one of this project's machines: there it runs
# with `--repack 0`. REPACK=0 or REPACK=1 overrides.
#
#   scripts/compare_llama_cpp.sh [WORK_DIR]    # default /tmp/phi-lsp-llama
#   env: THREADS (2), ROUNDS (2), FILES ("F16 Q8_0 Q4_K_M"), IK_LLAMA_BENCH, REPACK
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${1:-/tmp/phi-lsp-llama}
threads=${THREADS:-2}
rounds=${ROUNDS:-2}
files=${FILES:-F16 Q8_0 Q4_K_M}
tokenizer=$root/assets/phi-1/tokenizer.json
config=$root/assets/phi-1/config.json
mkdir -p "$work"

# Python for the random weights and llama.cpp's converter (which imports torch).
if [ ! -x "$work/venv/bin/python" ] || ! "$work/venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q numpy safetensors cmake ninja torch transformers sentencepiece
fi
py=$work/venv/bin/python

src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
if [ ! -d "$src" ]; then
    (cd "$work" && "$work/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d sdist)
    tar -xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
fi
bench=$work/build/bin/llama-bench
quantize=$work/build/bin/llama-quantize
if [ ! -x "$bench" ] || [ ! -x "$quantize" ]; then
    PATH=$work/venv/bin:$PATH cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    PATH=$work/venv/bin:$PATH cmake --build "$work/build" --target llama-bench llama-quantize -j "$(nproc)"
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

# llama.cpp's files, made by llama.cpp.
[ -f "$work/phi1-F16.gguf" ] || "$py" "$src/convert_hf_to_gguf.py" "$model" --outtype f16 --outfile "$work/phi1-F16.gguf"
for type in Q8_0 Q4_K_M; do
    [ -f "$work/phi1-$type.gguf" ] || "$quantize" "$work/phi1-F16.gguf" "$work/phi1-$type.gguf" "$type"
done

cargo build --release -p phi-lsp
phi=$root/target/release/phi-lsp
if [ -z "${REPACK:-}" ]; then
    if grep -qw amx_tile /proc/cpuinfo; then REPACK=0; else REPACK=1; fi
fi
results=$work/results.jsonl
: > "$results"
for round in $(seq "$rounds"); do
    for type in $files; do
        file=$work/phi1-$type.gguf
        echo "=== round $round, $type: llama.cpp (load average $(cut -d' ' -f1 /proc/loadavg))"
        "$bench" -m "$file" -t "$threads" -p 512 -n 32 -d 0,512 -fa 0,1 -r 3 --repack "$REPACK" -o jsonl |
            sed "s/^/{\"engine\": \"llama.cpp\", \"file\": \"$type\", \"row\": /; s/\$/}/" >> "$results"
        if [ -n "${IK_LLAMA_BENCH:-}" ]; then
            echo "=== round $round, $type: ik_llama.cpp (load average $(cut -d' ' -f1 /proc/loadavg))"
            for rtr in 0 1; do
                "$IK_LLAMA_BENCH" -m "$file" -t "$threads" -p 512 -n 0 -gp 512,32 -fa 0,1 -rtr "$rtr" -r 3 -o jsonl |
                    sed "s/^/{\"engine\": \"ik_llama.cpp\", \"file\": \"$type\", \"rtr\": $rtr, \"row\": /; s/\$/}/" >> "$results"
            done
        fi
        echo "=== round $round, $type: phi-lsp (load average $(cut -d' ' -f1 /proc/loadavg))"
        "$phi" bench --model "$file" --tokenizer "$tokenizer" --threads "$threads" --repeats 3 \
            --decode-tokens 32 --skip-server --json 2>/dev/null |
            sed "s/^/{\"engine\": \"phi-lsp\", \"file\": \"$type\", \"row\": /; s/\$/}/" >> "$results"
    done
done

"$py" - "$results" <<'EOF'
import json, statistics, subprocess, sys
from collections import defaultdict

# (engine, file, setting) -> figure -> [tok/s per round]
runs = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    r = json.loads(line)
    row, engine, file = r["row"], r["engine"], r["file"]
    if engine == "phi-lsp":
        runs[(engine, file, "")]["prefill"].append(row["prefill_tok_s"])
        runs[(engine, file, "")]["decode"].append(row["decode_tok_s"])
        continue
    setting = f"fa {'on' if row.get('flash_attn') else 'off'}"
    if "rtr" in r:
        setting += f", rtr {'on' if r['rtr'] else 'off'}"
    prompt, gen, depth = row.get("n_prompt"), row.get("n_gen"), row.get("n_depth", 0)
    if prompt == 512 and gen == 0 and depth == 0:
        runs[(engine, file, setting)]["prefill"].append(row["avg_ts"])
    elif (engine, prompt, gen, depth) in [("llama.cpp", 0, 32, 512), ("ik_llama.cpp", 512, 32, 0)]:
        # llama.cpp: 32 tokens at depth 512; ik_llama.cpp's -gp 512,32: the 32 after the prompt.
        runs[(engine, file, setting)]["decode"].append(row["avg_ts"])


def best(engine, file, figure):
    """The best setting's median over the rounds: (tok/s, setting), or None."""
    cands = [(statistics.median(figs[figure]), setting)
             for (e, f, setting), figs in runs.items() if e == engine and f == file and figs[figure]]
    return max(cands) if cands else None


lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
fields = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in lscpu.splitlines() if ":" in l)}
flags = set(fields.get("Flags", "").split())
wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_int8"]
print(f"\nmachine: {fields.get('Model name')} (family {fields.get('CPU family')}, model {fields.get('Model')}), "
      f"{fields.get('CPU(s)')} CPUs; {' '.join(f for f in wanted if f in flags)}")
engines = ["llama.cpp"] + (["ik_llama.cpp"] if any(k[0] == "ik_llama.cpp" for k in runs) else [])
files = sorted({k[1] for k in runs}, key=["F16", "Q8_0", "Q4_K_M"].index)
for figure in ["prefill", "decode"]:
    print(f"\n{figure} (tok/s, median of the rounds; best setting)")
    print("| file | phi-lsp | " + " | ".join(f"{e} | phi-lsp / {e}" for e in engines) + " |")
    print("|---" * (2 + 2 * len(engines)) + "|")
    for file in files:
        ours = best("phi-lsp", file, figure)
        cells = [file, f"{ours[0]:.1f}" if ours else "-"]
        for e in engines:
            theirs = best(e, file, figure)
            cells.append(f"{theirs[0]:.1f} ({theirs[1]})" if theirs else "-")
            cells.append(f"{ours[0] / theirs[0]:.2f}" if ours and theirs else "-")
        print("| " + " | ".join(cells) + " |")
EOF
