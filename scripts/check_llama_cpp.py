#!/usr/bin/env python3
"""Check that llama.cpp accepts the GGUF files `phi-lsp quantize` writes, and runs them the same.

For each dtype this writes MODEL_DIR as a GGUF file with the phi-lsp binary, loads it with
llama.cpp (through llama-cpp-python), and for every prompt of MODEL_DIR/reference.json compares:

  - llama.cpp's tokenization of the prompt (from the vocabulary embedded in the GGUF file) with
    the reference input_ids (transformers' tokenizer),
  - llama.cpp's logits at every prompt position with transformers' (max |diff|),
  - llama.cpp's 16 greedy tokens (argmax over the tokenizer's ids, as phi-lsp masks the padding
    rows) with transformers' and with `phi-lsp generate --model FILE.gguf` on the same file.

f32 must match transformers' tokens exactly and its logits to 1e-2 (ggml's GELU goes through an
f16 table); quantized files are reported.
Not part of the test suite: llama-cpp-python builds llama.cpp from source (many minutes). Setup:

  python3 -m venv ~/.cache/phi-lsp-llama/venv         # the venv .ci/run makes, if it has run
  CMAKE_ARGS="-DGGML_NATIVE=OFF" ~/.cache/phi-lsp-llama/venv/bin/pip install llama-cpp-python
  cargo build --release -p phi-lsp
  ~/.cache/phi-lsp-llama/venv/bin/python scripts/check_llama_cpp.py   # the committed fixture

Exit code 0 when every check that must hold held, 1 otherwise.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama


def phi_lsp_generate(binary, gguf, tokenizer, prompt, n):
    out = subprocess.run(
        [binary, "generate", "--model", gguf, "--tokenizer", tokenizer, "--prompt", prompt,
         "--max-new-tokens", str(n), "--json"],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["tokens"]


def llama_greedy(llm, ids, n, n_valid, eos):
    """Greedy continuation of ids and the logits at every prompt position."""
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    tokens = []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1][:n_valid])
        token = int(np.argmax(logits))
        tokens.append(token)
        if token == eos:
            break
        llm.eval([token])
    return tokens, prompt_logits


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=os.path.join(root, "tests/fixtures/tiny-phi"))
    parser.add_argument("--phi-lsp", default=os.path.join(root, "target/release/phi-lsp"))
    parser.add_argument("--dtypes", default="f32,f16,q8_0,q4k")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    reference = json.load(open(os.path.join(args.model_dir, "reference.json")))
    tokenizer = os.path.join(args.model_dir, "tokenizer.json")
    eos, n_valid = reference["eos_token_id"], reference["tokenizer_size"]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            gguf = os.path.join(tmp, f"model-{dtype}.gguf")
            subprocess.run([args.phi_lsp, "quantize", "--model", args.model_dir, "--dtype", dtype,
                            "-o", gguf], check=True, capture_output=True)
            # f32 K/V cache (llama.cpp's default is f16), as phi-lsp keeps it on CPU.
            llm = Llama(model_path=gguf, n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                        n_threads=2, type_k=0, type_v=0)
            print(f"{dtype}: llama.cpp loaded {os.path.basename(gguf)} "
                  f"({os.path.getsize(gguf)} bytes, n_vocab {llm.n_vocab()})")
            for case in reference["cases"]:
                prompt = case["prompt"]
                ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
                same_ids = ids == case["input_ids"]
                tokens, logits = llama_greedy(llm, case["input_ids"], args.max_new_tokens, n_valid, eos)
                diff = float(np.abs(logits - np.array(case["logits"], dtype=np.float32)).max())
                ours = phi_lsp_generate(args.phi_lsp, gguf, tokenizer, prompt, args.max_new_tokens)
                expected = case["greedy_tokens"]
                theirs_no_eos = tokens[:-1] if tokens and tokens[-1] == eos else tokens
                def agree(a, b):
                    return "all" if a == b else next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
                print(f"  {prompt[:24]!r:28} tokenization {'same' if same_ids else 'DIFFERENT'}; "
                      f"max |logit - transformers| {diff:.2e}; greedy tokens equal to transformers': "
                      f"{agree(tokens, expected)}, to phi-lsp's: {agree(theirs_no_eos, ours)}")
                if not same_ids:
                    print(f"    llama.cpp ids {ids}\n    reference ids {case['input_ids']}")
                    ok = False
                # ggml's CPU GELU rounds through an f16 lookup table (GGML_GELU_FP16): about 3e-3
                # off transformers' f32 logits on this fixture, where phi-lsp is within 1e-4.
                if dtype == "f32" and (tokens != expected or diff > 1e-2 or theirs_no_eos != ours):
                    print(f"    llama.cpp {tokens}\n    reference {expected}\n    phi-lsp   {ours}")
                    ok = False
            del llm
    print("all required checks held" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
