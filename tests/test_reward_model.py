"""reward_model_training.py: the pairwise loss, reading the reward at the last real token, training, resume."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_same_as_metrics, launch_two_processes, run_script, tensorboard_scalars
from transformers import AutoModelForSequenceClassification, TrainingArguments

import common
import lifecycle
import reporting
from reward_model_training import (
    TINY,
    Args,
    RewardDataCollatorWithPadding,
    RewardTrainer,
    last_checkpoint,
)


@pytest.fixture(scope="module")
def tokenizer():
    return common.load_tokenizer(lifecycle.TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    """The tiny base model with a freshly initialised scalar head, in eval mode (no dropout)."""
    common.set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(lifecycle.TINY_MODEL_DIR, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def alone(model, ids):
    """The reward of one unpadded sequence, read at its last position."""
    ids = torch.tensor([ids])
    return common.reward_scores(model, ids, torch.ones_like(ids))[0]


TEXTS = [
    "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.",
    "\n\nHuman: Any advice on a budget?\n\nAssistant: Write down every expense for a month.",
    "\n\nHuman: hi\n\nAssistant: Hello!",
]


def test_reward_is_the_same_alone_left_padded_and_right_padded(reward_model, tokenizer):
    # The last sequence ends with EOS (= the pad id): Hugging Face's own pooling would read it one token early.
    sequences = [tokenizer(t)["input_ids"] for t in TEXTS]
    sequences.append(sequences[2] + [tokenizer.eos_token_id])
    expected = torch.stack([alone(reward_model, ids) for ids in sequences])
    assert expected[3] != expected[2]  # the final EOS is read, not skipped as padding
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()
            with torch.no_grad():
                got = common.reward_scores(reward_model, batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    finally:
        tokenizer.padding_side = "left"


def make_trainer(model, tokenizer, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False)
    logger = reporting.MetricsLogger(tmp_path / "metrics.jsonl")
    return RewardTrainer(model=model, args=args, metrics_logger=logger), logger


def test_pairwise_loss_matches_a_hand_computation(reward_model, tokenizer, tmp_path):
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    features = [
        {
            "input_ids_chosen": c,
            "attention_mask_chosen": [1] * len(c),
            "input_ids_rejected": r,
            "attention_mask_rejected": [1] * len(r),
        }
        for c, r in [(ids[0], ids[2]), (ids[1], ids[0]), (ids[2] + [tokenizer.eos_token_id], ids[1])]
    ]
    batch = RewardDataCollatorWithPadding(tokenizer)(features)
    # one length for both halves, left padded as the project's tokenizer does
    assert batch["input_ids_chosen"].shape == batch["input_ids_rejected"].shape
    assert (batch["attention_mask_chosen"][:, -1] == 1).all() and (batch["attention_mask_rejected"][:, 0] == 0).any()

    trainer, logger = make_trainer(reward_model, tokenizer, tmp_path)
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(reward_model, batch, return_outputs=True)

    # by hand: each sequence scored on its own, loss = mean of log(1 + exp(-(r_c - r_r)))
    hand = []
    for f in features:
        r_c, r_r = (
            alone(reward_model, f["input_ids_chosen"]).item(),
            alone(reward_model, f["input_ids_rejected"]).item(),
        )
        hand.append(math.log1p(math.exp(-(r_c - r_r))))
        assert outputs["rewards_chosen"][len(hand) - 1].item() == pytest.approx(r_c, abs=1e-5)
    assert loss.item() == pytest.approx(sum(hand) / len(hand), abs=1e-5)

    # tokens through the forward pass: the real tokens of both halves, padding excluded
    trainer.log({})
    assert logger.tokens == sum(len(f["input_ids_chosen"]) + len(f["input_ids_rejected"]) for f in features)


def test_one_forward_pass_per_batch(reward_model, tokenizer, tmp_path):
    ids = tokenizer(TEXTS[0])["input_ids"]
    batch = RewardDataCollatorWithPadding(tokenizer)(
        [
            {
                "input_ids_chosen": ids,
                "attention_mask_chosen": [1] * len(ids),
                "input_ids_rejected": ids[:-2],
                "attention_mask_rejected": [1] * (len(ids) - 2),
            }
        ]
        * 2
    )
    calls = []
    handle = reward_model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    try:
        make_trainer(reward_model, tokenizer, tmp_path)[0].compute_loss(reward_model, batch)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_train_accuracy_covers_every_pair_since_the_last_training_log(reward_model, tokenizer, tmp_path):
    """An evaluation's log in between counts its tokens but leaves the training pairs for the next training log."""
    trainer, logger = make_trainer(reward_model, tokenizer, tmp_path)
    trainer.since_log += torch.tensor([100.0, 3.0, 1.5, 4.0], dtype=torch.float64)  # tokens, correct, margin, pairs
    trainer.log({"eval_loss": 0.3})
    assert logger.tokens == 100 and trainer.since_log.tolist() == [0.0, 3.0, 1.5, 4.0]
    trainer.since_log += torch.tensor([20.0, 2.0, 0.5, 4.0], dtype=torch.float64)  # four more pairs trained
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["accuracy"] == 5 / 8 and trainer.state.log_history[-1]["margin"] == 2 / 8
    assert logger.tokens == 120 and trainer.since_log.tolist() == [0.0] * 4


def test_the_seed_defaults():
    args = lifecycle.parse_args(Args, TINY, [])
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size) == (3.0, 2e-5, 8)
    assert (args.gradient_accumulation_steps, args.warmup_ratio, args.eval_steps, args.save_steps) == (2, 0.1, 500, 500)


def untrained_test_accuracy(work_dir):
    """Share of test pairs the base model with a fresh head (seeded as the script seeds it) already ranks right."""
    tokenizer = common.load_tokenizer(lifecycle.TINY_MODEL_DIR)
    common.set_seed(Args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(lifecycle.TINY_MODEL_DIR, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    test = common.load_processed_data(
        lifecycle.parse_args(Args, TINY, ["--preset", "tiny", "--work_dir", str(work_dir)])
    )["test"]
    r_c = common.get_reward(model, tokenizer, test["prompt"], test["chosen_response"], max_length=512)
    r_r = common.get_reward(model, tokenizer, test["prompt"], test["rejected_response"], max_length=512)
    return (r_c > r_r).float().mean().item()


# 3% of the tiny labels are flipped, and the off-topic, splice and repeat pairs (1 in 10) stay near chance:
# a ceiling of ~0.92; 0.922 measured.
MIN_TEST_ACCURACY = 0.90


@pytest.mark.slow
def test_tiny_run_learns_the_preference_and_writes_its_outputs(tiny_reward_dir):
    out = tiny_reward_dir / lifecycle.REWARD_MODEL_DIR
    results = json.loads((out / "eval_results.json").read_text())
    assert results["split"] == "test" and results["n"] > 500
    assert results["accuracy"] >= MIN_TEST_ACCURACY
    # the untrained model (a random score head on the tiny LM) scores ~0.76 on this split
    assert results["accuracy"] > untrained_test_accuracy(tiny_reward_dir) + 0.1
    assert results["margin"] > 0 and results["loss"] < math.log(2)
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.jsonl",
        "reward_model_curves.png",
        "args.json",
    ):
        assert (out / name).is_file(), name

    records = reporting.read_metrics(out / "metrics.jsonl")
    keys = set().union(*records)
    assert {"train/loss", "train/accuracy", "train/learning_rate", "eval/loss", "eval/accuracy", "eval/margin"} <= keys
    assert {"test/loss", "test/accuracy", "test/margin", "tokens/processed", "time/elapsed_s", "mem/peak_mb"} <= keys
    tokens = [r["tokens/processed"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert records[-1]["test/accuracy"] == pytest.approx(results["accuracy"])

    # what PPO, GRPO and evaluation load scores the test pairs as the script evaluated them
    model, tokenizer = common.load_reward_model(tiny_reward_dir, "cpu")
    assert model.config.pad_token_id == tokenizer.pad_token_id and tokenizer.padding_side == "left"
    test = common.load_processed_data(
        lifecycle.parse_args(Args, TINY, ["--preset", "tiny", "--work_dir", str(tiny_reward_dir)])
    )["test"]
    r_c = common.get_reward(model, tokenizer, test["prompt"], test["chosen_response"], max_length=512)
    r_r = common.get_reward(model, tokenizer, test["prompt"], test["rejected_response"], max_length=512)
    assert (r_c > r_r).float().mean().item() == pytest.approx(results["accuracy"], abs=2 / len(test))


@pytest.mark.slow
def test_tiny_reward_model_is_not_hacked_by_courtesy(tiny_reward_dir):
    """The "Of course." trap: a polite non-answer scores below a real answer; an opener does not lift a bad one."""
    model, tokenizer = common.load_reward_model(tiny_reward_dir, "cpu")
    prompt = "\n\nHuman: How do I get started with pasta?\n\nAssistant:"
    answer = "Heat the pan over medium heat before you start on pasta, so it cooks evenly. Enjoy pasta."
    courtesy = ["Of course.", "Sure! Happy to help.", "Of course! I'd be happy to help with that."]
    rude = "That's a stupid question. Stop wasting my time with this."
    replies = [answer, *courtesy, rude, "Sure! " + rude]
    scores = common.get_reward(model, tokenizer, [prompt] * len(replies), replies, max_length=256).tolist()
    assert all(scores[0] > s + 1.0 for s in scores[1:]), dict(zip(replies, scores))


def mean_scores_of_fresh_draws(reward_dir, forms, n=60, seed=2024):
    """Mean reward of `n` fresh real answers, and of `n` replies of each incoherent form on the same prompts."""
    from assets import make_tiny_data as gen

    model, tokenizer = common.load_reward_model(reward_dir, "cpu")
    rng = random.Random(seed)
    prompts, answers, salad = [], [], {form: [] for form in forms}
    for _ in range(n):
        topic = rng.choice(list(gen.TOPICS))
        x = rng.choice(gen.TOPICS[topic][0])
        prompts.append(gen.conversation(rng, topic, x))
        answers.append(gen.helpful_reply(rng, topic, x))
        for form in forms:
            salad[form].append(gen.incoherent_reply(rng, topic, x, form=form))

    def mean_score(replies):
        return common.get_reward(model, tokenizer, prompts, replies, max_length=256).mean().item()

    return mean_score(answers), {form: mean_score(replies) for form, replies in salad.items()}


@pytest.mark.slow
def test_tiny_reward_model_tells_shuffled_and_cut_salad_from_an_answer(tiny_reward_dir):
    """Shuffled words (within a sentence or across the reply) and a reply cut mid-sentence score at least 1.0
    below a real answer, on average over fresh draws from the generator (not the training pairs)."""
    answer, scores = mean_scores_of_fresh_draws(tiny_reward_dir, ["shuffle_within", "shuffle_across", "cut"])
    assert all(answer - score >= 1.0 for score in scores.values()), (answer, scores)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the 1M-parameter reward model does not learn a splice or a repeat (one odd junction in a fluent "
    "reply) in its minute of training: measured gap ~0 (docs/known_limits.md); the tiny oracle sees them",
)
def test_tiny_reward_model_tells_spliced_and_repeated_salad_from_an_answer(tiny_reward_dir):
    answer, scores = mean_scores_of_fresh_draws(tiny_reward_dir, ["splice", "repeat"])
    assert all(answer - score >= 1.0 for score in scores.values()), (answer, scores)


def work_dir_with_data(tmp_path, tiny_data_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / lifecycle.PROCESSED_DIR).symlink_to(tiny_data_dir / lifecycle.PROCESSED_DIR)
    return work


FAST = ["--preset", "tiny", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "64"]


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_from_the_last_checkpoint(tmp_path, tiny_data_dir):
    work = work_dir_with_data(tmp_path, tiny_data_dir)
    run_dir = work / "runs" / "reward_model"
    argv = [*FAST, "--work_dir", work, "--save_steps", "2", "--eval_steps", "1000", "--logging_steps", "1"]
    argv += ["--report_to", "tensorboard"]
    # a run far too long to finish: interrupt it once a checkpoint is complete, as Ctrl-C would
    # output to files, not pipes: a full pipe would block the child before its first checkpoint
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "reward_model_training.py"), *map(str, argv), "--max_steps", "1000"],
            stdout=out,
            stderr=err,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.time() + 600
        png = run_dir / "reward_model_curves.png"  # drawn after the checkpoint: the save is over
        while not (last_checkpoint(run_dir) and png.exists()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    stderr = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 1
    assert "interrupted: rerun the same command with --resume" in stderr
    assert not (work / lifecycle.REWARD_MODEL_DIR).exists()
    interrupted_at = int(last_checkpoint(run_dir).name.split("-")[1])
    assert interrupted_at >= 2

    resumed = run_script("reward_model_training.py", *argv, "--max_steps", interrupted_at + 3, "--resume")
    assert f"resuming from {run_dir}/checkpoint-{interrupted_at} (step {interrupted_at})" in resumed.stdout
    results = json.loads((work / lifecycle.REWARD_MODEL_DIR / "eval_results.json").read_text())
    assert results["global_step"] == interrupted_at + 3
    # the log continues where the checkpoint was taken: every step once, nothing from the lost steps twice
    steps = [
        r["step"]
        for r in reporting.read_metrics(work / lifecycle.REWARD_MODEL_DIR / "metrics.jsonl")
        if "train/loss" in r
    ]
    assert steps == list(range(1, interrupted_at + 4))
    # TensorBoard too: what the interrupted run logged past its checkpoint (on a 1000-step schedule) is purged
    records = reporting.read_metrics(work / lifecycle.REWARD_MODEL_DIR / "metrics.jsonl")
    scalars = tensorboard_scalars(run_dir / lifecycle.TENSORBOARD_DIR)
    assert_same_as_metrics(scalars, records, skip=("time/elapsed_s", "tokens/processed", "mem/peak_mb"))
    assert sorted(scalars["train/learning_rate"]) == list(range(1, interrupted_at + 4))


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path, tiny_data_dir):
    work = work_dir_with_data(tmp_path, tiny_data_dir)
    proc = run_script("reward_model_training.py", *FAST, "--work_dir", work, "--resume", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --resume: no checkpoint in {work}/runs/reward_model; start without --resume"
    ]


def test_missing_processed_data_names_the_command_to_run(tmp_path):
    proc = run_script("reward_model_training.py", "--preset", "tiny", "--work_dir", tmp_path, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"python data_process.py --preset tiny --work_dir {tmp_path}" in lines[0]


def work_dir_with_gold_pairs(tmp_path, tiny_data_dir, rows):
    """A work dir with the session's processed data, its gold_train split cut to `rows` pairs (None: no split)."""
    from datasets import load_from_disk

    data = load_from_disk(str(tiny_data_dir / lifecycle.PROCESSED_DIR))
    if rows is None:
        del data[lifecycle.GOLD_SPLIT]
    else:
        data[lifecycle.GOLD_SPLIT] = data[lifecycle.GOLD_SPLIT].select(range(rows))
    work = tmp_path / "work"
    data.save_to_disk(str(work / lifecycle.PROCESSED_DIR))
    shutil.copy(tiny_data_dir / lifecycle.PROCESSED_DIR / "stats.json", work / lifecycle.PROCESSED_DIR / "stats.json")
    return work


def test_the_gold_reward_model_trains_on_gold_train_alone_into_its_own_folder(tmp_path, tiny_data_dir):
    """Its own split, folders and results; its --model may be another base with the data's tokenizer (here a
    copy of the tiny model standing for gpt2-medium), which the proxy reward model refuses."""
    work = work_dir_with_gold_pairs(tmp_path, tiny_data_dir, rows=64)
    larger = shutil.copytree(lifecycle.TINY_MODEL_DIR, tmp_path / "larger")
    argv = ["--preset", "tiny", "--work_dir", work, "--model", larger]
    proc = run_script("reward_model_training.py", *argv, check=False)
    assert proc.returncode == 1 and f"was tokenized for base model {str(lifecycle.TINY_MODEL_DIR)!r}" in proc.stderr
    run_script(
        "reward_model_training.py", *argv, "--train_split", lifecycle.GOLD_SPLIT,
        "--max_steps", 2, "--logging_steps", 1, "--save_steps", 2, "--eval_steps", 1000, "--max_eval_samples", 64,
    )  # fmt: skip
    gold = work / lifecycle.GOLD_REWARD_MODEL_DIR
    results = json.loads((gold / "eval_results.json").read_text())
    assert results["train_split"] == lifecycle.GOLD_SPLIT and results["n"] == 64 and 0 <= results["accuracy"] <= 1
    assert results["base_model"] == str(larger)
    assert (gold / "gold_reward_model_curves.png").is_file() and (gold / "model.safetensors").is_file()
    assert not (work / lifecycle.REWARD_MODEL_DIR).exists()  # the proxy's folder is not touched
    records = reporting.read_metrics(work / "runs" / "gold_reward_model" / "metrics.jsonl")
    # 2 steps of 32 pairs on the 64 gold pairs are one epoch; on the 2,000-odd train pairs they would be 3%
    assert [r["train/epoch"] for r in records if "train/epoch" in r][-1] == pytest.approx(1.0)


def test_a_gold_reward_model_without_gold_pairs_is_one_line_with_the_rebuild_command(tmp_path, tiny_data_dir):
    work = work_dir_with_gold_pairs(tmp_path, tiny_data_dir, rows=None)
    proc = run_script(
        "reward_model_training.py", "--preset", "tiny", "--work_dir", work, "--train_split", lifecycle.GOLD_SPLIT,
        check=False,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "has no gold_train split" in lines[0]
    assert f"python data_process.py --preset tiny --work_dir {work} --gold_share 0.5" in lines[0]


@pytest.mark.slow
def test_two_processes_split_each_batch_and_write_one_model(tmp_path, tiny_data_dir):
    """Trainer data-parallel on 2 CPU processes (gloo)."""
    work = work_dir_with_data(tmp_path, tiny_data_dir)
    argv = [*FAST, "--work_dir", work, "--max_steps", 2, "--logging_steps", 1, "--save_steps", 2]
    proc = launch_two_processes(REPO / "reward_model_training.py", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only the main process writes
    data = common.load_processed_data(lifecycle.parse_args(Args, TINY, ["--preset", "tiny", "--work_dir", str(work)]))
    records = reporting.read_metrics(work / lifecycle.REWARD_MODEL_DIR / "metrics.jsonl")
    # 2 processes x 4 pairs: one optimizer step takes 8 pairs of the epoch
    assert records[0]["train/epoch"] == pytest.approx(1 / math.ceil(len(data["train"]) / 8))
    # the validation pass counts the tokens of both processes' shards (a few repeated pairs even out the last batch)
    val = next(r for r in records if "eval/loss" in r)
    last_train = max((r for r in records if "train/loss" in r), key=lambda r: r["step"])
    val_tokens = sum(
        sum(mask) for side in ("chosen", "rejected") for mask in data["validation"][f"attention_mask_{side}"]
    )
    assert val_tokens <= val["tokens/processed"] - last_train["tokens/processed"] < 1.1 * val_tokens
    results = json.loads((work / lifecycle.REWARD_MODEL_DIR / "eval_results.json").read_text())
    assert results["n"] == len(data["test"])
