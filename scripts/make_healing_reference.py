#!/usr/bin/env python3
"""Token-healing references from HF transformers, for the Rust tests to compare against.

Token healing (issue 21): a prompt that ends inside a word ends in a token the model rarely saw
there (`ret` rather than `return`). So the prompt's last token is dropped, and generation starts
constrained to write its text again: while `remaining` bytes of it are not written, the next
token is the most likely one (greedy) among the tokens whose bytes start with `remaining` (and
go on) or are a non-empty prefix of `remaining` (and use that much of it up); special tokens and
the ids the tokenizer lacks (the model has more rows than the tokenizer has tokens) are never
allowed. Once it is written, generation is plain greedy (ids the tokenizer lacks suppressed,
stopping at `<|endoftext|>`). The suggestion is the generated text minus the dropped text.

Everything here is computed independently of phi-lsp's Rust code: the token bytes come from the
tokenizer's own token strings (`tokenizers`' `id_to_token`, mapped back through GPT-2's
`bytes_to_unicode` as transformers ships it; added tokens are their content), the logits from a
full forward pass of transformers' `PhiForCausalLM` (float32, one thread, no KV cache) at every
step.

What it writes:

  --out (default tests/fixtures/tiny-phi/healing.json), on the committed fixture model
  (--model, default tests/fixtures/tiny-phi): transformers_version, torch_version,
  tokenizer_size, vocab_size, max_new_tokens, min_margin, and cases. Each case: prompt,
  input_ids (the whole prompt, no special tokens added), prompt_ids (without its last token),
  dropped_id, dropped_text, allowed_first (every id allowed at the first step, increasing),
  tokens (the healed greedy tokens, the eos left out), stopped_at_eos, text (the tokens decoded:
  begins with dropped_text), suggestion (text minus dropped_text), unhealed_tokens (plain greedy
  after the whole prompt, for contrast), min_margin (the smallest top-1/top-2 logit gap among the
  allowed tokens along the path; under 1e-3 the script warns).

  --phi1-out (default tests/fixtures/phi-1-healing.json), with the real Phi-1 tokenizer
  (--phi1-tokenizer, default assets/phi-1/tokenizer.json): tokenizer_size, and
  `allowed`: for each dropped text (also as hex, since a byte-level token may be part of a UTF-8
  character) every id the rule allows, increasing; and `prompts`: for each prompt its ids and the
  text and id of its last token.

Run from the repository root with a venv that has torch, transformers, tokenizers, safetensors
(the committed files were written with transformers 5.x; the exact versions are in the JSON):

  python scripts/make_healing_reference.py

Two runs write byte-identical files.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import PhiForCausalLM  # noqa: E402

try:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode  # noqa: E402
except ImportError:  # moved in some versions
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

EOS_TEXT = "<|endoftext|>"
MAX_NEW_TOKENS = 12
MIN_SAFE_MARGIN = 1e-3

# Prompts ending inside an identifier or a keyword, and after a dot.
FIXTURE_PROMPTS = [
    "def fib(n):\n    ret",
    "import os\nos.pa",
    "import os\nos.",
    "import sys\n\ndef main():\n    sys.",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n\n    def norm(sel",
    "for i in ran",
    "def f(x):\n    if x is No",
    "def area(r):\n    return 3.14 * r * r\n\nprint(are",
]

PHI1_DROPPED = ["ret", " ret", "pa", ".", "os", "(", "sel", "\u00e9", " No"]
PHI1_PROMPTS = [
    "def fib(n):\n    ret",
    "import os\nos.pa",
    "import os\nos.",
    "for i in ran",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tests/fixtures/tiny-phi", help="fixture folder")
    parser.add_argument("--out", default="tests/fixtures/tiny-phi/healing.json")
    parser.add_argument("--phi1-tokenizer", default="assets/phi-1/tokenizer.json")
    parser.add_argument("--phi1-out", default="tests/fixtures/phi-1-healing.json")
    return parser.parse_args()


def token_bytes_table(tokenizer):
    """Each id's bytes; None for special added tokens."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = tokenizer.get_added_tokens_decoder()
    table = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        if token_id in added:
            token = added[token_id]
            table.append(None if token.special else token.content.encode("utf-8"))
            continue
        text = tokenizer.id_to_token(token_id)
        table.append(None if text is None else bytes(byte_of[c] for c in text))
    return table


def allowed_ids(table, remaining):
    return [
        token_id for token_id, token in enumerate(table)
        if token and (token.startswith(remaining) or remaining.startswith(token))
    ]


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0, -1]


def margin(values):
    if values.numel() < 2:
        return float("inf")
    top2 = values.topk(2).values
    return (top2[0] - top2[1]).item()


def greedy(model, ids, table, eos_id, tokenizer_size, remaining=b""):
    """Greedy after `ids`, constrained while `remaining` is not written. Returns the tokens (no
    eos), whether it stopped at eos, and the smallest decisive margin."""
    ids = list(ids)
    tokens, worst = [], float("inf")
    while len(tokens) < MAX_NEW_TOKENS:
        logits = last_logits(model, ids)
        if remaining:
            allowed = allowed_ids(table, remaining)
            values = logits[allowed]
            next_id = allowed[int(values.argmax())]
            written = table[next_id]
            remaining = b"" if written.startswith(remaining) else remaining[len(written):]
        else:
            values = logits[:tokenizer_size]
            next_id = int(values.argmax())
        worst = min(worst, margin(values))
        if next_id == eos_id:
            return tokens, True, worst
        tokens.append(next_id)
        ids.append(next_id)
    return tokens, False, worst


def fixture_reference(args):
    tokenizer = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = PhiForCausalLM.from_pretrained(
        args.model, attn_implementation="eager", **{dtype_arg: torch.float32}
    )
    model.eval()
    table = token_bytes_table(tokenizer)
    eos_id = tokenizer.token_to_id(EOS_TEXT)
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    cases, worst = [], float("inf")
    for prompt in FIXTURE_PROMPTS:
        input_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        dropped_id = input_ids[-1]
        dropped = table[dropped_id]
        dropped_text = dropped.decode("utf-8")
        if not prompt.endswith(dropped_text):
            sys.exit(f"{prompt!r}: the last token {dropped!r} is not the prompt's end")
        tokens, at_eos, case_margin = greedy(
            model, input_ids[:-1], table, eos_id, tokenizer_size, dropped
        )
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        if not text.startswith(dropped_text):
            sys.exit(f"{prompt!r}: healed text {text!r} does not begin with {dropped_text!r}")
        unhealed, _, _ = greedy(model, input_ids, table, eos_id, tokenizer_size)
        worst = min(worst, case_margin)
        print(f"{prompt!r}: drop {dropped_text!r} -> {text!r} (unhealed"
              f" {tokenizer.decode(unhealed)!r}), margin {case_margin:.3g}")
        cases.append({
            "prompt": prompt,
            "input_ids": input_ids,
            "prompt_ids": input_ids[:-1],
            "dropped_id": dropped_id,
            "dropped_text": dropped_text,
            "allowed_first": allowed_ids(table, dropped),
            "tokens": tokens,
            "stopped_at_eos": at_eos,
            "text": text,
            "suggestion": text[len(dropped_text):],
            "unhealed_tokens": unhealed,
            "min_margin": case_margin,
        })
    if worst < MIN_SAFE_MARGIN:
        print(f"warning: a choice is decided by less than {MIN_SAFE_MARGIN:g}")
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizer_size": tokenizer_size,
        "vocab_size": model.config.vocab_size,
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_margin": worst,
        "cases": cases,
    }


def phi1_reference(args):
    tokenizer = Tokenizer.from_file(args.phi1_tokenizer)
    table = token_bytes_table(tokenizer)
    allowed = []
    for text in PHI1_DROPPED:
        dropped = text.encode("utf-8")
        allowed.append({"dropped_text": text, "dropped_hex": dropped.hex(),
                        "allowed": allowed_ids(table, dropped)})
        print(f"Phi-1, dropped {text!r}: {len(allowed[-1]['allowed'])} ids allowed")
    prompts = []
    for prompt in PHI1_PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        prompts.append({"prompt": prompt, "ids": ids, "last_id": ids[-1],
                        "last_text": table[ids[-1]].decode("utf-8")})
    return {
        "tokenizers_version": __import__("tokenizers").__version__,
        "tokenizer_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "allowed": allowed,
        "prompts": prompts,
    }


def format_json(value, indent=0):
    """JSON with one line per list of numbers (readable diffs)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {format_json(v, indent + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list):
        if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
            return "[" + ",".join(format_json(item) for item in value) + "]"
        return "[\n" + ",\n".join(inner + format_json(v, indent + 1) for v in value) + "\n" + pad + "]"
    if isinstance(value, float):
        return json.dumps(None) if value == float("inf") else format(value, ".7g")
    return json.dumps(value, ensure_ascii=False)


def write(path, value):
    with open(path, "w", encoding="utf-8") as file:
        file.write(format_json(value) + "\n")
    print(f"wrote {path}")


def main():
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    write(args.out, fixture_reference(args))
    write(args.phi1_out, phi1_reference(args))


if __name__ == "__main__":
    main()
