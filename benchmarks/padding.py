"""How much of the reward model's and DPO's batches is padding, with and without grouping batches by length.

Builds `processed_data/` from a data set with `data_process.py` (as a user would), then walks one epoch of the
reward model's and DPO's training batches in the order each script draws them, at the seed's batch sizes:

* reward model: HF Trainer's sampler, `RandomSampler` (`--no_group_by_length`) or `LengthGroupedSampler`
  (`--group_by_length`), pairs of `max(len(chosen), len(rejected))` tokens, each batch 2B rows padded to its
  longest text (as `reward_model_training.collate`);
* DPO: `common.EpochShuffle` without and with lengths, batches built by `common.collate_pairs` (DPO's and SFT's).

The padded-token share is the share of a batch's tokens that are padding, summed over the epoch; the last
column is the tokens computed per real token (1 / (1 - share)). Nothing is trained: it reads lengths only.

    python benchmarks/padding.py          # the 1,812 real hh-rlhf rows in ../shared, GPT-2's tokenizer
    python benchmarks/padding.py --dataset Anthropic/hh-rlhf --model gpt2 --train_subset 50000
"""

# ruff: noqa: E402  (the repository root goes on sys.path before the scripts are imported)
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

import common
from common import load_processed_data, load_tokenizer

SHARED = REPO.parent / "shared"


def batches(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


def share(real, padded):
    return 1 - real / padded, padded / real


def reward_model_padding(train, batch_size, grouped, seed):
    """(padded share, tokens per real token) of one epoch of the reward model's batches."""
    chosen, rejected = map(len, train["input_ids_chosen"]), map(len, train["input_ids_rejected"])
    rows = list(zip(chosen, rejected))
    lengths = [max(pair) for pair in rows]
    generator = torch.Generator().manual_seed(seed)
    sampler = (
        LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        if grouped
        else RandomSampler(range(len(rows)), generator=generator)
    )
    real = padded = 0
    for batch in batches(list(sampler), batch_size):
        real += sum(sum(rows[i]) for i in batch)
        padded += 2 * len(batch) * max(lengths[i] for i in batch)
    return share(real, padded)


def dpo_padding(train, tokenizer, batch_size, max_seq_len, grouped, seed):
    """(padded share, tokens per real token) of one epoch of DPO's batches, as `collate_pairs` builds them."""
    pairs = common.tokenize_pairs(train, tokenizer)
    lengths = [common.pair_length(pair, max_seq_len) for pair in pairs]
    sampler = common.EpochShuffle(len(pairs), seed, lengths=lengths if grouped else None, batch_size=batch_size)
    real = padded = 0
    for batch in batches(list(sampler), batch_size):
        mask = common.collate_pairs([pairs[i] for i in batch], tokenizer.eos_token_id, max_seq_len)["attention_mask"]
        real, padded = real + int(mask.sum()), padded + mask.numel()
    return share(real, padded)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--dataset", default=str(SHARED / "hh-rlhf-sample/harmless-base-test-first1812.jsonl.gz"))
    parser.add_argument("--model", default=str(SHARED / "gpt2-tokenizer"), help="its tokenizer is what counts")
    parser.add_argument("--train_subset", type=int, default=0, help="data_process.py's seeded subset (0 = all)")
    parser.add_argument("--rm_batch_size", type=int, default=8, help="the reward model's pairs per batch (seed: 8)")
    parser.add_argument("--dpo_batch_size", type=int, default=4, help="DPO's pairs per micro-batch (seed: 4)")
    parser.add_argument("--max_seq_len", type=int, default=512, help="DPO's tokens per row (seed: 512)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    for path in (args.dataset, args.model):
        if path.startswith(str(SHARED)) and not Path(path).exists():
            sys.exit(f"error: {path} not found: pass --dataset and --model")
    with tempfile.TemporaryDirectory() as work:
        make = [sys.executable, str(REPO / "data_process.py"), "--work_dir", work, "--dataset", args.dataset]
        make += ["--model", args.model, "--train_subset", str(args.train_subset), "--seed", str(args.seed)]
        made = subprocess.run(make, capture_output=True, text=True)
        if made.returncode:
            sys.exit(made.stderr.strip().splitlines()[-1] if made.stderr.strip() else "error: data_process.py failed")
        data = load_processed_data(argparse.Namespace(work_dir=work, model=args.model, preset="gpt2"))
        train, tokenizer = data["train"], load_tokenizer(args.model)
        print(f"{len(train)} train pairs of {args.dataset}, {Path(args.model).name}'s tokenizer")
        print("| batches | padded-token share | tokens computed per real token |")
        print("| --- | --- | --- |")
        for grouped in (False, True):
            name = "grouped by length" if grouped else "shuffled"
            rm = reward_model_padding(train, args.rm_batch_size, grouped, args.seed)
            print(f"| reward model, {args.rm_batch_size} pairs, {name} | {rm[0]:.1%} | {rm[1]:.2f} |")
        for grouped in (False, True):
            name = "grouped by length" if grouped else "shuffled"
            d = dpo_padding(train, tokenizer, args.dpo_batch_size, args.max_seq_len, grouped, args.seed)
            print(f"| DPO, {args.dpo_batch_size} pairs, {name} | {d[0]:.1%} | {d[1]:.2f} |")


if __name__ == "__main__":
    main()
