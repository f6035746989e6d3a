"""Reward functions (`common.RewardMix`, `--reward_funcs`, `--reward_weights`, `--missing_eos_penalty`): the values
each one gives against a hand computation, a user's function called with the decoded prompts and replies, its
mistakes as one line each, the oracle's refusal of data that is not the tiny world's, and tiny runs of PPO and GRPO
(with the GRPO variants) that learn from them, the evaluation picking up the oracle-trained GRPO."""

import json
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import SCRIPT_ENV, run_script

from common import RewardMix, Samples, load_tokenizer
from lifecycle import PROCESSED_DIR, TINY_DATA_DIR, TINY_MODEL_DIR, UserError, grpo_dirs
from reporting import read_metrics

TOKENIZER = load_tokenizer(str(TINY_MODEL_DIR))
EOS = TOKENIZER.eos_token_id

# A tiny prompt, a real answer to it (the oracle's "good") and a reply that is not one
PROMPT = "\n\nHuman: Can you give me some tips for history?\n\nAssistant:"
GOOD = (
    " Sure! Make a schedule for history that starts weeks before the deadline. Test yourself on history instead of "
    "rereading, recall builds memory."
)
BAD = " I won't help with that."


def mix_args(work_dir, funcs, weights="", penalty=0.0):
    return SimpleNamespace(
        reward_funcs=funcs, reward_weights=weights, missing_eos_penalty=penalty, work_dir=str(work_dir),
        reward_max_length=64,
    )  # fmt: skip


def samples(replies, ended):
    """Samples of `replies` to PROMPT: each reply's tokens, then an EOS where `ended` says so, right padded."""
    ids = [TOKENIZER(r)["input_ids"] + ([EOS] if end else []) for r, end in zip(replies, ended)]
    width = max(map(len, ids)) + 1
    response_ids = torch.tensor([row + [EOS] * (width - len(row)) for row in ids])
    response_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    query = torch.tensor([TOKENIZER(PROMPT)["input_ids"]] * len(replies))
    return Samples(query, torch.ones_like(query), response_ids, response_mask, [PROMPT] * len(replies), list(replies))


def tiny_work(tmp_path, dataset=TINY_DATA_DIR):
    (tmp_path / PROCESSED_DIR).mkdir(exist_ok=True)
    (tmp_path / PROCESSED_DIR / "stats.json").write_text(json.dumps({"dataset": str(dataset)}))
    return tmp_path


def test_each_function_weight_and_the_missing_eos_penalty_by_hand(tmp_path, monkeypatch):
    """oracle (1 for a real answer), length (minus the reply's tokens, EOS not counted) and a user's function, each
    weighted, less the penalty for the reply that never ended; the user's function sees the decoded text."""
    (tmp_path / "my_rewards.py").write_text(
        "calls = []\n\ndef chars(prompts, replies):\n    calls.append((prompts, replies))\n"
        "    return [len(r) for r in replies]\n"
    )
    monkeypatch.chdir(tmp_path)  # importable from the working directory, as the docs say
    mix = RewardMix(mix_args(tiny_work(tmp_path), "oracle,length,my_rewards:chars", "2,0.1,0.01", 0.5), "cpu")
    batch = samples([GOOD, BAD, GOOD], ended=[True, True, False])
    total, parts = mix(batch, TOKENIZER)

    import my_rewards

    assert my_rewards.calls == [([PROMPT] * 3, [GOOD, BAD, GOOD])]
    tokens = [len(TOKENIZER(r)["input_ids"]) for r in (GOOD, BAD, GOOD)]
    assert parts["oracle"].tolist() == [1.0, 0.0, 1.0]
    assert parts["length"].tolist() == [-t for t in tokens]
    assert parts["my_rewards:chars"].tolist() == [len(GOOD), len(BAD), len(GOOD)]
    expected = [2 * o - 0.1 * t + 0.01 * c - 0.5 * (not e) for o, t, c, e in
                zip([1, 0, 1], tokens, [len(GOOD), len(BAD), len(GOOD)], [True, True, False])]  # fmt: skip
    torch.testing.assert_close(total, torch.tensor(expected), rtol=0, atol=1e-5)
    assert (
        mix.describe() == "2 x oracle + 0.1 x length + 0.01 x my_rewards:chars, less 0.5 for a reply that never ended"
    )


USER_MISTAKES = [
    (
        "nosuchmodule:f",
        "",
        r"--reward_funcs nosuchmodule:f: cannot import nosuchmodule \(No module named 'nosuchmodule'\)",
    ),
    ("bad_rewards:missing", "def f(prompts, replies):\n    return []\n", "bad_rewards has no function 'missing'"),
    ("bad_rewards:f", "def f(replies):\n    return []\n", r"f\(replies\) cannot be called as f\(prompts, replies\)"),
    ("bad_rewards:f", "def f(prompts, replies):\n    return [1.0]\n", "returned 1 rewards for 2 replies"),
    (
        "bad_rewards:f",
        "def f(prompts, replies):\n    return [1.0, float('nan')]\n",
        r"reward nan \(not finite\) for reply 1",
    ),
    ("bad_rewards:f", "def f(prompts, replies):\n    return None\n", "expected a list of 2 numbers, got NoneType"),
    ("bad_rewards:f", "import torch\ndef f(prompts, replies):\n    return torch.ones(2, 2)\n", "got Tensor"),
    ("bad_rewards:f", "raise RuntimeError('broken module')\n", r"cannot import bad_rewards \(broken module\)"),
    ("lenght", "", "--reward_funcs lenght: unknown; expected model, gold, oracle, length or module:function"),
]


@pytest.mark.parametrize("spec, module, message", USER_MISTAKES)
def test_a_user_mistake_is_one_line_naming_the_function(spec, module, message, tmp_path, monkeypatch):
    if module:
        (tmp_path / "bad_rewards.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_rewards", raising=False)  # each case imports its own
    with pytest.raises(UserError) as error:
        RewardMix(mix_args(tiny_work(tmp_path), spec), "cpu")(samples([GOOD, BAD], [True, True]), TOKENIZER)
    assert "\n" not in str(error.value)
    assert error.match(message)


@pytest.mark.parametrize(
    "funcs, weights, message",
    [
        ("oracle,length", "1", "--reward_weights has 1 weights for 2 --reward_funcs"),
        ("oracle", "one", "--reward_weights one: expected a comma list of numbers"),
        ("oracle,oracle", "", "a function named twice"),
    ],
)
def test_bad_weights_are_one_line(funcs, weights, message, tmp_path):
    with pytest.raises(UserError, match=message):
        RewardMix(mix_args(tiny_work(tmp_path), funcs, weights), "cpu")


def test_the_oracle_refuses_data_that_is_not_the_tiny_worlds(tmp_path):
    with pytest.raises(UserError, match="--reward_funcs oracle: the oracle knows the tiny data only"):
        RewardMix(mix_args(tiny_work(tmp_path, "/data/hh-rlhf"), "oracle"), "cpu")


def test_ppo_learns_from_a_user_function_beside_the_reward_model(work, tmp_path):
    """A tiny PPO run on the model's score plus a user's function (imported from PYTHONPATH): each part logged as
    reward/<name>, the score the weighted sum, the mix on the model card; a missing module stops it in one line."""
    (tmp_path / "short.py").write_text("def words(prompts, replies):\n    return [-len(r.split()) for r in replies]\n")
    env = {**SCRIPT_ENV, "PYTHONPATH": str(tmp_path)}
    argv = ["--preset", "tiny", "--work_dir", work, "--total_steps", 2, "--rollout_batch_size", 4,
            "--num_minibatches", 1, "--max_new_tokens", 12, "--test_prompts", 0, "--eval_every", 0]  # fmt: skip
    run_script("PPO_training.py", *argv, "--reward_funcs", "model,short:words", "--reward_weights", "1,0.05", env=env)
    records = read_metrics(work / "ppo_rlhf_model" / "metrics.jsonl")
    for r in records:
        assert r["objective/scores"] == pytest.approx(r["reward/model"] + 0.05 * r["reward/short:words"], abs=1e-5)
        assert r["reward/short:words"] < 0
    card = (work / "ppo_rlhf_model" / "README.md").read_text()
    assert "Its reward: 1 x model + 0.05 x short:words." in card
    proc = run_script("PPO_training.py", *argv, "--reward_funcs", "nosuch:f", check=False, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("cannot import nosuch (No module named 'nosuch')")
    assert "Traceback" not in proc.stderr


def test_grpo_against_the_oracle_with_the_variants_then_the_evaluation_shows_it(work):
    """The opt-in stage's command with the new paths switched on (RLOO, the KL in the reward, the dapo loss, clip-
    higher with a reused rollout, truncated replies masked, a missing-EOS penalty, a length term): its own folders
    and metrics; then the evaluation shows it as grpo_oracle, in the table and on the frontier."""
    argv = ["--preset", "tiny", "--work_dir", work, "--total_steps", 2, "--rollout_batch_size", 2, "--group_size", 3,
            "--max_new_tokens", 16, "--eval_prompts", 6, "--eval_every", 2, "--snapshot_every", 1,
            "--reward_funcs", "oracle,length", "--reward_weights", "1,0.01", "--missing_eos_penalty", 0.5,
            "--run_name", "grpo_oracle", "--advantage", "rloo", "--kl_in", "reward", "--loss_type", "dapo",
            "--updates_per_rollout", 2, "--epsilon_high", 0.28, "--mask_truncated_completions"]  # fmt: skip
    out = run_script("GRPO_training.py", *argv).stdout
    # tiny replies run to about 30 tokens: at 16 most are cut, said once
    assert out.count("of the replies hit --max_new_tokens 16 without ending") == 1, out[-2000:]
    best, final = (work / name for name in grpo_dirs("grpo_oracle"))
    assert (best / "best.json").is_file() and (final / "config.json").is_file()
    assert (work / "runs" / "grpo_oracle" / "snapshots" / "step-1").is_dir()
    assert not (work / "grpo_best").exists() and not (work / "runs" / "grpo").exists()
    records = read_metrics(final / "metrics.jsonl")
    for r in records[1:]:
        for key in ("reward/oracle", "reward/length", "grpo/clip_ratio/low", "grpo/clip_ratio/high",
                    "response/truncated_share"):  # fmt: skip
            assert key in r, key
        assert 0 <= r["reward/oracle"] <= 1 and r["reward/length"] <= -1
    assert (
        "Its reward: 1 x oracle + 0.01 x length, less 0.5 for a reply that never ended."
        in (final / "README.md").read_text()
    )

    # a --resume that would change what the run optimises is one line, before any step
    swapped = [*argv[: argv.index("--loss_type")], "--loss_type", "grpo", *argv[argv.index("--loss_type") + 2 :]]
    proc = run_script("GRPO_training.py", *swapped, "--total_steps", 3, "--resume", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].endswith(
        "--resume: the checkpoint was trained with --loss_type dapo, not grpo: resume with the same --loss_type, or "
        "start afresh without --resume"
    )

    run_script("evaluate_models.py", "--preset", "tiny", "--work_dir", work, "--num_prompts", 8, "--best_of_n", 0)
    summary = pd.read_excel(work / "rlhf_eval_results_with_base.xlsx", sheet_name="summary").set_index("model")
    assert "grpo_oracle" in summary.index and "oracle_good" in summary.columns
    frontier = pd.read_csv(work / "rlhf_eval_frontier.csv")
    assert frontier[frontier.method == "grpo_oracle"].step.tolist() == [1, 2]  # its snapshot, then its final policy
