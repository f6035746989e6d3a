"""PPO_training.py: GAE, the per-token KL reward and its EOS masking, the clipped losses, log-probs at
sampling time, the value head, resume, a NaN stop, a tiny run that beats the base model, and two processes."""

import json
import math

import pytest
import torch
from conftest import REPO, launch_two_processes, pipeline_summary, resumed_and_straight

import PPO_training as ppo
from common import (
    RewardMix,
    gather_logprobs,
    load_causal_lm,
    load_processed_data,
    load_reward_model,
    load_tokenizer,
    response_mask_from_eos,
)
from lifecycle import PPO_DIR, TINY_MODEL_DIR, UserError, load_checkpoint, parse_args
from reporting import read_metrics

# small and quick: 8 prompts per rollout in 2 minibatches, short replies, a checkpoint every step
QUICK = [
    "--rollout_batch_size",
    8,
    "--num_minibatches",
    2,
    "--max_new_tokens",
    12,
    "--test_prompts",
    4,
    "--eval_every",
    0,
]
STEP_KEYS = [
    "objective/scores",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "objective/non_score_reward",
    "ppo/pg_loss",
    "ppo/vf_loss",
    "ppo/clipfrac",
    "ppo/vf_clipfrac",
    "ppo/approx_kl",
    "ppo/entropy_loss",
    "ppo/returns_mean",
    "ppo/advantages_mean",
    "response/length",
    "response/eos_share",
    "response/distinct_share",
    "tokens/processed",
    "time/elapsed_s",
]


def tiny_args(work, *argv):
    return parse_args(ppo.Args, ppo.TINY, ["--preset", "tiny", "--work_dir", str(work), *map(str, argv)])


def tiny_policy():
    tokenizer = load_tokenizer(str(TINY_MODEL_DIR))
    return ppo.PolicyWithValueHead(load_causal_lm(str(TINY_MODEL_DIR), tokenizer)).eval(), tokenizer


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_by_hand_with_a_reply_that_ends_early():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 2 ends (EOS) at index 1: its index 2 must not count
    advantages = ppo.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: deltas 0 + .9*.6 - .5 = .04, 0 + .9*.7 - .6 = .03, 1 - .7 = .3; gamma*lam = .72
    #   A2 = .3, A1 = .03 + .72*.3 = .246, A0 = .04 + .72*.246 = .21712
    # row 2: deltas 0 + .9*1 - 1 = -.1, 2 + 0 - 1 = 1 (V after the last token is 0); A1 = 1, A0 = -.1 + .72 = .62
    expected = torch.tensor([[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]])
    torch.testing.assert_close(advantages, expected)


def test_gae_matches_a_naive_sum_of_discounted_deltas():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    lengths = [7, 1, 4, 6]
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    gamma, lam = 0.95, 0.9
    advantages = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(7):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) if t < n else 0.0
            assert advantages[i, t].item() == pytest.approx(want, abs=1e-5)


# --- per-token KL reward, masked after EOS ---------------------------------------------------------


def test_kl_penalty_on_every_reply_token_and_the_score_at_the_first_eos():
    eos = 0
    # row 1 stops at its first EOS (index 2), then padding (= EOS); row 2 never emits EOS
    response_ids = torch.tensor([[5, 6, eos, eos, eos], [5, 6, 7, 8, 9]])
    mask = response_mask_from_eos(response_ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -3.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0, -9.0], [-2.0, -1.0, -3.0, -1.0, -0.5]])
    scores, beta = torch.tensor([2.0, -1.0]), 0.1
    rewards, kl, non_score_reward = ppo.per_token_rewards(scores, logprobs, ref_logprobs, mask, beta)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0, -0.5]]))
    torch.testing.assert_close(non_score_reward, -beta * kl)
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0, 0.0, 0.0], [-0.1, 0.0, -0.2, 0.0, 0.05 - 1.0]])
    torch.testing.assert_close(rewards, expected)


# --- the clipped losses --------------------------------------------------------------------------


def test_clipped_policy_loss_against_a_per_token_loop():
    torch.manual_seed(1)
    old = torch.randn(3, 5) - 2
    new = (old + 0.3 * torch.randn(3, 5)).requires_grad_()
    advantages = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    eps = 0.1
    pg_loss, clipfrac, approx_kl = ppo.policy_loss(new, old, advantages, mask, eps)
    losses, clipped, kls = [], [], []
    for i, j in mask.nonzero().tolist():
        ratio = math.exp(new[i, j].item() - old[i, j].item())
        a = advantages[i, j].item()
        unclipped, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        losses.append(max(unclipped, clip))
        clipped.append(clip > unclipped)
        kls.append(ratio - 1 - math.log(ratio))
    assert pg_loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls), abs=1e-6)
    assert 0 < clipfrac < 1
    # where the clipped branch wins the gradient is zero; padding gets none either
    pg_loss.backward()
    for i, j in mask.nonzero().tolist():
        ratio = math.exp(new[i, j].item() - old[i, j].item())
        a = advantages[i, j].item()
        if -a * min(max(ratio, 1 - eps), 1 + eps) > -a * ratio:
            assert new.grad[i, j] == 0
        else:
            assert new.grad[i, j].item() == pytest.approx(-a * ratio / len(losses), rel=1e-5)
    assert (new.grad[mask == 0] == 0).all()


def test_clipped_value_loss_against_a_per_token_loop():
    torch.manual_seed(2)
    old_values, returns = torch.randn(2, 6), torch.randn(2, 6)
    values = old_values + 0.5 * torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    clip = 0.2
    vf_loss, vf_clipfrac = ppo.value_loss(values, old_values, returns, mask, clip)
    losses, clipped = [], []
    for i, j in mask.nonzero().tolist():
        v, old, ret = values[i, j].item(), old_values[i, j].item(), returns[i, j].item()
        v_clipped = old + min(max(v - old, -clip), clip)
        losses.append(0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2))
        clipped.append((v_clipped - ret) ** 2 > (v - ret) ** 2)
    assert vf_loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert vf_clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))


# --- the policy module ------------------------------------------------------------------------------


def test_logprobs_recomputed_from_a_generated_sequence_equal_those_at_sampling_time():
    model, tokenizer = tiny_policy()
    prompts = [
        "\n\nHuman: Any advice on roses?\n\nAssistant:",
        "\n\nHuman: Hi! I'm struggling with a new language, what should I do?\n\nAssistant: How much time do "
        "you have?\n\nHuman: An hour a day.\n\nAssistant:",
        "\n\nHuman: How do I get started with Python?\n\nAssistant:",
    ]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    temperature, context_length = 0.7, enc["input_ids"].shape[1]
    torch.manual_seed(0)
    out = model.policy.generate(
        **enc, do_sample=True, top_k=0, temperature=temperature, max_new_tokens=24,
        output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    response_ids = out.sequences[:, context_length:]  # (B, R)
    mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    sampled = gather_logprobs(torch.stack(out.logits, 1) / temperature, response_ids)  # raw logits, tempered
    attention_mask = torch.cat([enc["attention_mask"], mask], 1)
    with torch.no_grad():
        recomputed, entropy, values = ppo.policy_forward(
            model, out.sequences, attention_mask, context_length, temperature
        )
    assert values.shape == entropy.shape == recomputed.shape == response_ids.shape
    torch.testing.assert_close(recomputed[mask.bool()], sampled[mask.bool()], atol=1e-5, rtol=0)


def test_value_head_reads_the_state_lm_head_reads():
    """transformers 5: GPT-2's hidden_states[-1] is after the final layer norm (what the docstring says)."""
    model, _ = tiny_policy()
    ids = torch.randint(1, 1000, (2, 9))
    out = model.policy(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(model.policy.lm_head(out.hidden_states[-1]), out.logits)
    assert (model.value_head.weight == 0).all() and (model.value_head.bias == 0).all()  # starts at zero


# --- the script -----------------------------------------------------------------------------------


def test_bad_settings_fail_with_one_line(work):
    with pytest.raises(UserError, match="--num_minibatches"):
        ppo.main(tiny_args(work, "--rollout_batch_size", 8, "--num_minibatches", 3))
    with pytest.raises(UserError, match=r"--max_new_tokens \(564 tokens\) exceeds the model's 512 positions"):
        ppo.main(tiny_args(work, "--max_prompt_length", 500, "--max_new_tokens", 64))
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        ppo.main(tiny_args(work, "--resume"))


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors") | {
        f"value_head.{k}": v for k, v in load_file(folder / ppo.VALUE_HEAD_FILE).items()
    }


@pytest.mark.slow
def test_resume_continues_exactly_where_the_run_stopped(work, tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    records, straight_records = resumed_and_straight(ppo, PPO_DIR, work, straight, QUICK, weights)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for a, b in zip(records, straight_records):
        for key in ("objective/scores", "objective/kl", "objective/kl_coef", "ppo/pg_loss", "tokens/processed"):
            assert a[key] == pytest.approx(b[key]), key


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(work, monkeypatch):
    calls = []
    policy_loss = ppo.policy_loss

    def nan_from_step_2(*args):  # 2 epochs x 2 minibatches = 4 calls per step
        calls.append(1)
        pg_loss, clipfrac, approx_kl = policy_loss(*args)
        return (pg_loss * float("nan") if len(calls) > 4 else pg_loss), clipfrac, approx_kl

    monkeypatch.setattr(ppo, "policy_loss", nan_from_step_2)
    with pytest.raises(
        UserError,
        match=r"non-finite loss \(pg nan, .*\) at step 2: stopped; the last good checkpoint is .*checkpoint.pt",
    ):
        ppo.main(tiny_args(work, "--total_steps", 3, "--save_every", 1, *QUICK))
    state = load_checkpoint(work / "runs" / "ppo" / "checkpoint.pt")
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (work / PPO_DIR).exists()


@pytest.mark.slow
def test_tiny_run_writes_its_folder_and_beats_the_base_model(tiny_pipeline):
    """The tiny preset as the pipeline runs it: the saved folder, then the policy against base on 150 held-out
    test prompts, by PPO's own final evaluation and by evaluate_models.py's (the folder reloaded)."""
    work = tiny_pipeline
    folder = work / PPO_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", ppo.VALUE_HEAD_FILE, "ppo_curves.png"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "args.json").read_text())["total_steps"] == ppo.TINY["total_steps"]
    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(0, ppo.TINY["total_steps"] + 1))  # 0: the start, held out
    held_out = [r["step"] for r in records if "eval/proxy" in r]
    assert held_out == list(range(0, ppo.TINY["total_steps"] + 1, ppo.TINY["eval_every"]))
    for record in records[1:]:  # every trained step
        assert set(STEP_KEYS) <= set(record), set(STEP_KEYS) - set(record)
    assert records[-1]["objective/kl_coef"] != ppo.Args.kl_coef  # the adaptive controller moved beta

    # the value head saved beside the policy loads, and is the trained one of the final checkpoint
    head = ppo.load_value_head(folder)
    checkpoint = torch.load(work / "runs" / "ppo" / "checkpoint.pt", weights_only=False)["model"]
    torch.testing.assert_close(head.weight, checkpoint["value_head.weight"])
    assert head.weight.abs().sum() > 0

    # PPO's final evaluation: the trained policy against its reference, the SFT model it started from, on
    # evaluate_models.py's 150 test prompts: KL > 0 to it, still diverse, not collapsed in length
    results = json.loads((folder / "eval_results.json").read_text())
    reference, tuned = results["sft"], results["ppo"]
    assert json.loads((folder / "args.json").read_text())["init_from"] == "sft" and "base" not in results
    assert results["prompts"] == reference["n"] == tuned["n"] == 150
    assert math.isfinite(tuned["kl"]) and tuned["kl"] > 0 and reference["kl"] == 0
    assert tuned["distinct_share"] >= 0.5
    assert tuned["length"] >= 0.5 * reference["length"]

    # evaluate_models.py: far above base by the proxy, and more real answers than base by the oracle (point
    # estimates: from SFT, PPO's oracle share sits below SFT's and its gain over base is not significant; the tiny
    # reward model's blind spot, docs/sft.md)
    summary = pipeline_summary(work)
    base, ppo_row = summary.loc["base"], summary.loc["ppo"]
    se = [(row.reward_ci_high - row.reward_ci_low) / 3.92 for row in (base, ppo_row)]  # 95% interval: +- 1.96 SE
    assert ppo_row.reward_mean - base.reward_mean > 3 * math.hypot(*se), summary.T
    assert ppo_row.oracle_good > base.oracle_good, summary.T
    assert summary.loc["ppo", "distinct_share"] >= 0.9
    # on the same prompts as evaluate_models.py, row for row
    with open(work / "rlhf_eval_responses.jsonl") as f:
        assert results["test_indices"] == [json.loads(line)["test_index"] for line in f]


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(work):
    """Two CPU processes (gloo): the script itself gathers a parameter checksum at the end and fails if the
    processes disagree."""
    argv = ["--preset", "tiny", "--work_dir", work, "--total_steps", 2, *QUICK]
    proc = launch_two_processes(REPO / "PPO_training.py", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights identical on all 2 processes" in proc.stdout
    assert [r["step"] for r in read_metrics(work / PPO_DIR / "metrics.jsonl")] == [1, 2]


def test_the_gpu_is_waited_for_once_per_step_not_once_per_minibatch(work):
    """A PPO step reads tensors back from the device (each read stalls a GPU) as often with 4 minibatches as with 1:
    the NaN check and the token count are once per step. Same seed, same samples, so generation's own reads match."""
    from accelerate import Accelerator
    from conftest import counted_syncs

    proxy = load_reward_model(work, "cpu")
    counts = {}
    for minibatches in (1, 4):
        args = tiny_args(work, "--rollout_batch_size", 8, "--num_minibatches", minibatches, "--max_new_tokens", 12)
        reward = RewardMix(args, "cpu", proxy=proxy)
        model, tokenizer = tiny_policy()
        reference = load_causal_lm(str(TINY_MODEL_DIR), tokenizer).eval()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no optimizer internals in the count
        prompts = list(load_processed_data(args)["train"]["prompt"])[:8]
        torch.manual_seed(0)
        with counted_syncs() as calls:
            ppo.ppo_step(model, reference, reward, tokenizer, optimizer, prompts, args, 0.1, Accelerator(cpu=True), "")
        counts[minibatches] = calls
    assert counts[1] == counts[4]


def test_tokens_processed_counts_real_tokens_not_padding(work):
    """Each forward pass counts the prompt's tokens (as truncated) and the reply's up to its EOS, as the reward
    model, GRPO and DPO count theirs: generation, reward, policy + reference, then every epoch's update."""
    from accelerate import Accelerator

    args = tiny_args(work, *QUICK)
    model, tokenizer = tiny_policy()
    reference = load_causal_lm(str(TINY_MODEL_DIR), tokenizer).eval()
    reward = RewardMix(args, "cpu", proxy=load_reward_model(work, "cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    prompts = list(load_processed_data(args)["train"]["prompt"])[:8]
    samples, _, _, n_tokens = ppo.ppo_step(
        model, reference, reward, tokenizer, optimizer, prompts, args, 0.1, Accelerator(cpu=True), ""
    )
    prompt_tokens = sum(min(len(tokenizer(p)["input_ids"]), args.max_prompt_length) for p in prompts)
    passes = 4 + args.ppo_epochs
    assert n_tokens == (prompt_tokens + samples.response_mask.sum().item()) * passes
    assert n_tokens < samples.input_ids.numel() * passes  # the padding of a left-padded batch is not counted
