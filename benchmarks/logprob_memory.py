"""Peak memory of reply log-probs at GPT-2's size: the full logits against `common.response_logprobs`' chunks.

One DPO micro-batch's work on a random-init GPT-2 (`GPT2Config()` with GPT-2's 50,257-word vocabulary): the forward
pass and backward of the summed reply log-probs of `--pairs` pairs (2 rows each) of a 1-token prompt and a
`--reply_tokens` reply. `full` computes them as the scripts did before: the model's LM head on every reply position,
then `gather_logprobs` on those (rows, reply, vocabulary) logits; `chunked` is `common.response_logprobs`. Each
runs in a fresh process (peak RSS, or the CUDA allocator's peak on a GPU), alternating, `--repeats` times; the
median of each is printed, with the weights' and a bare forward's share apart. The log-probs of the two agree
(tests/test_common.py checks it).

    OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py --tokenizer ../shared/gpt2-tokenizer
"""

# ruff: noqa: E402  (the repository root goes on sys.path before common.py is imported)
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import common
from lifecycle import UserError


def measure(way, tokenizer, pairs, reply_tokens):
    """In this process: build the model, run `way` once, return the peak memory in MB."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from reporting import peak_memory_mb

    vocab = len(common.load_tokenizer(tokenizer))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, activation_function="gelu_pytorch_tanh")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT2LMHeadModel(config).to(device)
    common.fp32_head(model.lm_head)
    ids = torch.randint(0, vocab, (2 * pairs, reply_tokens + 1), device=device)
    mask = torch.ones_like(ids)
    if way == "full":
        logits = common.forward(model, ids, mask, logits_to_keep=reply_tokens + 1).logits[:, :-1]
        logprobs = common.gather_logprobs(logits, ids[:, 1:])
    elif way == "chunked":
        logprobs, _, _ = common.response_logprobs(model, ids, mask, 1)
    else:  # "weights": the model and the inputs only
        return peak_memory_mb()
    logprobs.sum().backward()
    return peak_memory_mb()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="GPT-2's tokenizer folder (its vocabulary size is used)")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--reply_tokens", type=int, default=511)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokenizer, args.pairs, args.reply_tokens)))
        return
    if not Path(args.tokenizer).is_dir():
        raise UserError(f"--tokenizer {args.tokenizer}: no such folder")
    common.load_tokenizer(args.tokenizer)  # a folder without a tokenizer fails here, not in a child process
    peaks = {"weights": [], "full": [], "chunked": []}
    for _ in range(args.repeats):
        for way in peaks:
            argv = [sys.executable, __file__, "--tokenizer", args.tokenizer, "--pairs", str(args.pairs)]
            argv += ["--reply_tokens", str(args.reply_tokens), "--measure", way]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            peaks[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {way: statistics.median(values) for way, values in peaks.items()}
    print(f"{args.pairs} pair(s) of {args.reply_tokens}-token replies, median of {args.repeats} (MB)\n")
    print("| log-probs | peak | above the model's |\n| --- | --- | --- |")
    for way in ("full", "chunked"):
        print(f"| {way} | {median[way]:,.0f} | {median[way] - median['weights']:,.0f} |")
    print(f"| (model and inputs alone) | {median['weights']:,.0f} | |")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --tokenizer: one line, not a traceback
        sys.exit(f"error: {e}")
