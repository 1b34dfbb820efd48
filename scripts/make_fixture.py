#!/usr/bin/env python3
"""Make a tiny random Phi checkpoint and HF transformers reference outputs for it.

What it writes into --out (default tests/fixtures/tiny-phi):

  config.json        PhiConfig as transformers writes it (layout depends on the version, see below)
  model.safetensors  PhiForCausalLM weights, float32, every parameter random (biases and
                     LayerNorms too: the default init leaves them at 0 and 1/0, which hides bugs)
  tokenizer.json     byte-level BPE trained here on Python stdlib source, or a copy of --tokenizer
  reference.json     per prompt: input_ids, logits of every position from one full forward pass,
                     and a 16-token greedy continuation from `model.generate`

The model has a vocabulary larger than the tokenizer (tokenizer size rounded up to a multiple of
64, plus 64 more), like Phi-1 (51200 rows for 50295 tokens): ids the tokenizer lacks exist in the
logits but are suppressed during generation, as the real server must mask them.

The trained tokenizer has no normalizer, a ByteLevel pre-tokenizer (add_prefix_space=False), a
ByteLevel decoder and a ByteLevel post-processor that adds no tokens (as Phi-1's tokenizer.json).
`<|endoftext|>` is a single special added token with the last id (tokenizer size - 1), the way
Phi-1's 50256 follows its BPE vocabulary. The corpus is the first 40 files of the sorted
`<stdlib>/*.py` of the running interpreter, so another Python version trains another tokenizer;
the committed fixture, not this script, is the reference.

config.json layout: the committed tests/fixtures/tiny-phi was written by transformers 5.24.0
(torch 2.15.0, tokenizers 0.23.3, Python 3.11.7), which nests `rope_theta` and
`partial_rotary_factor` under `rope_parameters` (with `"rope_type": "default"`) and writes
`"dtype": "float32"`. transformers 4.x writes `rope_theta` and `partial_rotary_factor` at the top
level, as microsoft/phi-1's own config.json has them; a loader must accept both. bos_token_id and
eos_token_id are null as in microsoft/phi-1: the eos id comes from the tokenizer.

reference.json, top level: transformers_version, torch_version, seed, eos_token_id, tokenizer_size
(with added tokens), vocab_size (rows of the model), max_new_tokens, min_greedy_margin, and cases.
Each case: prompt, input_ids (no special tokens added), greedy_tokens (what `generate` returned,
with the eos kept last if it stopped there), stopped_at_eos, greedy_text (decoded greedy tokens
without that eos), logits ([position][vocab_size], float32 printed to 7 significant digits).

Besides writing the files, the script checks that incremental decoding with transformers' own KV
cache (prompt forward, then one token at a time with the returned cache) matches the full forward
to --tolerance (1e-5), that the greedy tokens are the argmax of the full-forward logits over the
tokenizer's ids, and that the greedy continuations are not degenerate. It prints the largest
difference and the smallest top-1/top-2 logit margin along the greedy paths (warning under 1e-3,
where another float32 implementation could fairly choose the other token).

Everything runs on CPU in float32 with one thread, so two runs write byte-identical files.
With the default sizes the fixture is about 1.6 MB; with the real Phi-1 tokenizer the model has
50368 rows and the folder is about 56 MB (for local checks, not for committing).

Run (from the repository root, with a venv that has torch, transformers, tokenizers, safetensors):

  python scripts/make_fixture.py                       # tests/fixtures/tiny-phi, the defaults
  python scripts/make_fixture.py --out /tmp/phi-h128 --hidden 128 --layers 3 --heads 8 --seed 7
  python scripts/make_fixture.py --out /tmp/phi-realtok \\
      --tokenizer assets/phi-1/tokenizer.json   # real Phi-1 vocabulary, eos 50256
"""

import argparse
import glob
import inspect
import json
import os
import shutil
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PhiConfig, PhiForCausalLM  # noqa: E402

EOS_TEXT = "<|endoftext|>"
N_CORPUS_FILES = 40
MAX_NEW_TOKENS = 16
# Below this top-1/top-2 logit gap a float32 reimplementation may legitimately pick another token.
MIN_SAFE_MARGIN = 1e-3

PROMPTS = [
    'def add(a, b):\n    """Return the sum of a and b."""\n',
    "import os\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "def f(x):\n    return",
]

# Standard deviations of the random parameters. Large enough that the logits are far from flat
# (a near-uniform distribution makes greedy decoding repeat one token and hides bugs).
WEIGHT_STD = 0.2
EMBEDDING_STD = 1.0
BIAS_STD = 0.1
NORM_STD = 0.1

# Files the fixture consists of (healing.json is make_healing_reference.py's); anything else
# save_pretrained writes is removed.
KEPT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "reference.json", "healing.json")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures/tiny-phi", help="output folder")
    parser.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    parser.add_argument("--vocab", type=int, default=1000,
                        help="size of the trained tokenizer, <|endoftext|> included")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="number of attention heads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parameters")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed |incremental - full forward| logit difference")
    return parser.parse_args()


def train_tokenizer(vocab_size):
    stdlib = os.path.dirname(os.__file__)
    paths = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:N_CORPUS_FILES]
    if len(paths) < N_CORPUS_FILES:
        sys.exit(f"only {len(paths)} python files in {stdlib}: need {N_CORPUS_FILES} to train on")
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as file:
            texts.append(file.read())

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is <|endoftext|>, added below
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([EOS_TEXT])
    print(f"trained a byte-level BPE on {len(paths)} files from {stdlib}")
    return tokenizer


def model_vocab_size(tokenizer_size):
    """Round up to a multiple of 64, then 64 more rows that no token maps to."""
    return -(-tokenizer_size // 64) * 64 + 64


def build_model(args, vocab_size):
    config = PhiConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        hidden_act="gelu_new",
        max_position_embeddings=512,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        layer_norm_eps=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        qk_layernorm=False,
        tie_word_embeddings=False,
        # As in microsoft/phi-1's config.json: the eos id comes from the tokenizer.
        bos_token_id=None,
        eos_token_id=None,
    )
    # transformers 5 calls the argument dtype; 4.x called it torch_dtype
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = PhiForCausalLM._from_config(config, attn_implementation="eager", **{dtype_arg: torch.float32})
    model.eval()

    torch.manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, dtype=torch.float32)
            if "layernorm" in name and name.endswith(".weight"):
                param.copy_(1.0 + NORM_STD * noise)
            elif "layernorm" in name and name.endswith(".bias"):
                param.copy_(NORM_STD * noise)
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * noise)
            elif name == "model.embed_tokens.weight":
                param.copy_(EMBEDDING_STD * noise)
            elif name.endswith(".weight"):
                param.copy_(WEIGHT_STD * noise)
            else:
                sys.exit(f"no random init rule for parameter {name}")
    return model


def greedy(model, input_ids, eos_id, tokenizer_size, vocab_size):
    prompt = torch.tensor([input_ids])
    with torch.no_grad():
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            suppress_tokens=list(range(tokenizer_size, vocab_size)),
        )
    return output[0, len(input_ids):].tolist()


def check_against_full_forward(model, input_ids, greedy_tokens, tokenizer_size):
    """Incremental decoding must equal the full forward; greedy must be its masked argmax.

    Returns (max incremental difference, min top-1/top-2 margin along the greedy path)."""
    # The KV cache argument and output are `cache` since transformers 5.24, `past_key_values` before.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    all_ids = input_ids + greedy_tokens
    with torch.no_grad():
        full = model(torch.tensor([all_ids]), use_cache=False).logits[0]
        step = model(torch.tensor([input_ids]), use_cache=True)
        incremental = [step.logits[0]]
        for token in greedy_tokens[:-1]:
            cache = getattr(step, cache_name)
            step = model(torch.tensor([[token]]), use_cache=True, **{cache_name: cache})
            incremental.append(step.logits[0])
    incremental = torch.cat(incremental, dim=0)
    full = full[: incremental.shape[0]]
    max_diff = (full - incremental).abs().max().item()

    path = full[len(input_ids) - 1:, :tokenizer_size]
    top2 = path.topk(2, dim=-1)
    argmax = top2.indices[:, 0].tolist()
    if argmax != greedy_tokens:
        sys.exit(f"generate gave {greedy_tokens} but the full forward's argmax is {argmax}")
    margin = (top2.values[:, 0] - top2.values[:, 1]).min().item()
    return max_diff, margin


def format_json(value, indent=0):
    """JSON with one line per list of numbers; floats as float32 with 7 significant digits."""
    pad = " " * indent
    inner = " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(key)}: {format_json(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list):
        if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
            return "[" + ",".join(format_json(item) for item in value) + "]"
        items = [inner + format_json(item, indent + 1) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            sys.exit(f"non-finite number {value} in the reference")
        return format(value, ".7g")
    return json.dumps(value)


def main():
    args = parse_args()
    torch.set_num_threads(1)  # same float reductions on every run and machine
    torch.use_deterministic_algorithms(True)

    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = train_tokenizer(args.vocab)
    eos_id = tokenizer.token_to_id(EOS_TEXT)
    if eos_id is None or tokenizer.encode(EOS_TEXT, add_special_tokens=False).ids != [eos_id]:
        sys.exit(f"{EOS_TEXT} is not a single token of the tokenizer")
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = model_vocab_size(tokenizer_size)

    model = build_model(args, vocab_size)

    cases = []
    worst_diff, worst_margin = 0.0, float("inf")
    for prompt in PROMPTS:
        input_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        with torch.no_grad():
            logits = model(torch.tensor([input_ids]), use_cache=False).logits[0]
        greedy_tokens = greedy(model, input_ids, eos_id, tokenizer_size, vocab_size)
        stopped_at_eos = greedy_tokens[-1] == eos_id
        text_tokens = greedy_tokens[:-1] if stopped_at_eos else greedy_tokens
        greedy_text = tokenizer.decode(text_tokens, skip_special_tokens=False)

        max_diff, margin = check_against_full_forward(model, input_ids, greedy_tokens, tokenizer_size)
        worst_diff, worst_margin = max(worst_diff, max_diff), min(worst_margin, margin)
        if len(set(greedy_tokens)) < 4:
            sys.exit(f"degenerate greedy continuation {greedy_tokens}: change the init stds")
        print(f"prompt {prompt!r}: {len(input_ids)} tokens -> {greedy_text!r}"
              f"{' (stopped at eos)' if stopped_at_eos else ''};"
              f" incremental max diff {max_diff:.3g}, min greedy margin {margin:.3g}")

        cases.append({
            "prompt": prompt,
            "input_ids": input_ids,
            "greedy_tokens": greedy_tokens,
            # generate keeps the eos it stopped at as the last greedy token; greedy_text leaves it out
            "stopped_at_eos": stopped_at_eos,
            "greedy_text": greedy_text,
            "logits": logits.tolist(),
        })

    if worst_diff > args.tolerance:
        sys.exit(f"incremental decoding differs from the full forward by {worst_diff:.3g}"
                 f" (more than --tolerance {args.tolerance:g})")
    print(f"incremental decoding vs full forward: max abs difference {worst_diff:.3g}"
          f" (tolerance {args.tolerance:g})")
    print(f"smallest top-1/top-2 logit margin along the greedy paths: {worst_margin:.3g}")
    if worst_margin < MIN_SAFE_MARGIN:
        print(f"warning: a greedy choice is decided by less than {MIN_SAFE_MARGIN:g}; another"
              f" implementation's rounding may pick the other token (try another --seed)")

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.tokenizer:
        shutil.copyfile(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    else:
        tokenizer.save(os.path.join(args.out, "tokenizer.json"))
    for name in os.listdir(args.out):
        if name not in KEPT_FILES:
            os.remove(os.path.join(args.out, name))

    reference = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": args.seed,
        "eos_token_id": eos_id,
        "tokenizer_size": tokenizer_size,
        "vocab_size": vocab_size,
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_greedy_margin": worst_margin,
        "cases": cases,
    }
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as file:
        file.write(format_json(reference) + "\n")

    total = 0
    for name in sorted(os.listdir(args.out)):
        size = os.path.getsize(os.path.join(args.out, name))
        total += size
        print(f"{size:>10,}  {os.path.join(args.out, name)}")
    print(f"{total:>10,}  total")


if __name__ == "__main__":
    main()
