"""Step 1 of the pipeline: load hh-rlhf, clean it, split it, tokenize it.

Reads Anthropic's hh-rlhf (a hub id or a local copy) and writes `processed_data/`, the
one data set every later script reads: a DatasetDict with `train`, `validation` and
`test` splits holding, per preference pair,

* the text columns `chosen`, `rejected`, `prompt`, `chosen_response`, `rejected_response`
  (prompt + " " + response == the full text, see `common.join_conversation`), and
* the reward model's token columns `input_ids_chosen`, `attention_mask_chosen`,
  `input_ids_rejected`, `attention_mask_rejected` (truncated from the left, so a long
  conversation loses its start, never its final reply),

plus `processed_data/stats.json`: rows read, rows dropped per filter rule, rows per
split, token-length percentiles, and the base model whose tokenizer built it.

Steps (the seed's): a seeded subset of 50,000 train pairs -> `filter_edge_cases`
(tie, short, length ratio, character limit, unsplittable, prompts differ, empty reply)
-> tokenize to 512 tokens -> 10% of train held out as validation; the test split is
filtered the same way. With `--gold_share F` (the tiny preset: 0.5) a seeded share F of
the remaining train pairs moves into a fourth split, `gold_train`: only the gold reward
model (`reward_model_training.py --train_split gold_train`) reads it, so it judges the
policies as a reward model they were never optimised against.

    python data_process.py                                   # gpt2 tokenizer, Anthropic/hh-rlhf
    python data_process.py --dataset ~/hh-rlhf/harmless-base # a local copy (offline)
    python data_process.py --preset tiny --work_dir runs/tiny

Departure from the seed: pairs the seed kept but that have no final Assistant turn,
different prompts in chosen and rejected, or an empty final reply are also dropped,
since every later stage needs (prompt, chosen reply, rejected reply).
"""

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import (
    CHAR_LIMIT,
    FILTER_RULES,
    drop_reason,
    load_preference_data,
    load_tokenizer,
    set_seed,
    split_conversation,
)
from lifecycle import (
    GOLD_SPLIT,
    PROCESSED_DIR,
    CommonArgs,
    atomic_write_json,
    check,
    replace_folder,
    resolve_model_name,
    run,
)


@dataclass
class Args(CommonArgs):
    # data
    dataset: str = field(
        default="Anthropic/hh-rlhf",
        metadata={"help": "hub id, a .jsonl(.gz) file, a folder with train/test.jsonl(.gz), or a folder of them"},
    )
    train_subset: int = field(default=50_000, metadata={"help": "seeded subset of train pairs to keep (0 = all)"})
    test_subset: int = field(default=0, metadata={"help": "seeded subset of test pairs to keep (0 = all)"})
    validation_share: float = field(default=0.1, metadata={"help": "share of filtered train held out as validation"})
    test_share: float = field(
        default=0.1, metadata={"help": "share of the pairs held out as test where the data set has no test split"}
    )
    gold_share: float = field(
        default=0.0,
        metadata={"help": "share of train moved into a gold_train split for a held-out gold reward model (0 = off)"},
    )
    # filtering
    filter_scope: str = field(
        default="full",
        metadata={
            "help": "apply the length rules to the full texts (seed) or to the final replies",
            "choices": ["full", "response"],
        },
    )
    char_limit: int = field(default=CHAR_LIMIT, metadata={"help": "drop pairs whose text reaches this many characters"})
    # tokenization
    max_length: int = field(default=512, metadata={"help": "tokens per chosen/rejected text, truncated from the left"})


TINY = dict(max_length=256, gold_share=0.5)


def add_text_columns(example):
    """prompt, chosen_response, rejected_response; only called on pairs that passed the filter."""
    prompt, chosen_response = split_conversation(example["chosen"])
    return {
        "prompt": prompt,
        "chosen_response": chosen_response,
        "rejected_response": split_conversation(example["rejected"])[1],
    }


def percentiles(lengths):
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(max(lengths))}


def main(args):
    check(0 < args.validation_share < 1, f"--validation_share must be in (0, 1), got {args.validation_share}")
    check(0 <= args.gold_share < 1, f"--gold_share must be in [0, 1), got {args.gold_share}")
    check(0 < args.test_share < 1, f"--test_share must be in (0, 1), got {args.test_share}")
    check(args.max_length > 0 and args.char_limit > 0, "--max_length and --char_limit must be positive")
    set_seed(args.seed)
    out_dir = Path(args.work_dir) / PROCESSED_DIR
    raw = load_preference_data(args.dataset)  # first: a mistyped --dataset path is said before the model loads
    tokenizer = load_tokenizer(args.model)
    if "test" not in raw:
        print(f"{args.dataset} has no test split: holding out {args.test_share:.0%} of its pairs as test")
        raw = raw["train"].train_test_split(test_size=args.test_share, seed=args.seed)

    stats = {
        "base_model": resolve_model_name(args.model),
        "dataset": resolve_model_name(args.dataset),
        "filter_scope": args.filter_scope,
    }
    stats |= {"char_limit": args.char_limit, "max_length": args.max_length, "rows_read": {}, "rows_dropped": {}}
    splits = {}
    for split, subset in (("train", args.train_subset), ("test", args.test_subset)):
        ds = raw[split]
        if subset and subset < len(ds):
            ds = ds.shuffle(seed=args.seed).select(range(subset))
        # 1. filter: every pair is counted under the first rule that drops it
        reasons = [drop_reason(ex, args.filter_scope, args.char_limit) for ex in tqdm(ds, desc=f"filter {split}")]
        counts = Counter(reasons)
        stats["rows_read"][split] = len(ds)
        stats["rows_dropped"][split] = {rule: counts.get(rule, 0) for rule in FILTER_RULES}
        ds = ds.select([i for i, r in enumerate(reasons) if r is None])
        check(len(ds) > 0, f"--dataset {args.dataset}: no {split} pair survives the filter")
        # 2. the text columns every later script draws prompts and pairs from
        splits[split] = ds.map(add_text_columns, desc=f"split {split} conversations")

    # 3. tokenize chosen and rejected for the reward model (left truncation keeps the reply)
    def tokenize(batch):
        chosen = tokenizer(list(batch["chosen"]), truncation=True, max_length=args.max_length)
        rejected = tokenizer(list(batch["rejected"]), truncation=True, max_length=args.max_length)
        return {
            "input_ids_chosen": chosen["input_ids"],
            "attention_mask_chosen": chosen["attention_mask"],
            "input_ids_rejected": rejected["input_ids"],
            "attention_mask_rejected": rejected["attention_mask"],
        }

    splits = {k: v.map(tokenize, batched=True, desc=f"tokenize {k}") for k, v in splits.items()}
    # 4. validation held out from the filtered train split
    held_out = splits["train"].train_test_split(test_size=args.validation_share, seed=args.seed)
    from datasets import DatasetDict

    data = DatasetDict(train=held_out["train"], validation=held_out["test"], test=splits["test"])
    if args.gold_share:
        # 5. the gold reward model's pairs: disjoint from what the proxy reward model and the policies read
        gold = data["train"].train_test_split(test_size=args.gold_share, seed=args.seed + 1)
        data["train"], data[GOLD_SPLIT] = gold["train"], gold["test"]
    check(min(map(len, data.values())) > 0, f"--dataset {args.dataset}: a split is empty after filtering")

    stats["rows"] = {k: len(v) for k, v in data.items()}
    lengths = [len(ids) for ids in list(data["train"]["input_ids_chosen"]) + list(data["train"]["input_ids_rejected"])]
    stats["train_token_lengths"] = percentiles(lengths) | {
        "truncated_share": round(sum(n >= args.max_length for n in lengths) / len(lengths), 4)
    }

    # 6. save under a temporary name, then rename: a half-written folder is never taken for a finished one
    tmp = out_dir.with_name(f"{PROCESSED_DIR}.tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp))
    atomic_write_json(tmp / "stats.json", stats)
    replace_folder(tmp, out_dir)

    dropped = {rule: sum(stats["rows_dropped"][s][rule] for s in ("train", "test")) for rule in FILTER_RULES}
    print(f"read {stats['rows_read']}, dropped by rule {dropped}")
    print(f"rows per split {stats['rows']}, train token lengths {stats['train_token_lengths']}")
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    run(main, Args, TINY)
