"""SFT_training.py: the masked reply loss against a hand computation, a step that learns, an exact resume, one-line
errors; and `--init_from`: which model PPO, GRPO and DPO start from and keep as their reference."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import pipeline_summary
from safetensors.torch import load_file

import DPO_training
import GRPO_training
import lifecycle
import PPO_training
import reporting
import SFT_training as sft
from common import collate_pairs, disable_dropout, load_causal_lm, load_tokenizer, start_model, tokenize_pairs
from lifecycle import SFT_DIR, UserError, parse_args

PROMPTS = [
    "\n\nHuman: How do I boil an egg?\n\nAssistant:",
    "\n\nHuman: Hi there, I want to cook.\n\nAssistant: What would you like to make?\n\nHuman: Rice.\n\nAssistant:",
]
REPLIES = ["Put it in boiling water for nine minutes, then cool it.", "Rinse it, then simmer it covered."]
SHORT = ("--max_train_samples", 32, "--max_eval_samples", 8, "--per_device_train_batch_size", 4, "--eval_steps", 0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(lifecycle.TINY_MODEL_DIR))


def tiny_args(work_dir, *argv, script=sft):
    return parse_args(script.Args, script.TINY, ["--preset", "tiny", "--work_dir", str(work_dir), *map(str, argv)])


def linked_work_dir(path, source, names=(lifecycle.PROCESSED_DIR,)):
    path.mkdir()
    for name in names:
        (path / name).symlink_to(source / name)
    return path


def batch_of(tokenizer, max_seq_len=512):
    from datasets import Dataset

    rows = [{"prompt": p, "chosen_response": r} for p, r in zip(PROMPTS, REPLIES)]
    items = tokenize_pairs(Dataset.from_list(rows), tokenizer, keys=("chosen",))
    return items, collate_pairs(items, tokenizer.eos_token_id, max_seq_len, keys=("chosen",))


def test_the_reply_loss_is_the_reply_tokens_nll_alone(tokenizer):
    """Summed NLL per row == a hand computation over the reply's tokens and its EOS only: the prompt and the
    padding (the short row is left padded) contribute nothing."""
    model = load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer)
    disable_dropout(model)
    items, batch = batch_of(tokenizer)
    assert batch["input_ids"].shape[0] == 2  # one row per reply: the chosen ones alone
    nll, count = sft.reply_nll(model, batch)
    for row, item in enumerate(items):
        ids = item["prompt"] + item["chosen"] + [tokenizer.eos_token_id]  # the row alone, no padding
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        start = len(item["prompt"])
        expected = -sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
        assert count[row].item() == len(item["chosen"]) + 1
        assert nll[row].item() == pytest.approx(expected.item(), rel=1e-5)
    # a prompt token changed changes nothing that is counted but the reply's context: the count stays the reply's
    assert batch["loss_mask"].sum().item() == sum(len(i["chosen"]) + 1 for i in items)


def test_left_truncation_keeps_the_reply_and_drops_the_prompts_start(tokenizer):
    items, batch = batch_of(tokenizer, max_seq_len=20)
    long = items[1]
    row = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert len(row) == 20 and row[-len(long["chosen"]) - 1 :] == long["chosen"] + [tokenizer.eos_token_id]
    assert row[: 20 - len(long["chosen"]) - 1] == long["prompt"][-(20 - len(long["chosen"]) - 1) :]


def test_a_short_run_changes_the_weights_and_writes_its_folder(tiny_data_dir, tmp_path):
    work = linked_work_dir(tmp_path / "w", tiny_data_dir)
    model = sft.main(tiny_args(work, *SHORT, "--max_steps", 3, "--logging_steps", 1))
    base = load_file(lifecycle.TINY_MODEL_DIR / "model.safetensors")
    trained = load_file(work / SFT_DIR / "model.safetensors")
    moved = max((trained[k] - base[k]).abs().max().item() for k in base if k in trained)
    assert moved > 1e-4
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items() if k in trained)
    records = reporting.read_metrics(work / SFT_DIR / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # step 0: the base model's validation loss
    assert records[0]["eval/perplexity"] == pytest.approx(2.718281828 ** records[0]["eval/loss"], rel=1e-6)
    assert all(r["sft/loss"] > 0 for r in records[1:]) and "eval/loss" in records[-1]
    for name in ("config.json", "tokenizer.json", "args.json", "eval_results.json", "README.md", "sft_curves.png"):
        assert (work / SFT_DIR / name).is_file(), name
    assert "SFT model" in (work / SFT_DIR / "README.md").read_text()


def test_a_killed_run_resumes_bit_identical(tiny_data_dir, tmp_path, monkeypatch):
    argv = (*SHORT, "--max_steps", 4, "--save_every", 2, "--logging_steps", 1)
    straight = sft.main(tiny_args(linked_work_dir(tmp_path / "straight", tiny_data_dir), *argv)).state_dict()
    work = linked_work_dir(tmp_path / "killed", tiny_data_dir)
    save_checkpoint = sft.save_checkpoint

    def killed_after_step_2(path, state):
        save_checkpoint(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        sft.main(tiny_args(work, *argv))
    monkeypatch.undo()
    assert torch.load(work / "runs/sft/checkpoint.pt", weights_only=False)["step"] == 2
    resumed = sft.main(tiny_args(work, *argv, "--resume")).state_dict()
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    steps = [r["step"] for r in reporting.read_metrics(work / SFT_DIR / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="the checkpoint's run has 4 steps, this one 6"):
        sft.main(tiny_args(work, *SHORT, "--max_steps", 6, "--resume"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_seq_len", 1], "--max_seq_len must hold a prompt token and a reply token"),
        (["--per_device_train_batch_size", 0], "--per_device_train_batch_size"),
        (["--learning_rate", 0], "--learning_rate > 0"),
    ],
)
def test_bad_settings_fail_with_one_line(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        sft.main(tiny_args(tmp_path, *argv))


# --- --init_from: the policies' start and reference ------------------------------------------------


def init_args(work, init_from, resume=False):
    preset = lifecycle.PRESETS["tiny"]
    return SimpleNamespace(work_dir=work, init_from=init_from, resume=resume, preset="tiny", model=preset["model"])


def test_init_from_chooses_the_start_and_a_resume_keeps_it(tmp_path, capsys):
    run_dir, base = tmp_path / "runs/dpo", str(lifecycle.TINY_MODEL_DIR.resolve())
    args = init_args(tmp_path, "auto")
    assert start_model(args, run_dir) == base and args.init_from == "base"  # no sft_model/: the base model
    with pytest.raises(UserError, match=r"--init_from sft: .*sft_model not found: train it first with `python "):
        start_model(init_args(tmp_path, "sft"), run_dir)
    (tmp_path / SFT_DIR).mkdir()
    (tmp_path / SFT_DIR / "config.json").write_text("{}")
    (tmp_path / SFT_DIR / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="model.safetensors is .*retrain it with `python SFT_training.py"):
        start_model(init_args(tmp_path, "auto"), run_dir)
    shutil.copy(lifecycle.TINY_MODEL_DIR / "model.safetensors", tmp_path / SFT_DIR)
    # the run started from base above; resumed, it stays on base even beside an SFT model now
    args = init_args(tmp_path, "auto", resume=True)
    assert start_model(args, run_dir) == base and args.init_from == "base"
    with pytest.raises(UserError, match="the run being resumed started from base; resume with --init_from base"):
        start_model(init_args(tmp_path, "sft", resume=True), run_dir)
    args = init_args(tmp_path, "auto")  # a fresh run: the SFT model
    assert start_model(args, run_dir) == str(tmp_path / SFT_DIR) and args.init_from == "sft"
    assert json.loads((run_dir / lifecycle.START_FILE).read_text()) == {"init_from": "sft"}
    assert start_model(init_args(tmp_path, "base"), run_dir) == base
    assert "starting from the base model" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sft_work(tiny_reward_dir, tmp_path_factory):
    """A work dir with the session's data and reward model, and an SFT model trained for a few steps."""
    work = linked_work_dir(tmp_path_factory.mktemp("sft") / "w", tiny_reward_dir)
    (work / lifecycle.REWARD_MODEL_DIR).symlink_to(tiny_reward_dir / lifecycle.REWARD_MODEL_DIR)
    sft.main(tiny_args(work, *SHORT, "--max_steps", 4, "--learning_rate", 1e-3))
    return work


QUICK = {  # a step, and each script's output folder
    PPO_training: (("--total_steps", 1, "--test_prompts", 4, "--eval_prompts", 4), lifecycle.PPO_DIR),
    GRPO_training: (("--total_steps", 1, "--eval_prompts", 4), lifecycle.GRPO_FINAL_DIR),
    DPO_training: (("--max_steps", 1, *SHORT, "--eval_prompts", 4), lifecycle.DPO_DIR),
}


@pytest.mark.parametrize("script", [PPO_training, GRPO_training, DPO_training], ids=lambda s: s.__name__)
def test_each_policy_starts_from_the_sft_model_and_keeps_it_as_its_reference(script, sft_work, tmp_path, monkeypatch):
    work = linked_work_dir(tmp_path / "w", sft_work, (lifecycle.PROCESSED_DIR, lifecycle.REWARD_MODEL_DIR, SFT_DIR))
    loaded = []
    load = script.load_causal_lm
    monkeypatch.setattr(script, "load_causal_lm", lambda path, tok: loaded.append(str(path)) or load(path, tok))
    argv, folder = QUICK[script]
    script.main(tiny_args(work, *argv, script=script))
    assert loaded and set(loaded) == {str(work / SFT_DIR)}  # the policy and its reference (GRPO: a copy)
    assert json.loads((work / folder / "args.json").read_text())["init_from"] == "sft"


def test_init_from_base_beside_an_sft_model_trains_what_a_work_dir_without_one_does(sft_work, tmp_path):
    """--init_from base ignores sft_model/: DPO's weights equal those of a run where no SFT model exists (the
    seed's pipeline)."""
    with_sft = linked_work_dir(tmp_path / "a", sft_work, (lifecycle.PROCESSED_DIR, SFT_DIR))
    without = linked_work_dir(tmp_path / "b", sft_work)
    argv = ("--max_steps", 2, *SHORT)
    a = DPO_training.main(tiny_args(with_sft, *argv, "--init_from", "base", script=DPO_training)).state_dict()
    b = DPO_training.main(tiny_args(without, *argv, script=DPO_training)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_demo_pipeline_evaluates_sft_and_each_policys_kl_to_it(tiny_pipeline):
    summary = pipeline_summary(tiny_pipeline)
    assert list(summary.index[:2]) == ["base", "sft"]
    assert summary.loc["sft", "reference"] == "base"
    assert summary.loc["sft", "kl_ref_mean"] == pytest.approx(summary.loc["sft", "kl_mean"])
    for policy in ("ppo", "grpo", "dpo"):
        assert summary.loc[policy, "reference"] == "sft"
        assert summary.loc[policy, "kl_ref_mean"] == summary.loc[policy, "kl_ref_mean"]  # a number, not NaN
        assert summary.loc[policy, "kl_ref_mean"] != pytest.approx(summary.loc[policy, "kl_mean"])
    import pandas as pd

    frontier = pd.read_csv(tiny_pipeline / "rlhf_eval_frontier.csv")
    assert (frontier.method == "sft").sum() == 1
    assert set(frontier[frontier.method.isin(["ppo", "grpo", "dpo"])].start) == {"sft"}
    assert "sft" in (tiny_pipeline / "ppo_rlhf_model" / "README.md").read_text().split("evaluate_models.py")[-1]
