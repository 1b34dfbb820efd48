#!/usr/bin/env python3
"""Check `phi-lsp generate` against the greedy reference that make_fixture.py recorded.

For each case in MODEL/reference.json it runs

  BIN generate --model MODEL --prompt PROMPT --max-new-tokens N --json [EXTRA ...]

(N is the reference's max_new_tokens, 16), reads the one JSON object the binary prints on stdout,
{"prompt_tokens": [...], "tokens": [...], "text": "..."}, and compares prompt_tokens with the
reference's input_ids and tokens with its greedy_tokens. transformers' generate keeps the eos it
stopped at as the last token; the binary may leave it out, so a reference equal to the binary's
tokens plus [eos] also passes. A differing text is reported but decides nothing.

Prints one PASS/FAIL line per case and exits non-zero if any case fails. Needs only the Python
standard library.

Run (from the repository root):

  python scripts/check_generate.py --model tests/fixtures/tiny-phi --bin target/release/phi-lsp
  python scripts/check_generate.py --model /tmp/phi-h128 --bin target/release/phi-lsp --extra=--device=cpu
"""

import argparse
import json
import os
import subprocess
import sys


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder made by scripts/make_fixture.py")
    parser.add_argument("--bin", required=True, help="path to the phi-lsp binary")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more argument for `phi-lsp generate` (repeatable)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    return parser.parse_args()


def run_generate(args, prompt, max_new_tokens):
    """Returns (parsed JSON object, None) or (None, reason)."""
    command = [args.bin, "generate", "--model", args.model, "--prompt", prompt,
               "--max-new-tokens", str(max_new_tokens), "--json", "--dtype", "f32", *args.extra]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"could not run {args.bin}: {error}"
    if result.returncode != 0:
        return None, f"exit status {result.returncode}; stderr: {result.stderr.strip()[-2000:]}"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        return None, f"no output on stdout; stderr: {result.stderr.strip()[-2000:]}"
    try:
        output = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        return None, f"last stdout line is not JSON ({error}): {lines[-1][:500]!r}"
    if not isinstance(output, dict) or "prompt_tokens" not in output or "tokens" not in output:
        return None, f"expected an object with prompt_tokens and tokens, got {lines[-1][:500]!r}"
    return output, None


def tokens_match(ours, expected, eos_id):
    if ours == expected:
        return True
    # generate keeps the eos it stopped at; the binary may drop it
    return bool(expected) and expected[-1] == eos_id and ours + [eos_id] == expected


def main():
    args = parse_args()
    with open(os.path.join(args.model, "reference.json"), encoding="utf-8") as file:
        reference = json.load(file)
    eos_id = reference["eos_token_id"]
    max_new_tokens = reference.get("max_new_tokens", 16)

    n_failed = 0
    for case_idx, case in enumerate(reference["cases"]):
        label = f"case {case_idx} {case['prompt'][:40]!r}"
        output, reason = run_generate(args, case["prompt"], max_new_tokens)
        problems = []
        if output is None:
            problems.append(reason)
        else:
            if output["prompt_tokens"] != case["input_ids"]:
                problems.append(f"prompt_tokens {output['prompt_tokens']} != input_ids {case['input_ids']}")
            if not tokens_match(output["tokens"], case["greedy_tokens"], eos_id):
                problems.append(f"tokens {output['tokens']} != greedy_tokens {case['greedy_tokens']}")
        if problems:
            n_failed += 1
            print(f"FAIL {label}")
            for problem in problems:
                print(f"     {problem}")
        else:
            print(f"PASS {label}")
        if output is not None and output.get("text") != case["greedy_text"]:
            print(f"     note: text {output.get('text')!r} != greedy_text {case['greedy_text']!r}")

    n_cases = len(reference["cases"])
    print(f"{n_cases - n_failed}/{n_cases} cases passed")
    sys.exit(1 if n_failed else 0)


if __name__ == "__main__":
    main()
