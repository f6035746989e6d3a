"""GRPO's loss variants and advantage estimators (--loss_type, --advantage, --scale_rewards, --epsilon_high,
--kl_in, --mask_truncated_completions), each against a hand-written reference on small tensors, and the loss
against TRL's own `GRPOTrainer._compute_loss` called on the same tensors."""

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import GRPO_training as grpo
from lifecycle import parse_args

SCORES = [0.3, 1.2, -0.4, 2.0, 5.0, 5.0, 5.0, 5.0, -1.0, 0.5, 0.25, 3.0]  # 3 groups of 4; the second all equal
G = 4


def std(values):  # unbiased, as torch.std
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reference_advantages(scores, estimator, scaling, eps, others=()):
    """The advantages by hand, a group (and a reply) at a time; `others`: what the other processes hold, their
    advantages (the batch's advantage std counts them: group+batch, reinforce_pp) or their rewards (TRL's `batch`
    divides by the std of every process's rewards)."""
    groups = [scores[i : i + G] for i in range(0, len(scores), G)]
    out = []
    for group in groups:
        mean = sum(group) / G
        for r in group:
            if estimator == "rloo":
                a = r - (sum(group) - r) / (G - 1)
            else:
                a = r - mean
            if estimator != "reinforce_pp" and scaling in ("group", "group+batch"):
                a /= std(group) + eps
            elif estimator != "reinforce_pp" and scaling == "batch":
                a /= std(list(scores) + list(others)) + eps
            out.append(0.0 if max(group) == min(group) else a)
    if estimator == "reinforce_pp" or scaling == "group+batch":
        spread = std(out + list(others))
        out = [a / (spread + eps) for a in out]
    return out


@pytest.mark.parametrize("estimator, scaling", list(itertools.product(grpo.ESTIMATORS, grpo.SCALINGS)))
def test_every_estimator_and_scaling_equals_a_hand_computation(estimator, scaling):
    scores = torch.tensor(SCORES, dtype=torch.float64)
    got = grpo.group_advantages(scores, G, estimator, scaling, 1e-4)
    want = reference_advantages(SCORES, estimator, scaling, 1e-4)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (got[4:8] == 0).all()  # the all-equal group: exactly 0 under every estimator and scaling


def test_rloo_is_the_group_baseline_scaled_by_g_over_g_minus_1_and_the_batch_std_spans_every_process():
    scores = torch.tensor(SCORES, dtype=torch.float64)
    rloo, grpo_centred = (grpo.group_advantages(scores, G, e, "none") for e in ("rloo", "grpo"))
    torch.testing.assert_close(rloo, grpo_centred * G / (G - 1))
    other = torch.tensor([4.0, -4.0, 1.0, -1.0], dtype=torch.float64)  # a second process's advantages
    got = grpo.group_advantages(scores, G, "reinforce_pp", "none", 1e-4, gather=lambda a: torch.cat([a, other]))
    want = reference_advantages(SCORES, "reinforce_pp", "none", 1e-4, others=other.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    # TRL's scale_rewards="batch": (r - the group's mean) / (the std of every process's rewards + 1e-4)
    other_rewards = torch.tensor([10.0, 11.0, -3.0, 0.0], dtype=torch.float64)
    got = grpo.group_advantages(scores, G, "grpo", "batch", 1e-4, gather=lambda r: torch.cat([r, other_rewards]))
    every = torch.cat([scores, other_rewards])
    trl = (scores.view(-1, G) - scores.view(-1, G).mean(1, keepdim=True)).flatten() / (every.std() + 1e-4)
    trl[4:8] = 0.0  # the all-equal group
    torch.testing.assert_close(got, trl, rtol=0, atol=1e-12)


# --- the loss ------------------------------------------------------------------------------------------------


def rollout(seed=0):
    """Three replies of up to 6 tokens, the policy moved away from the one that sampled (a second update)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(3, 6, generator=g, dtype=torch.float64) - 1
    logprobs = (old + 0.4 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_()
    ref = old + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    return logprobs, old, ref, torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64), mask


def loss_args(loss_type, epsilon_high=None, kl_in="loss", mask_truncated=False, entropy_coef=0.0):
    return SimpleNamespace(
        clip_range=0.2, epsilon_high=epsilon_high, entropy_coef=entropy_coef, target_entropy=0.0, loss_type=loss_type,
        kl_in=kl_in, max_new_tokens=8, mask_truncated_completions=mask_truncated,
    )  # fmt: skip


def reference_loss(logprobs, old, ref, advantages, mask, loss_type, low, high, beta, tokens_per_process=None):
    """The loss a token at a time: -min(r A, clip(r, 1 - low, 1 + high) A) + beta k3, then each loss type's sum."""
    per_reply, total, count = [], 0.0, 0
    for i in range(logprobs.shape[0]):
        terms = []
        for t in range(logprobs.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(logprobs[i, t].item() - old[i, t].item())
            a = advantages[i].item()
            d = ref[i, t].item() - logprobs[i, t].item()
            terms.append(max(-r * a, -min(max(r, 1 - low), 1 + high) * a) + beta * (math.exp(d) - d - 1))
        per_reply.append(sum(terms) / max(len(terms), 1))
        total += sum(terms)
        count += len(terms)
    return {
        "grpo": sum(per_reply) / len(per_reply),
        "bnpo": total / count,
        "dr_grpo": total / (len(per_reply) * 8),
        "dapo": total / (tokens_per_process or count),
    }[loss_type]


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_every_loss_type_with_a_reused_rollout_equals_a_hand_computation(loss_type, epsilon_high):
    logprobs, old, ref, advantages, mask = rollout()
    args = loss_args(loss_type, epsilon_high)
    loss, stats = grpo.grpo_loss(logprobs, old, ref, advantages, torch.zeros_like(old), mask, args, 0.05, 9.5)
    high = 0.2 if epsilon_high is None else epsilon_high
    want = reference_loss(logprobs, old, ref, advantages, mask, loss_type, 0.2, high, 0.05, 9.5)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    ratio = (logprobs - old).exp().detach()
    assert ((ratio > 1.2) | (ratio < 0.8)).any()  # the clip acts: the check is not of ratio == 1 alone
    a = advantages[:, None]
    low_share = (((ratio < 0.8) & (a < 0)) * mask).sum() / mask.sum()
    high_share = (((ratio > 1 + high) & (a > 0)) * mask).sum() / mask.sum()
    assert stats["grpo/clip_ratio/low"].item() == pytest.approx(low_share.item(), abs=1e-7)
    assert stats["grpo/clip_ratio/high"].item() == pytest.approx(high_share.item(), abs=1e-7)


def test_with_the_kl_in_the_reward_the_loss_has_no_kl_term():
    logprobs, old, ref, advantages, mask = rollout(1)
    loss, stats = grpo.grpo_loss(
        logprobs, old, ref, advantages, torch.zeros_like(old), mask, loss_args("grpo", kl_in="reward"), 0.05
    )
    want = reference_loss(logprobs, old, ref, advantages, mask, "grpo", 0.2, 0.2, 0.0)
    assert loss.item() == pytest.approx(want, abs=1e-9) and stats["grpo/kl_loss"].item() == 0
    assert stats["objective/kl"].item() > 0  # still measured


def test_a_masked_truncated_reply_leaves_the_loss_and_the_entropy_but_not_the_logged_kl():
    """--mask_truncated_completions: the first reply (all 6 tokens, no EOS) is out of the loss and of the entropy
    term's per-reply mean, whose mean runs over the two replies left; the logged KL still counts its tokens."""
    logprobs, old, ref, advantages, reply_mask = rollout(3)
    mask = reply_mask.clone()
    mask[0] = 0
    entropy = torch.rand(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = loss_args("grpo", mask_truncated=True, entropy_coef=0.1)
    loss, stats = grpo.grpo_loss(logprobs, old, ref, advantages, entropy, mask, args, 0.05, reply_mask=reply_mask)
    kept = [(entropy[i] * mask[i]).sum() / mask[i].sum() for i in (1, 2)]
    assert stats["objective/entropy"].item() == pytest.approx(sum(kept).item() / 2, abs=1e-12)
    want = reference_loss(logprobs, old, ref, advantages, mask, "grpo", 0.2, 0.2, 0.05)  # replies 2 and 3, over 3
    assert loss.item() == pytest.approx(want + 0.1 * stats["objective/entropy"].item() ** 2, abs=1e-9)
    d = (ref - logprobs).detach()
    k3 = ((d.exp() - d - 1) * reply_mask).sum(1).mean()
    assert stats["objective/kl"].item() == pytest.approx(k3.item(), abs=1e-9)


def trl_loss(logprobs, old, ref, advantages, mask, loss_type, low, high, beta):
    """TRL 1.16's GRPOTrainer._compute_loss on these tensors: the method called on a stand-in trainer whose
    log-prob function returns them (one process, no accumulation, no entropy bonus, token-level ratios)."""
    from trl import GRPOTrainer

    accelerator = SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x, num_processes=1,
        sync_gradients=True,
    )  # fmt: skip
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1), epsilon_low=low,
        epsilon_high=high, use_vllm=False, loss_type=loss_type, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=8, accelerator=accelerator,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
    )  # fmt: skip
    n, r = logprobs.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, r, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_every_loss_type_equals_trls_on_the_same_tensors(loss_type):
    logprobs, old, ref, advantages, mask = rollout(2)
    ours, stats = grpo.grpo_loss(
        logprobs, old, ref, advantages, torch.zeros_like(old), mask, loss_args(loss_type, 0.28), 0.05, mask.sum()
    )
    theirs, metrics = trl_loss(logprobs, old, ref, advantages, mask, loss_type, 0.2, 0.28, 0.05)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    (ours_grad,) = torch.autograd.grad(ours, logprobs)
    (theirs_grad,) = torch.autograd.grad(theirs, logprobs)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=1e-9)
    assert stats["grpo/clip_ratio/low"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-7)
    assert stats["grpo/clip_ratio/high"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-7)


def test_old_switches_get_one_line_naming_the_new_flag(capsys):
    for argv, said in (
        (["--normalize_advantages", "False"], "--normalize_advantages is gone: --scale_rewards group+batch"),
        (["--no_normalize_advantages"], "--no_normalize_advantages is gone: --scale_rewards group+batch"),
    ):
        with pytest.raises(SystemExit) as stop:
            parse_args(grpo.Args, grpo.TINY, argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err
    args = parse_args(grpo.Args, grpo.TINY, ["--scale_rewards", "True"])
    with pytest.raises(grpo.UserError, match=r"--scale_rewards takes group\+batch, group, batch, none, got 'True'"):
        grpo.main(args)
