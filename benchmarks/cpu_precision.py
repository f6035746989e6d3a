"""fp32 against bf16 autocast on this CPU: is bf16 faster here, and do the log-probs agree?

The project's precision policy computes in fp32 on a CPU (`common.precision()`); bf16 autocast would be worth it only
where it is measured faster and agrees. This times a training step's forward and backward (reply log-probs through
`common.response_logprobs`, their sum's gradient) of the bundled tiny model and of a random-init GPT-2
(`GPT2Config()`: 124M parameters, or `--n_layer` fewer layers), alternating fp32 and bf16, `--repeats` times after
one warm-up each, and prints the median seconds per step and the largest log-prob difference between the two.

    OMP_NUM_THREADS=1 python benchmarks/cpu_precision.py --tokenizer ../shared/gpt2-tokenizer
"""

# ruff: noqa: E402  (the repository root goes on sys.path before common.py is imported)
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import common
from lifecycle import TINY_MODEL_DIR, UserError


def step(model, ids, mask, context):
    """One forward and backward of the reply log-probs: (seconds, log-probs)."""
    start = time.perf_counter()
    logprobs, _, _ = common.response_logprobs(model, ids, mask, context)
    logprobs.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, logprobs.detach()


def compare(name, model, batch, width, repeats):
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids, mask, context = torch.randint(0, vocab, (batch, width)), torch.ones(batch, width, dtype=torch.long), width // 2
    policies = {"fp32": lambda device=None: ("fp32", "measured"), "bf16": lambda device=None: ("bf16", "measured")}
    original = common.precision
    times, logprobs = {"fp32": [], "bf16": []}, {}
    try:
        for run in range(repeats + 1):
            for label, policy in policies.items():
                common.precision = policy
                seconds, logprobs[label] = step(model, ids, mask, context)
                if run:  # the first round warms up
                    times[label].append(seconds)
    finally:
        common.precision = original
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    diff = (logprobs["fp32"] - logprobs["bf16"]).abs().max().item()
    print(f"| {name} | {batch} x {width} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f} | {diff:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="GPT-2's tokenizer folder (its vocabulary size is used)")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="also a model folder (any causal LM, e.g. SmolLM2-135M), at --batch x --width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    if args.model and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such folder")
    if not Path(args.tokenizer).is_dir():
        raise UserError(f"--tokenizer {args.tokenizer}: no such folder")
    tokenizer = common.load_tokenizer(args.tokenizer)
    print(f"{torch.get_num_threads()} thread(s); median of {args.repeats}, alternating\n")
    print("| model | batch x tokens | fp32 s/step | bf16 s/step | fp32 / bf16 | max log-prob difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    tiny = common.load_causal_lm(str(TINY_MODEL_DIR), common.load_tokenizer(str(TINY_MODEL_DIR))).eval()
    compare("tiny (bundled)", tiny, 16, 96, args.repeats)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=args.n_layer, activation_function="gelu_pytorch_tanh")
    gpt2 = GPT2LMHeadModel(config).eval()
    common.fp32_head(gpt2.lm_head)
    compare(f"random GPT-2 ({args.n_layer} layers)", gpt2, 4, 256, args.repeats)
    if args.model:
        model = common.load_causal_lm(args.model, common.load_tokenizer(args.model)).eval()
        compare(Path(args.model).name, model, args.batch, args.width, args.repeats)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --tokenizer: one line, not a traceback
        sys.exit(f"error: {e}")
