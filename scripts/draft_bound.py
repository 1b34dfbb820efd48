#!/usr/bin/env python3
"""How much prompt-lookup drafting can speed up HumanEval's bodies, without running a model.

`bench --replay humaneval` scripts each next token to the canonical body, so which drafts are
accepted depends only on the tokens, not on the weights. This replays the same loop as
`engine/src/generate.rs` on token ids alone: after each chosen token, `engine/src/draft.rs`'s
lookup (the latest earlier occurrence of the history's last 3, else 2, tokens) proposes up to K
tokens; one pass verifies them and yields 1 + the accepted ones. A pass of r rows costs
`1 + SLOPE * (r - 1)` decode steps (the bench's `verify_rows_ms`: on the Xeon, 4 rows cost 1.26
steps, so SLOPE 0.087). Printed: the body-time speedup over plain decoding and the share of drafts
accepted, for several K and slopes, over the first 40 problems (the replay's default table) and
all 164. A slope of 0 is the bound for free verification.

Optional: `--store DIR` also drafts, where the prompt has no match, from the commonest
continuation of the last 3 tokens in the Python files under DIR (a REST-like datastore), to see
what a corpus adds.

Needs the `tokenizers` package (PyPI). Usage: scripts/draft_bound.py [--store DIR]
"""
import argparse
import collections
import glob
import gzip
import json
import os

from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def lookup(history, k, longest=3, shortest=2):
    """engine/src/draft.rs's lookup."""
    for n in range(longest, shortest - 1, -1):
        if len(history) <= n:
            continue
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + k]
    return []


def speedup(problems, drafter, slope):
    """Plain passes over drafted passes' cost, summed over the problems; share accepted."""
    plain = cost = drafted = accepted = 0
    for prompt, body in problems:
        # The first token comes from the prompt's logits; each later one needs a pass.
        chosen = 1
        while chosen < len(body):
            drafts = drafter(prompt + body[:chosen])
            ok = 0
            while ok < len(drafts) and chosen + ok < len(body) and body[chosen + ok] == drafts[ok]:
                ok += 1
            cost += 1 + slope * len(drafts)
            drafted += len(drafts)
            accepted += ok
            chosen += ok + 1
        plain += len(body) - 1
    return plain / cost, accepted / max(drafted, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a folder of Python files to draft from as well")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(os.path.join(ROOT, "assets/phi-1/tokenizer.json"))
    path = os.path.join(ROOT, "tests/fixtures/humaneval/HumanEval.jsonl.gz")
    problems = []
    for line in gzip.open(path, "rt"):
        if not line.strip():
            continue
        p = json.loads(line)
        prompt = tokenizer.encode(p["prompt"]).ids
        whole = tokenizer.encode(p["prompt"] + p["canonical_solution"]).ids
        # As bench/replay.rs's script_of: what follows the prompt's ids, else the body alone.
        if whole[:len(prompt)] == prompt:
            body = whole[len(prompt):]
        else:
            body = tokenizer.encode(p["canonical_solution"]).ids
        problems.append((prompt, body))

    drafters = {f"lookup k={k}": (lambda h, k=k: lookup(h, k)) for k in (1, 2, 3, 5, 8)}
    if args.store:
        table = collections.defaultdict(collections.Counter)
        texts = []
        for name in glob.glob(os.path.join(args.store, "**/*.py"), recursive=True):
            try:
                with open(name, encoding="utf-8") as f:
                    texts.append(f.read())
            except (OSError, UnicodeDecodeError):
                pass
        for encoding in tokenizer.encode_batch(texts):
            ids = encoding.ids
            for i in range(len(ids) - 3):
                table[tuple(ids[i:i + 3])][ids[i + 3]] += 1
        print(f"store: {len(texts)} files, {len(table)} contexts of 3 tokens")

        def stored(history, k):
            drafts, context = [], list(history[-3:])
            while len(drafts) < k and tuple(context) in table:
                token, count = table[tuple(context)].most_common(1)[0]
                if count < 2 or count < 0.3 * sum(table[tuple(context)].values()):
                    break
                drafts.append(token)
                context = context[1:] + [token]
            return drafts

        for k in (1, 3, 6):
            drafters[f"lookup, else store k={k}"] = (
                lambda h, k=k: lookup(h, k, 3, 3) or stored(h, k))

    print("drafter | slope | speedup, acceptance (first 40) | (all 164)")
    for name, drafter in drafters.items():
        for slope in (0.087, 0.0):
            first = speedup(problems[:40], drafter, slope)
            every = speedup(problems, drafter, slope)
            print(f"{name} | {slope} | {first[0]:.3f}, {first[1]:.3f} | {every[0]:.3f}, {every[1]:.3f}")


if __name__ == "__main__":
    main()
