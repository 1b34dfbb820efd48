#!/usr/bin/env python3
"""Check `phi-lsp complete`'s token healing against make_healing_reference.py's reference.

For each case in HEALING (default MODEL/healing.json) it writes the prompt to a file and runs

  BIN complete FILE --line L --character C --max-new-tokens N --deadline-ms 60000 --json
      --dtype f32 --model MODEL [EXTRA ...]

at the end of the prompt (N is the reference's max_new_tokens), and compares the one JSON object
the binary prints: `healed` must be the reference's dropped_text, `prompt_tokens` the length of
its prompt_ids, and `raw` (the continuation after the cursor) its suggestion, or, where the
Python stop rules ended the generation early (`stop` "Predicate"), the start of it.

Meant for checkpoints too large to commit, e.g. one with the real Phi-1 vocabulary:

  python scripts/make_fixture.py --out /tmp/phi-realtok --tokenizer assets/phi-1/tokenizer.json
  python scripts/make_healing_reference.py --model /tmp/phi-realtok \\
      --out /tmp/phi-realtok/healing.json --phi1-out /tmp/phi-1-healing.json
  python scripts/check_healing.py --model /tmp/phi-realtok --bin target/release/phi-lsp

Prints one PASS/FAIL line per case and exits non-zero if any case fails. Needs only the Python
standard library.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the checkpoint folder")
    parser.add_argument("--healing", help="the reference (default MODEL/healing.json)")
    parser.add_argument("--bin", required=True, help="path to the phi-lsp binary")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more argument for `phi-lsp complete` (repeatable)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    return parser.parse_args()


def run_complete(args, prompt, max_new_tokens):
    """Returns (parsed JSON object, None) or (None, reason)."""
    lines = prompt.split("\n")
    line, character = len(lines) - 1, len(lines[-1].encode("utf-16-le")) // 2
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "case.py")
        with open(path, "w", encoding="utf-8", newline="") as file:
            file.write(prompt)
        command = [args.bin, "complete", path, "--line", str(line), "--character", str(character),
                   "--max-new-tokens", str(max_new_tokens), "--deadline-ms", "60000", "--json",
                   "--dtype", "f32", "--model", args.model, *args.extra]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"could not run {args.bin}: {error}"
    if result.returncode != 0:
        return None, f"exit status {result.returncode}; stderr: {result.stderr.strip()[-2000:]}"
    out = [text for text in result.stdout.splitlines() if text.strip()]
    try:
        return json.loads(out[-1]), None
    except (IndexError, json.JSONDecodeError) as error:
        return None, f"no JSON object on stdout ({error}); stderr: {result.stderr.strip()[-2000:]}"


def main():
    args = parse_args()
    with open(args.healing or os.path.join(args.model, "healing.json"), encoding="utf-8") as file:
        reference = json.load(file)
    n_failed = 0
    for index, case in enumerate(reference["cases"]):
        label = f"case {index} {case['prompt'][-30:]!r}"
        output, reason = run_complete(args, case["prompt"], reference["max_new_tokens"])
        problems = [reason] if output is None else []
        if output is not None:
            if output.get("healed") != case["dropped_text"]:
                problems.append(f"healed {output.get('healed')!r} != {case['dropped_text']!r}")
            if output.get("prompt_tokens") != len(case["prompt_ids"]):
                problems.append(f"prompt_tokens {output.get('prompt_tokens')} != {len(case['prompt_ids'])}")
            raw = output.get("raw") or ""
            cut = output.get("stop") == "Predicate"
            if not (case["suggestion"].startswith(raw) if cut else raw == case["suggestion"]):
                problems.append(f"raw {raw!r} != {case['suggestion']!r} (stop {output.get('stop')})")
        n_failed += bool(problems)
        print(f"{'FAIL' if problems else 'PASS'} {label}")
        for problem in problems:
            print(f"     {problem}")
    n_cases = len(reference["cases"])
    print(f"{n_cases - n_failed}/{n_cases} cases passed")
    sys.exit(1 if n_failed else 0)


if __name__ == "__main__":
    main()
