"""DPO_training.py: the masked log-probs, the loss and its gradient, padding, resume, data parallelism, a tiny run."""

import json
import math

import pytest
import torch
from conftest import (
    REPO,
    assert_same_as_metrics,
    assert_same_snapshots,
    launch_two_processes,
    pipeline_output,
    pipeline_summary,
    tensorboard_scalars,
)
from safetensors.torch import load_file

import common
import DPO_training as dpo
import lifecycle
import reporting
from common import join_conversation, load_causal_lm, load_tokenizer
from lifecycle import UserError, parse_args

PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
LONG_PROMPT = "\n\nHuman: Hi there, I want to cook.\n\nAssistant: What would you like to make?" + PROMPT
REPLIES = [
    ("Put it in boiling water for nine minutes, then cool it.", "I don't know, eggs are boring."),
    ("Boil water, add the egg and wait.", "Plant tomatoes where they get six hours of sun a day."),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(lifecycle.TINY_MODEL_DIR))


@pytest.fixture(scope="module")
def model(tokenizer):
    model = load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer)
    dpo.disable_dropout(model)
    return model


def make_pairs(tokenizer):
    from datasets import Dataset

    rows = [
        {"prompt": prompt, "chosen_response": c, "rejected_response": r}
        for prompt, (c, r) in zip([PROMPT, LONG_PROMPT], REPLIES)
    ]
    return dpo.tokenize_pairs(Dataset.from_list(rows), tokenizer)


def tiny_args(work_dir, *argv):
    return parse_args(dpo.Args, dpo.TINY, ["--preset", "tiny", "--work_dir", str(work_dir), *map(str, argv)])


# --- sequences and masks --------------------------------------------------------------------


def test_reply_tokens_are_the_joined_texts_tokens_after_the_prompt(tokenizer, tiny_data_dir):
    """On every pair of the tiny data: prompt ids + reply ids = the ids of join_conversation(prompt, reply)
    = tokenizer(prompt) + tokenizer(" " + reply), the split GPT-2's pre-tokenizer makes."""
    from datasets import load_from_disk

    for split in load_from_disk(str(tiny_data_dir / lifecycle.PROCESSED_DIR)).values():
        pairs = dpo.tokenize_pairs(split, tokenizer)
        for key in ("chosen", "rejected"):
            replies = tokenizer([" " + r for r in split[f"{key}_response"]])["input_ids"]
            joined = tokenizer([join_conversation(p, r) for p, r in zip(split["prompt"], split[f"{key}_response"])])
            for pair, reply, ids in zip(pairs, replies, joined["input_ids"]):
                assert pair[key] == reply and pair["prompt"] + pair[key] == ids


def test_build_sequence_cuts_the_prompt_from_the_left_and_a_long_reply_from_the_right():
    eos = 0
    ids, mask = common.build_sequence([1, 2, 3, 4, 5], [6, 7], eos, max_seq_len=5)
    assert ids == [4, 5, 6, 7, eos] and mask == [0, 0, 1, 1, 1]  # the prompt keeps its end
    ids, mask = common.build_sequence([1, 2, 3], [6, 7, 8, 9, 10], eos, max_seq_len=4)
    assert ids == [3, 6, 7, 8] and mask == [0, 1, 1, 1]  # one prompt token left; the reply loses its tail and EOS
    ids, mask = common.build_sequence([1, 2], [6], eos, max_seq_len=512)
    assert ids == [1, 2, 6, eos] and mask == [0, 0, 1, 1]


def test_collate_stacks_chosen_then_rejected_with_masks_from_lengths(tokenizer):
    pairs = make_pairs(tokenizer)
    batch = dpo.collate_pairs(pairs, tokenizer.eos_token_id, max_seq_len=512)
    assert batch["input_ids"].shape[0] == 4 and batch["idx"].tolist() == [0, 1]
    for row, (pair, key) in enumerate([(p, k) for k in ("chosen", "rejected") for p in pairs]):
        n_real, n_reply = len(pair["prompt"]) + len(pair[key]) + 1, len(pair[key]) + 1
        assert batch["attention_mask"][row].sum() == n_real and batch["attention_mask"][row, -n_real:].all()
        assert batch["loss_mask"][row].sum() == n_reply and batch["loss_mask"][row, -n_reply:].all()
        assert batch["input_ids"][row, -1] == tokenizer.eos_token_id  # every reply ends in EOS (= the pad id)


# --- log-probs ------------------------------------------------------------------------------


@torch.no_grad()
def test_sequence_logps_matches_a_per_token_loop(tokenizer, model):
    pairs = make_pairs(tokenizer)
    batch = dpo.collate_pairs(pairs, tokenizer.eos_token_id, max_seq_len=512)
    got = dpo.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    rows = [p["prompt"] + p[key] + [tokenizer.eos_token_id] for key in ("chosen", "rejected") for p in pairs]
    for i, (row, n_prompt) in enumerate(zip(rows, [len(p["prompt"]) for p in pairs] * 2)):
        expected = 0.0
        for t in range(n_prompt, len(row)):  # each reply token from its own unpadded prefix
            logits = model(torch.tensor([row[:t]])).logits[0, -1].double()
            expected += torch.log_softmax(logits, -1)[row[t]].item()
        assert got[i].item() == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_left_and_right_padding_give_the_same_logps(tokenizer, model):
    pairs = make_pairs(tokenizer)
    logps = {}
    for side in ("left", "right"):
        batch = dpo.collate_pairs(pairs, tokenizer.eos_token_id, max_seq_len=512, padding_side=side)
        assert (batch["attention_mask"][:, 0] == 0).any() or (batch["attention_mask"][:, -1] == 0).any()
        logps[side] = dpo.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert torch.allclose(logps["left"], logps["right"], atol=1e-5)


# --- the loss -------------------------------------------------------------------------------


def hand_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, eps):
    """Eq. 7 (+ cDPO) written out with log(1 + exp(-x)) = -log sigmoid(x)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    return ((1 - eps) * torch.log1p(torch.exp(-beta * h)) + eps * torch.log1p(torch.exp(beta * h))).mean()


def test_dpo_loss_on_a_hand_computed_pair():
    pi_c, pi_r, ref_c, ref_r = (torch.tensor([v], requires_grad=True) for v in (-10.0, -12.0, -11.0, -11.0))
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1, 0.0, "sigmoid")
    # h = (-10 + 12) - 0 = 2; loss = log(1 + e^-0.2); d loss / d pi_c = -beta * sigmoid(-0.2)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((0.1, -0.1), abs=1e-6)
    losses.sum().backward()
    grad = 0.1 / (1 + math.exp(0.2))
    assert (pi_c.grad.item(), pi_r.grad.item()) == pytest.approx((-grad, grad), abs=1e-6)
    assert (ref_c.grad.item(), ref_r.grad.item()) == pytest.approx((grad, -grad), abs=1e-6)
    # IPO: (h - 1 / (2 beta))^2 = (2 - 5)^2, gradient 2 (h - 5) = -6 on pi_c
    pi_c.grad = None
    losses = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1, 0.0, "ipo")[0]
    losses.sum().backward()
    assert losses.item() == pytest.approx(9.0) and pi_c.grad.item() == pytest.approx(-6.0)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_and_gradient_match_a_hand_reference(beta, eps):
    torch.manual_seed(0)
    logps = [(torch.randn(6, dtype=torch.float64) * 20 - 50).requires_grad_() for _ in range(4)]
    loss = dpo.dpo_loss(*logps, beta, eps, "sigmoid")[0].mean()
    grads = torch.autograd.grad(loss, logps)
    hand = [x.detach().clone().requires_grad_() for x in logps]
    expected = hand_dpo_loss(*hand, beta, eps)
    hand_grads = torch.autograd.grad(expected, hand)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for g, h in zip(grads, hand_grads):
        assert torch.allclose(g, h, rtol=1e-9, atol=1e-12)
    # and the gradient in closed form: d/d pi_c = -beta ((1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)) / B
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    closed = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h)) / 6
    assert torch.allclose(grads[0], closed.detach(), atol=1e-12)


def test_policy_equal_to_reference_gives_log_2(tokenizer, model):
    ref_model = load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer).eval().requires_grad_(False)
    dpo.disable_dropout(ref_model)
    model.train()  # dropout is off, so train mode changes nothing
    batch = dpo.collate_pairs(make_pairs(tokenizer), tokenizer.eos_token_id, max_seq_len=512)
    chosen_logps, rejected_logps = dpo.batch_logps(model, batch)
    with torch.no_grad():
        ref_chosen_logps, ref_rejected_logps = dpo.batch_logps(ref_model, batch)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, 0.1, 0.0, "sigmoid"
    )
    assert torch.equal(chosen_rewards, torch.zeros(2)) and torch.equal(rejected_rewards, torch.zeros(2))
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-7)
    assert f"{losses.mean().item():.4f}" == "0.6931"


def test_a_micro_batch_never_makes_the_gpu_wait(tokenizer, tmp_path):
    """A micro-batch that does not step (log-probs of both models, the loss, backward) reads nothing back from the
    device: the NaN check is once per optimizer step, the token count is summed as a tensor, and the reply's first
    column comes with the batch (`context_length`), not from its mask. On a GPU each read would stall it."""
    from accelerate import Accelerator
    from conftest import counted_syncs

    policy = load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer)
    reference = dpo.freeze(load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer))
    batch = dpo.collate_pairs(make_pairs(tokenizer), tokenizer.eos_token_id, max_seq_len=512)
    assert batch["context_length"] == int(batch["loss_mask"].any(0).long().argmax())
    args = tiny_args(tmp_path, "--gradient_accumulation_steps", 2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    with counted_syncs() as calls:
        stats, grad_norm = dpo.dpo_step(policy, reference, None, batch, optimizer, scheduler, args, accelerator)
    assert grad_norm is None and not accelerator.sync_gradients  # the first of two micro-batches: no step yet
    assert calls == []
    assert torch.isfinite(stats["loss"]).all()


# --- user errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume"], "--resume: no checkpoint at"),
        (["--loss_type", "ipo", "--label_smoothing", "0.1"], "--label_smoothing applies to --loss_type sigmoid"),
        (["--beta", "0"], "--beta must be positive"),
    ],
)
def test_bad_settings_fail_with_one_line(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        dpo.main(tiny_args(tmp_path, *argv))


# --- training runs --------------------------------------------------------------------------

SHORT = ("--max_train_samples", 32, "--max_eval_samples", 8, "--per_device_train_batch_size", 4, "--eval_every", 0)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b, atol=0.0):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def linked_work_dir(path, tiny_data_dir):
    """A fresh work dir that reads the session's processed data, so runs do not share outputs."""
    path.mkdir()
    (path / lifecycle.PROCESSED_DIR).symlink_to(tiny_data_dir / lifecycle.PROCESSED_DIR)
    return path


@pytest.mark.slow
def test_a_run_resumed_for_more_steps_follows_the_longer_schedule(tiny_data_dir, tmp_path, capsys):
    """A 2-step run ends at learning rate 0; resumed with --max_steps 4 it must learn at step 3 (it stood still)."""
    argv = (*SHORT, "--save_every", 2, "--eval_steps", 0, "--learning_rate", 1e-3, "--snapshot_every", 1)
    argv += ("--logging_steps", 1)
    work = linked_work_dir(tmp_path / "w", tiny_data_dir)
    dpo.main(tiny_args(work, *argv, "--max_steps", 2))
    dpo.main(tiny_args(work, *argv, "--max_steps", 4, "--resume"))
    assert "the learning rate follows the schedule of 4 steps from step 2 on (0.0005)" in capsys.readouterr().out
    snapshots = {
        step: load_file(folder / "model.safetensors") for step, folder in lifecycle.snapshots(work / "runs/dpo")
    }
    assert sorted(snapshots) == [1, 2, 3]
    moved = max((snapshots[3][k] - snapshots[2][k]).abs().max().item() for k in snapshots[2])
    assert moved > 1e-5  # step 3 learned: at rate 0.5 x 1e-3 (linear decay over 4 steps, no warm-up)
    records = reporting.read_metrics(work / "runs/dpo/metrics.jsonl")
    assert [r["train/learning_rate"] for r in records if r["step"] in (3, 4)] == pytest.approx([2.5e-4, 0.0])


@pytest.mark.slow
def test_nan_stops_keeping_the_last_checkpoint_and_resume_continues_exactly(tiny_data_dir, tmp_path, monkeypatch):
    argv = (*SHORT, "--max_steps", 4, "--save_every", 2, "--eval_steps", 0, "--learning_rate", 1e-3)
    argv += ("--snapshot_every", 1)
    straight_dir = linked_work_dir(tmp_path / "straight", tiny_data_dir)
    broken_dir = linked_work_dir(tmp_path / "broken", tiny_data_dir)
    straight = weights(dpo.main(tiny_args(straight_dir, *argv)))

    dpo_loss, calls = dpo.dpo_loss, []

    def nan_at_the_third_step(*args):
        calls.append(1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*args)
        return losses * (float("nan") if len(calls) == 3 else 1.0), chosen_rewards, rejected_rewards

    monkeypatch.setattr(dpo, "dpo_loss", nan_at_the_third_step)
    with pytest.raises(UserError, match=r"the loss is nan at step 3: stopped; last good checkpoint: step 2 in"):
        dpo.main(tiny_args(broken_dir, *argv))
    monkeypatch.undo()
    checkpoint = torch.load(broken_dir / "runs/dpo/checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and not (broken_dir / lifecycle.DPO_DIR).exists()

    resumed = weights(dpo.main(tiny_args(broken_dir, *argv, "--resume")))
    assert same_weights(resumed, straight, atol=1e-6)
    steps = [r["step"] for r in reporting.read_metrics(broken_dir / "runs/dpo/metrics.jsonl")]
    assert steps == [r["step"] for r in reporting.read_metrics(straight_dir / "runs/dpo/metrics.jsonl")] == [4]
    saved = load_file(broken_dir / lifecycle.DPO_DIR / "model.safetensors")
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    # the policy snapshots: step 3's, lost with the NaN, written again by the resumed run
    assert_same_snapshots(broken_dir / "runs/dpo", straight_dir / "runs/dpo", [1, 2, 3], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_precomputed_reference_and_accumulation_train_the_same(tiny_data_dir, tmp_path):
    """Reference log-probs looked up from the table == computed each step; 2 x 2 accumulated == 4 at once.

    Float noise in near-zero gradients can flip the sign of Adam's first (~lr-sized) steps, so
    weights are compared to a fraction of lr, with room for the rare element whose gradient is
    noise (1 of 1.1M in the tiny model measured at 0.27 lr; no element can move more than 2 lr in
    2 steps); the step-1 gradient norm pins the accumulated gradient's scale, which Adam's update
    would hide.
    """
    argv = (*SHORT, "--max_steps", 2, "--eval_steps", 0, "--learning_rate", 1e-3, "--logging_steps", 1)
    runs = {
        "base": (),
        "precomputed": ("--precompute_ref_logps", "true"),
        "accumulated": ("--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2),
    }
    trained, records = {}, {}
    for name, extra in runs.items():
        work = linked_work_dir(tmp_path / name, tiny_data_dir)
        trained[name] = weights(dpo.main(tiny_args(work, *argv, *extra)))
        records[name] = reporting.read_metrics(work / "runs/dpo/metrics.jsonl")
    for name in ("precomputed", "accumulated"):
        first, second = records[name]
        assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
        assert first["train/grad_norm"] == pytest.approx(records["base"][0]["train/grad_norm"], rel=1e-4)
        for key in ("dpo/loss", "dpo/rewards/margins", "dpo/kl"):
            assert second[key] == pytest.approx(records["base"][1][key], rel=1e-3, abs=1e-4), (name, key)
        diffs = torch.cat([(trained[name][k] - trained["base"][k]).abs().flatten() for k in trained["base"]])
        assert trained[name].keys() == trained["base"].keys() and diffs.max() <= 2e-3, name  # 2 lr
        assert (diffs > 2e-4).float().mean() <= 1e-5, (name, int((diffs > 2e-4).sum()))  # 0.2 lr


@pytest.mark.slow
def test_two_processes_train_identical_weights(tiny_data_dir, tmp_path):
    """`accelerate launch` on 2 CPU processes (gloo): both end with the same weights, the saved ones."""
    work = linked_work_dir(tmp_path / "work", tiny_data_dir)
    driver = tmp_path / "driver.py"
    driver.write_text(
        f"import sys, torch\nsys.path.insert(0, {str(REPO)!r})\n"
        "from accelerate import PartialState\nimport DPO_training as dpo\nfrom lifecycle import parse_args\n"
        "policy = dpo.main(parse_args(dpo.Args, dpo.TINY, sys.argv[1:]))\n"
        f"torch.save(policy.state_dict(), {str(tmp_path)!r} + f'/rank{{PartialState().process_index}}.pt')\n"
    )
    argv = ["--preset", "tiny", "--work_dir", str(work), *map(str, SHORT), "--max_steps", "3", "--logging_steps", "1"]
    proc = launch_two_processes(driver, *argv, "--report_to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "3 optimizer steps of 8 pairs on 2 process(es)" in proc.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert same_weights(rank0, rank1)
    base = load_file(lifecycle.TINY_MODEL_DIR / "model.safetensors")
    assert not torch.equal(rank0["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])
    saved = load_file(work / lifecycle.DPO_DIR / "model.safetensors")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    # the learning rate follows one schedule (3 steps, no warm-up, linear decay), not one per process
    records = reporting.read_metrics(work / "runs/dpo/metrics.jsonl")
    lr = dpo.TINY["learning_rate"]
    assert [r["train/learning_rate"] for r in records] == pytest.approx([lr * 2 / 3, lr / 3, 0.0])
    # the main process alone logs to the trackers: one event file, the same records
    events = list((work / "runs/dpo" / lifecycle.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert_same_as_metrics(tensorboard_scalars(events[0].parent), records)


@pytest.mark.slow
def test_tiny_run_learns_the_preferences(tiny_pipeline):
    """The tiny preset as the pipeline runs it: from loss log 2 and no reward margin at step 0 (the policy is the
    reference) to a validation implicit-reward accuracy >= 0.8 and a loss well below log 2; then more real answers
    than base."""
    work = tiny_pipeline
    assert "validation: loss" in pipeline_output(work)
    out = work / lifecycle.DPO_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "dpo_curves.png", "args.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "args.json").read_text())["learning_rate"] == dpo.TINY["learning_rate"]
    records = reporting.read_metrics(out / "metrics.jsonl")
    train_keys = {"dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/accuracies"}
    train_keys |= {"dpo/rewards/margins", "dpo/logps/chosen", "dpo/logps/rejected", "dpo/kl", "train/learning_rate"}
    trained = [r for r in records if "dpo/loss" in r]  # the others: held-out scores only (live_eval.py)
    assert trained[0]["step"] == 4 and train_keys <= set(trained[0])
    assert all(math.isfinite(r["dpo/loss"]) for r in trained)
    assert [r["step"] for r in records if "eval/proxy" in r] == [0, 10, 20, 30, 40]
    evals = [r for r in records if "eval/loss" in r]
    assert len(evals) >= 2 and evals[-1]["step"] == records[-1]["step"]
    final = evals[-1]
    assert final["eval/rewards/accuracies"] >= 0.8 and final["eval/rewards/margins"] > 0
    assert final["eval/loss"] < math.log(2) - 0.25
    assert (work / "runs/dpo/checkpoint.pt").is_file()

    # the truth, not the proxy: more real answers than base (the tiny oracle), by a margin its 95% interval clears
    summary = pipeline_summary(work)
    assert summary.loc["dpo", "oracle_gain_ci_low"] > 0, summary.T
    assert summary.loc["dpo", "distinct_share"] >= 0.9


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(dpo.Args, dpo.TINY, ["--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, f in dpo.Args.__dataclass_fields__.items():
        assert f"--{name}" in help_text and f"(default: {f.default})" in help_text, name


def test_length_grouped_epochs_hold_every_pair_once_in_windows_sorted_longest_first():
    lengths = [int(x) for x in torch.randint(5, 500, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = dpo.EpochShuffle(len(lengths), seed=3, lengths=lengths, batch_size=4)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and first == list(sampler)  # a permutation, the same on every process
    for start in range(0, 1000, 200):  # windows of 50 batches of 4
        window = [lengths[i] for i in first[start : start + 200]]
        assert window == sorted(window, reverse=True)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == list(range(1000)) and list(sampler) != first  # reshuffled, same pairs

    def padded_share(order):
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        padded = sum(4 * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    plain = list(dpo.EpochShuffle(len(lengths), seed=3))
    assert padded_share(first) < 0.05 < 0.3 < padded_share(plain)


def test_a_pair_pads_to_its_longer_row_within_max_seq_len():
    pair = {"idx": 0, "prompt": [1] * 10, "chosen": [2] * 7, "rejected": [3] * 3}
    assert dpo.pair_length(pair, 512) == 18  # prompt + the longer reply + EOS
    assert dpo.pair_length(pair, 12) == 12
    batch = dpo.collate_pairs([pair], eos_token_id=0, max_seq_len=512)
    assert batch["input_ids"].shape[1] == dpo.pair_length(pair, 512)
