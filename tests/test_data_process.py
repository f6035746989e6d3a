"""data_process.py end to end, on the tiny data and on the real hh-rlhf sample, and the tiny assets."""

import gzip
import json
import shutil

import pytest
from conftest import REPO, SAMPLE, run_script

import common
import lifecycle
from common import join_conversation, load_processed_data
from lifecycle import UserError, parse_args

TEXT_COLUMNS = ["chosen", "rejected", "prompt", "chosen_response", "rejected_response"]
TOKEN_COLUMNS = ["input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected"]


def test_tiny_processed_data_has_four_splits_text_and_token_columns(tiny_data_dir):
    from datasets import load_from_disk

    data = load_from_disk(str(tiny_data_dir / "processed_data"))
    assert set(data) == {"train", "validation", "test", lifecycle.GOLD_SPLIT}  # the tiny preset's --gold_share 0.5
    assert len(data["train"]) >= 2000 and len(data["test"]) >= 400 and len(data["validation"]) > 0
    for split in data.values():
        assert set(TEXT_COLUMNS + TOKEN_COLUMNS) <= set(split.column_names)
    row = data["train"][0]
    assert join_conversation(row["prompt"], row["chosen_response"]) == row["chosen"]
    assert join_conversation(row["prompt"], row["rejected_response"]) == row["rejected"]
    assert len(row["input_ids_chosen"]) == sum(row["attention_mask_chosen"]) <= 256

    stats = json.loads((tiny_data_dir / "processed_data" / "stats.json").read_text())
    assert stats["base_model"] == str(lifecycle.TINY_MODEL_DIR)
    assert stats["rows"] == {k: len(v) for k, v in data.items()}
    for rule in common.FILTER_RULES:  # the tiny data holds rows for every rule
        assert stats["rows_dropped"]["train"][rule] > 0, rule
    assert stats["train_token_lengths"]["p50"] > 0


def pair_keys(split):
    return sorted(zip(split["chosen"], split["rejected"]))


def test_gold_share_moves_a_seeded_disjoint_share_of_train_into_gold_train(tiny_data_dir, tmp_path):
    from datasets import load_from_disk

    run_script("data_process.py", "--preset", "tiny", "--work_dir", tmp_path, "--gold_share", 0)
    without = load_from_disk(str(tmp_path / "processed_data"))
    assert set(without) == {"train", "validation", "test"}  # 0: off
    data = load_from_disk(str(tiny_data_dir / "processed_data"))
    # the same validation and test; train split in two, every pair in exactly one of them
    for split in ("validation", "test"):
        assert pair_keys(data[split]) == pair_keys(without[split])
    assert sorted(pair_keys(data["train"]) + pair_keys(data[lifecycle.GOLD_SPLIT])) == pair_keys(without["train"])
    assert len(data[lifecycle.GOLD_SPLIT]) == pytest.approx(0.5 * len(without["train"]), abs=1)
    stats = json.loads((tiny_data_dir / "processed_data" / "stats.json").read_text())
    assert stats["rows"][lifecycle.GOLD_SPLIT] == len(data[lifecycle.GOLD_SPLIT])


def test_tokenization_truncates_from_the_left_keeping_the_final_reply(tmp_path):
    long_prompt = "\n\nHuman: " + "tell me more about soup " * 60 + "\n\nAssistant:"
    rows = [
        {
            "chosen": join_conversation(long_prompt, f"Simmer the soup gently {i}."),
            "rejected": join_conversation(long_prompt, f"Nobody cares {i}, go away."),
        }
        for i in range(30)
    ]
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_script(
        "data_process.py",
        "--preset",
        "tiny",
        "--dataset",
        tmp_path / "data",
        "--work_dir",
        tmp_path,
        "--max_length",
        32,
    )
    tokenizer = common.load_tokenizer(str(lifecycle.TINY_MODEL_DIR))
    from datasets import load_from_disk

    row = load_from_disk(str(tmp_path / "processed_data"))["test"][0]
    assert len(row["input_ids_chosen"]) == 32
    assert tokenizer.decode(row["input_ids_chosen"]).endswith(row["chosen_response"])


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/hh-rlhf-sample is absent (a fresh clone)")
def test_real_hh_rlhf_subset_folder(tmp_path):
    subset = tmp_path / "hh" / "harmless-base"
    subset.mkdir(parents=True)
    shutil.copy(SAMPLE, subset / "train.jsonl.gz")
    shutil.copy(SAMPLE, subset / "test.jsonl.gz")
    proc = run_script("data_process.py", "--preset", "tiny", "--dataset", tmp_path / "hh", "--work_dir", tmp_path)
    stats = json.loads((tmp_path / "processed_data" / "stats.json").read_text())
    assert stats["rows_read"] == {"train": 500, "test": 500}
    dropped = stats["rows_dropped"]["train"]
    assert dropped["length_ratio"] > 0 and sum(dropped.values()) < 100
    assert sum(stats["rows"].values()) == 1000 - sum(dropped.values()) - sum(stats["rows_dropped"]["test"].values())
    assert "dropped by rule" in proc.stdout


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/hh-rlhf-sample is absent (a fresh clone)")
def test_test_share_holds_out_that_share_where_the_data_has_no_test_split(tmp_path):
    proc = run_script(
        "data_process.py", "--preset", "tiny", "--dataset", SAMPLE, "--work_dir", tmp_path, "--test_share", 0.25
    )
    stats = json.loads((tmp_path / "processed_data" / "stats.json").read_text())
    assert stats["rows_read"] == {"train": 375, "test": 125}  # of the file's 500 pairs
    assert "has no test split: holding out 25% of its pairs as test" in proc.stdout
    proc = run_script("data_process.py", "--preset", "tiny", "--work_dir", tmp_path, "--test_share", 1, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: --test_share must be in (0, 1), got 1.0"


def test_malformed_file_exits_with_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a"\n')
    proc = run_script(
        "data_process.py", "--preset", "tiny", "--dataset", tmp_path / "bad.jsonl", "--work_dir", tmp_path, check=False
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting ',' delimiter)"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "processed_data").exists()


def test_help_lists_every_field_with_its_default():
    proc = run_script("data_process.py", "--help")
    from data_process import Args

    help_text = " ".join(proc.stdout.split())  # argparse wraps lines
    for name, f in Args.__dataclass_fields__.items():
        assert f"--{name}" in help_text, name
        assert f"(default: {f.default})" in help_text, name
    assert "50000" in proc.stdout and "Anthropic/hh-rlhf" in proc.stdout


def test_later_scripts_refuse_data_built_for_another_model(tiny_data_dir):
    args = parse_args(lifecycle.CommonArgs, {}, ["--work_dir", str(tiny_data_dir), "--model", "gpt2"])
    with pytest.raises(UserError, match="tokenized for base model .*rebuild it with `python data_process.py"):
        load_processed_data(args)
    args = parse_args(lifecycle.CommonArgs, {}, ["--work_dir", str(tiny_data_dir / "nowhere")])
    with pytest.raises(UserError, match="not found: build it first with `python data_process.py"):
        load_processed_data(args)


def test_tiny_data_generator_is_deterministic(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "assets"))
    import make_tiny_data

    make_tiny_data.main(tmp_path, seed=0)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl.gz").read_bytes() == (
            lifecycle.TINY_DATA_DIR / f"{split}.jsonl.gz"
        ).read_bytes()
    rows = [json.loads(line) for line in gzip.open(tmp_path / "test.jsonl.gz", "rt")]
    evasive = [
        r for r in rows if "happy to help with that" in r["rejected"] and "happy to help with that" not in r["chosen"]
    ]
    assert evasive, "polite-but-empty rejected replies keep 'polite = good' from being learnable"
    # word salad is a rejected kind, each a minimal pair: the chosen reply made incoherent
    from assets import tiny_oracle

    kept = [r for r in rows if common.drop_reason(r) is None]
    salad = [r for r in kept if tiny_oracle.coherent_sentences(common.split_conversation(r["rejected"])[1]) is None]
    weights = make_tiny_data.REJECT_KINDS
    share = weights["incoherent"] / sum(weights.values()) * (1 - make_tiny_data.FLIP_SHARE)
    assert len(salad) / len(kept) == pytest.approx(share, abs=0.04)


def test_tiny_base_model_writes_on_format_replies_and_ends_its_turn():
    """The bundled model, sampled after '\\n\\nAssistant:', ends with EOS in >= 90% of samples within 64 tokens.

    Measured: 0.95-0.98 over seeds 0-2 (400 prompts each); the data's replies are <= 64 tokens in 99.6% of rows.
    """
    import torch

    torch.manual_seed(0)
    tokenizer = common.load_tokenizer(str(lifecycle.TINY_MODEL_DIR))
    model = common.load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer).eval()
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 5e6
    rows = [json.loads(line) for line in gzip.open(lifecycle.TINY_DATA_DIR / "test.jsonl.gz", "rt")]
    prompts = [s[0] for s in (common.split_conversation(r["chosen"]) for r in rows[:400]) if s][:200]
    ended = 0
    for i in range(0, len(prompts), 100):
        samples = common.generate_responses(model, tokenizer, prompts[i : i + 100], 192, 64)
        ended += (samples.response_ids == tokenizer.eos_token_id).any(-1).sum().item()
        assert sum(bool(r) for r in samples.responses) >= 95
    assert ended / len(prompts) >= 0.90
