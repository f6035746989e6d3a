"""GRPO_training.py: group advantages, the k3 KL, the loss and its EOS masking, best-checkpoint
selection, resume, a tiny end-to-end run scored against the base model, and `accelerate launch`."""

import hashlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, launch_two_processes, pipeline_summary, resumed_and_straight

import GRPO_training as grpo
from common import load_causal_lm, load_tokenizer, response_mask_from_eos
from lifecycle import (
    GRPO_BEST_DIR,
    GRPO_FINAL_DIR,
    TINY_MODEL_DIR,
    UserError,
    parse_args,
)
from live_eval import Best
from reporting import read_metrics

# the loss's settings as the seed's defaults have them (grpo loss, symmetric clip, the KL in the loss)
LOSS = dict(loss_type="grpo", epsilon_high=None, kl_in="loss", max_new_tokens=5, mask_truncated_completions=False)
LOSS_ARGS = SimpleNamespace(clip_range=0.2, entropy_coef=0.1, target_entropy=1.8, **LOSS)


def tiny_args(work, *argv):
    return parse_args(grpo.Args, grpo.TINY, ["--preset", "tiny", "--work_dir", str(work), *map(str, argv)])


# --- group advantages ------------------------------------------------------------------------


def test_group_advantages_by_hand_including_an_all_equal_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1, 4.0, 0.0, 2.0])
    centred = grpo.group_advantages(scores, 3, "grpo", "none", eps=1e-4)
    # means 2, 5, 0.1, 2 -> score - mean; groups 2 and 3 have zero spread
    torch.testing.assert_close(centred, torch.tensor([-1.0, 0, 1, 0, 0, 0, 0, 0, 0, 2, -2, 0]))
    scaled = grpo.group_advantages(scores, 3, "grpo", "group", eps=1e-4)
    # unbiased group stds: 1 and 2 (the all-equal groups: 0)
    expected = torch.tensor([-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0, 0, 0, 0, 2 / 2.0001, -2 / 2.0001, 0])
    torch.testing.assert_close(scaled, expected)
    # exactly zero, although 0.1 * 3 / 3 != 0.1 in floating point, and never nan
    assert (scaled[3:9] == 0).all() and torch.isfinite(scaled).all()
    assert (grpo.group_advantages(torch.full((6,), 0.1), 3, "grpo", "group", 1e-12) == 0).all()


# --- the k3 KL estimator -----------------------------------------------------------------------


def test_k3_matches_its_formula_is_nonnegative_and_unbiased():
    logprobs, ref_logprobs = torch.randn(4, 7) - 2, torch.randn(4, 7) - 2
    kl = grpo.k3_kl(logprobs, ref_logprobs)
    for lp, ref, k in zip(logprobs.flatten().tolist(), ref_logprobs.flatten().tolist(), kl.flatten().tolist()):
        assert k == pytest.approx(math.exp(ref - lp) - (ref - lp) - 1, rel=1e-5, abs=1e-6)
        assert k >= 0
    assert (grpo.k3_kl(logprobs, logprobs) == 0).all()
    # E_{x ~ pi}[k3(x)] is exactly KL(pi || ref): sum over the support of two categoricals
    pi, ref = torch.log_softmax(torch.randn(2, 50, dtype=torch.float64), -1)
    expectation = (pi.exp() * grpo.k3_kl(pi, ref)).sum()
    assert expectation.item() == pytest.approx((pi.exp() * (pi - ref)).sum().item(), rel=1e-9)


# --- the loss: a hand computation, the clip, and EOS masking ------------------------------------


def loss_inputs(seed=0, n=3, r=5):
    g = torch.Generator().manual_seed(seed)
    logprobs = (torch.randn(n, r, generator=g) - 1).requires_grad_()
    ref_logprobs = torch.randn(n, r, generator=g) - 1
    entropy = torch.rand(n, r, generator=g) * 3
    advantages = torch.tensor([1.0, -0.5, 2.0])[:n]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])[:n]
    return logprobs, ref_logprobs, entropy, advantages, mask


def test_loss_with_one_update_matches_a_per_token_loop():
    logprobs, ref_logprobs, entropy, advantages, mask = loss_inputs()
    loss, stats = grpo.grpo_loss(logprobs, logprobs.detach(), ref_logprobs, advantages, entropy, mask, LOSS_ARGS, 0.05)
    loss.backward()
    # by hand: ratio == 1, so each token's term is -A_i + beta * k3; mean over the reply's tokens, then over replies
    per_reply, entropies, grads = [], [], torch.zeros_like(logprobs)
    for i in range(3):
        tokens = [t for t in range(5) if mask[i, t]]
        terms = []
        for t in tokens:
            d = (ref_logprobs[i, t] - logprobs[i, t]).item()
            terms.append(-advantages[i].item() + 0.05 * (math.exp(d) - d - 1))
            # d/dlogp of -A * exp(logp - old) + beta * k3, at logp == old
            grads[i, t] = (-advantages[i] + 0.05 * (1 - math.exp(d))) / len(tokens) / 3
        per_reply.append(sum(terms) / len(tokens))
        entropies.append(sum(entropy[i, t].item() for t in tokens) / len(tokens))
    mean_entropy = sum(entropies) / 3
    expected = sum(per_reply) / 3 + 0.1 * (mean_entropy - 1.8) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["objective/entropy"].item() == pytest.approx(mean_entropy, rel=1e-5)
    assert stats["grpo/clipfrac"].item() == 0
    torch.testing.assert_close(logprobs.grad, grads)


def test_clipped_objective_when_a_rollout_is_reused():
    logprobs = torch.log(torch.tensor([[1.5, 0.9, 1.1, 0.5]]))  # ratios against old log-probs of 0
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    no_kl_no_entropy = SimpleNamespace(clip_range=0.2, entropy_coef=0.0, target_entropy=0.0, **LOSS)
    for advantage in (1.0, -1.0):
        _, stats = grpo.grpo_loss(
            logprobs, old, logprobs, torch.tensor([advantage]), torch.zeros(1, 4), mask, no_kl_no_entropy, 0.0
        )
        ratio = [1.5, 0.9, 1.1, 0.5]
        clipped = [min(max(x, 0.8), 1.2) for x in ratio]
        expected = sum(max(-advantage * x, -advantage * c) for x, c in zip(ratio, clipped)) / 4
        assert stats["grpo/pg_loss"].item() == pytest.approx(expected, rel=1e-6)
        assert stats["grpo/clipfrac"].item() == pytest.approx(0.5)  # 1.5 and 0.5 lie outside [0.8, 1.2]


def test_tokens_after_the_first_eos_change_nothing():
    eos = 0
    response_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 0, 0, 0, 0], [5, 6, 0, 0, 0]])  # pad == EOS after the end
    mask = response_mask_from_eos(response_ids, eos)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    logprobs, ref_logprobs, entropy, advantages, _ = loss_inputs()
    old = logprobs.detach().clone()
    loss, _ = grpo.grpo_loss(logprobs, old, ref_logprobs, advantages, entropy, mask, LOSS_ARGS, 0.05)
    loss.backward()
    grad = logprobs.grad.clone()
    # garbage after EOS, extreme enough that exp() of it would overflow to inf
    after = mask == 0
    logprobs2 = torch.where(after, -1e4, logprobs.detach()).requires_grad_()
    old2, ref2 = torch.where(after, 1e4, old), torch.where(after, 1e4, ref_logprobs)
    entropy2 = torch.where(after, 1e3, entropy)
    loss2, stats2 = grpo.grpo_loss(logprobs2, old2, ref2, advantages, entropy2, mask, LOSS_ARGS, 0.05)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert all(torch.isfinite(v).all() for v in stats2.values())
    assert (logprobs2.grad[after] == 0).all()
    torch.testing.assert_close(logprobs2.grad[~after], grad[~after])


# --- best-checkpoint selection -----------------------------------------------------------------


def test_best_checkpoint_is_the_highest_evaluation_with_its_own_weights():
    model = torch.nn.Linear(2, 1)
    best = Best("proxy")  # GRPO's default: its own reward on the held-out prompts
    for step, reward in enumerate([0.1, 0.7, 0.3, 0.7, -1.0]):
        with torch.no_grad():
            model.weight.fill_(step)
        best.update(step, {"eval/reward": reward}, model)
    assert (best.saved["step"], best.saved["value"]) == (1, 0.7)  # a tie does not replace the earlier best
    assert (best.saved["state"]["weight"] == 1).all()  # a snapshot: later steps did not change it
    assert (model.weight == 4).all()


# --- command line, resume, end to end -----------------------------------------------------------


def test_bad_settings_fail_with_one_line(work):
    with pytest.raises(UserError, match="--group_size must be at least 2"):
        grpo.main(tiny_args(work, "--group_size", 1))
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        grpo.main(tiny_args(work, "--resume"))
    with pytest.raises(UserError, match="--epsilon_high must be > 0, got 0.0"):
        grpo.main(tiny_args(work, "--epsilon_high", 0))
    for name in ("a/b", "ppo"):  # never a path, nor another script's folders
        with pytest.raises(UserError, match=f"--run_name must start with grpo and be a folder name .*, got '{name}'"):
            grpo.main(tiny_args(work, "--run_name", name))
    for flag, value in (("--loss_type", "ppo"), ("--advantage", "gae"), ("--kl_in", "both")):
        with pytest.raises(SystemExit):  # argparse's one line: "invalid choice", the choices named
            tiny_args(work, flag, value)


QUICK = ["--rollout_batch_size", 2, "--group_size", 2, "--eval_prompts", 4, "--eval_every", 2, "--save_every", 2]


def digest(model):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_resume_continues_exactly_where_the_run_stopped(work, tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    records, straight_records = resumed_and_straight(grpo, GRPO_FINAL_DIR, work, straight, QUICK, weights)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for a, b in zip(records, straight_records):
        assert a.get("objective/scores") == pytest.approx(b.get("objective/scores"))
        assert a.get("eval/reward") == pytest.approx(b.get("eval/reward"))


STEP_KEYS = [
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "grpo/reward_std",
    "grpo/within_group_std",
    "grpo/zero_spread_share",
    "grpo/loss",
    "grpo/pg_loss",
    "grpo/clipfrac",
    "response/length",
    "response/eos_share",
    "response/distinct_share",
    "tokens/processed",
    "time/elapsed_s",
]


@pytest.mark.slow
def test_tiny_run_writes_both_folders_and_beats_the_base_model(tiny_pipeline):
    """The tiny preset as the pipeline runs it: both folders, the best checkpoint by GRPO's own evaluation, then
    the best policy against base on 150 held-out test prompts (evaluate_models.py, the folder reloaded)."""
    work = tiny_pipeline
    for name in (GRPO_BEST_DIR, GRPO_FINAL_DIR):
        folder = work / name
        for file in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "grpo_curves.png"):
            assert (folder / file).is_file(), f"{name}/{file}"
        assert json.loads((folder / "args.json").read_text())["total_steps"] == grpo.TINY["total_steps"]
    records = read_metrics(work / GRPO_FINAL_DIR / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(grpo.TINY["total_steps"] + 1))
    for record in records[1:]:
        assert set(STEP_KEYS) <= set(record), set(STEP_KEYS) - set(record)
    evals = [r for r in records if "eval/reward" in r]
    best = max(evals, key=lambda r: r["eval/reward"])
    best_json = json.loads((work / GRPO_BEST_DIR / "best.json").read_text())
    assert (best_json["step"], best_json["eval/reward"]) == (best["step"], best["eval/reward"])
    assert evals[0]["step"] == 0 and best["eval/reward"] > evals[0]["eval/reward"]  # step 0 is the base model

    summary = pipeline_summary(work)
    base, tuned = summary.loc["base"], summary.loc["grpo"]
    se = [(row.reward_ci_high - row.reward_ci_low) / 3.92 for row in (base, tuned)]  # 95% interval: +- 1.96 SE
    assert tuned.reward_mean - base.reward_mean > 3 * math.hypot(*se), summary.T
    assert tuned.length_mean >= 0.5 * base.length_mean
    # the truth, not the proxy: more real answers than base (the tiny oracle), by a margin its 95% interval clears
    assert tuned.oracle_gain_ci_low > 0, summary.T
    assert tuned.distinct_share >= 0.9


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(work, tmp_path):
    """The script's own `main` data-parallel on 2 CPU processes; a wrapper records each one's final weights.

    `accelerate launch --num_processes 2 --cpu` starts a single process in accelerate 1.x (the simple
    launcher; huggingface/accelerate#2741); its torchrun launcher with ACCELERATE_USE_CPU starts two.
    """
    wrapper = tmp_path / "launch_grpo.py"
    wrapper.write_text(
        f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "from accelerate import PartialState\nimport GRPO_training as grpo\nfrom lifecycle import parse_args\n"
        "from test_grpo import digest\n"
        "policy = grpo.main(parse_args(grpo.Args, grpo.TINY))\n"
        f"open({str(tmp_path)!r} + f'/rank{{PartialState().process_index}}.txt', 'w').write(digest(policy))\n"
    )
    argv = ["--preset", "tiny", "--work_dir", work, "--total_steps", 2, "--eval_prompts", 8]
    proc = launch_two_processes(wrapper, *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = {(tmp_path / f"rank{i}.txt").read_text() for i in range(2)}
    base = load_causal_lm(str(TINY_MODEL_DIR), load_tokenizer(str(TINY_MODEL_DIR)))
    assert len(digests) == 1 and digest(base) not in digests  # identical on both processes, and trained
    assert [r["step"] for r in read_metrics(work / GRPO_FINAL_DIR / "metrics.jsonl")] == [0, 1, 2]


def test_the_gpu_is_waited_for_once_per_step_not_once_per_update(work):
    """A GRPO step reads tensors back from the device (each read stalls a GPU) as often with 3 updates per rollout
    as with 1: the NaN check is once per step. Same seed, same samples, so generation's own reads match."""
    from accelerate import Accelerator
    from conftest import counted_syncs

    from common import RewardMix, freeze, load_processed_data, load_reward_model

    proxy = load_reward_model(work, "cpu")
    counts = {}
    for updates in (1, 3):
        args = tiny_args(work, "--rollout_batch_size", 2, "--group_size", 2, "--updates_per_rollout", updates)
        reward = RewardMix(args, "cpu", proxy=proxy)
        tokenizer = load_tokenizer(str(TINY_MODEL_DIR))
        policy = load_causal_lm(str(TINY_MODEL_DIR), tokenizer).eval()
        reference = freeze(load_causal_lm(str(TINY_MODEL_DIR), tokenizer))
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # no optimizer internals in the count
        prompts = list(load_processed_data(args)["train"]["prompt"])[:2]
        torch.manual_seed(0)
        with counted_syncs() as calls:
            grpo.grpo_step(
                policy, reference, reward, tokenizer, optimizer, prompts, args, 0.02, Accelerator(cpu=True), ""
            )
        counts[updates] = calls
    assert counts[1] == counts[3]
