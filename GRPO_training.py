"""Step 4 of the pipeline: GRPO, Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1).

No value model: each prompt gets a *group* of `group_size` sampled replies, and a reply's
advantage is how much better the reward model scored it than its group's mean. Per step:

1. sample `group_size` replies to each of `rollout_batch_size` train prompts in one `generate`
   call (the prompt is tokenized once; `top_k=0`, `top_p`, `temperature`); a reply ends at its
   first EOS and every token after it is masked (pad is EOS; positions from the attention mask);
2. score `join_conversation(prompt, reply)` with the frozen reward model (`final_reward_model/`), or with
   the mix of `--reward_funcs` (`common.RewardMix`: the gold reward model, the tiny world's oracle, a length
   penalty, a function of your own; `--missing_eos_penalty`);
3. log-probs of the replies under the frozen reference (the start model);
4. group-relative advantages (outcome supervision, §4.1.2), a reply's advantage given to each of its tokens:
   `--advantage grpo` A_i = r_i - mean(r_group) (rloo: minus the mean of the group's *other* replies;
   reinforce_pp: REINFORCE++'s batch normalisation), then `--scale_rewards group+batch` (the seed's): divided by
   std(r_group) + eps (DeepSeekMath), then by the std of every advantage in the batch; a group whose scores are
   all equal gets A = 0 exactly (`group_advantages`). With `--kl_in reward` the rewards first lose beta x each
   reply's summed log-ratio to the reference (the KL in the reward, as RLOO and REINFORCE++ place it);
5. the loss, DeepSeekMath eq. 3: per response token
       -min(ratio * A, clip(ratio, 1 - clip_range, 1 + epsilon_high) * A) + kl_coef * k3,
   with ratio = pi / pi_old and k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, the unbiased KL
   estimator of eq. 4; `--loss_type grpo` (the seed's) averages over each reply's tokens, then over replies
   (eq. 3's 1/G sum_i 1/|o_i| sum_t; bnpo, dr_grpo and dapo as in `aggregate`), plus the seed's
   target-entropy term entropy_coef * (H - target_entropy)^2, H = the mean per-token entropy averaged per reply;
6. every `eval_every` steps, the mean reward (the same `--reward_funcs`) on a fixed set of held-out
   validation prompts, sampled as in training under a fixed seed (every evaluation sees the same prompts and
   the same noise); the best-scoring policy is written to `grpo_best/` at the end, the final one to
   `grpo_rlhf_model/` (`--run_name grpo_oracle`: `grpo_oracle_best/`, `grpo_oracle_rlhf_model/`);
   with `--snapshot_every N` (tiny: 8) a policy-only snapshot every N steps goes to
   `runs/grpo/snapshots/step-N/`, the points of evaluate_models.py's reward-KL frontier.

    python GRPO_training.py                                   # gpt2, after reward_model_training.py
    python GRPO_training.py --preset tiny --work_dir runs/tiny
    python GRPO_training.py --preset tiny --work_dir runs/tiny --reward_funcs oracle --run_name grpo_oracle
    accelerate launch --num_processes 2 GRPO_training.py ...  # data-parallel, unchanged

Deliberate departures from the paper:
* one update per rollout by default (the seed), so ratio == 1 and the clip is inactive; with
  `--updates_per_rollout` > 1 (the paper's mu) the rollout is reused and the clip matters;
* the seed's batch-wide advantage normalisation after the group one, and its target-entropy term;
* dropout is off in the policy (it stays in eval mode), so the log-probs of the first update are
  those of the policy that sampled;
* optional adaptive KL (`--adapt_kl`, Ziegler et al.'s controller on the per-reply KL, k3 summed over
  its tokens); the paper keeps beta fixed. Per-reply token averaging favours long wrong and short right
  replies (Liu et al. 2025, "Dr. GRPO"); the default keeps the paper's form, `--loss_type dr_grpo` or `dapo`
  (TRL's default) drop it.
"""

import copy
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from common import (
    PROMPT_AND_REPLY,
    AdaptiveKLController,
    RewardMix,
    adamw,
    check_positions,
    freeze,
    generate_responses,
    load_causal_lm,
    load_optimizer_state,
    load_processed_data,
    load_reward_model,
    load_tokenizer,
    make_accelerator,
    masked_mean,
    release_cpu_memory,
    response_logprobs,
    save_pretrained_atomic,
    set_seed,
    start_model,
    unwrap,
)
from lifecycle import (
    FINISHING,
    REWARD_FLAGS,
    RUN_ID_FILE,
    GenerationArgs,
    LiveEvalArgs,
    PolicyArgs,
    RewardArgs,
    UserError,
    atomic_write_json,
    check,
    check_resumable,
    check_same_objective,
    grpo_dirs,
    load_checkpoint,
    objective,
    remove_leftovers,
    run,
    save_args,
    save_checkpoint,
    save_snapshot,
    snapshot_due,
    sync_snapshots,
)
from live_eval import LiveEval, Monitor, check_live_eval_args
from reporting import MetricsLogger, card_writer, end_run, plot_metrics, read_metrics, start_tracking

RUN_NAME = "grpo"  # the default --run_name: runs/grpo/, grpo_best/, grpo_rlhf_model/
ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
SCALINGS = ("group+batch", "group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# what a run optimises: a --resume must give the same (lifecycle.check_same_objective)
OBJECTIVE_FLAGS = (*REWARD_FLAGS, "advantage", "scale_rewards", "loss_type", "kl_in", "mask_truncated_completions")


@dataclass
class Args(PolicyArgs, GenerationArgs, RewardArgs, LiveEvalArgs):
    # the switches an older command line may still give, each answered in one line (lifecycle.parse_args)
    GONE_FLAGS: ClassVar[dict] = {
        flag: "--scale_rewards group+batch is what it did (the default), --scale_rewards group what turning it off did"
        for flag in ("--normalize_advantages", "--no_normalize_advantages")
    }
    # data
    max_prompt_length: int = field(default=192, metadata={"help": "prompt tokens kept, truncated from the left"})
    reward_max_length: int = field(
        default=512, metadata={"help": "tokens the reward model reads (its training length)"}
    )
    # generation
    max_new_tokens: int = field(default=32, metadata={"help": "reply length limit in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use the same)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling threshold (top_k is off)"})
    # optimisation
    total_steps: int = field(default=1500, metadata={"help": "rollouts (each followed by its updates)"})
    rollout_batch_size: int = field(default=2, metadata={"help": "prompts per rollout and process"})
    group_size: int = field(default=3, metadata={"help": "replies sampled per prompt (G)"})
    updates_per_rollout: int = field(default=1, metadata={"help": "gradient steps on each rollout (the paper's mu)"})
    learning_rate: float = field(default=2e-6, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    # algorithm: the advantage (the docstring's step 3), the loss (step 5)
    advantage: str = field(
        default="grpo",
        metadata={
            "help": "estimator: grpo (reward minus its group's mean), rloo (minus the mean of the group's other "
            "replies), reinforce_pp (minus the group's mean, then divided by the batch's std: REINFORCE++)",
            "choices": list(ESTIMATORS),
        },
    )
    scale_rewards: str = field(
        default="group+batch",
        metadata={
            "help": "then divide by: group (the group's reward std), batch (the batch's reward std: TRL's), "
            "group+batch (the group's, then the batch's advantage std: the seed's), none (RLOO's paper). grpo and "
            "rloo only (reinforce_pp divides by the batch's advantage std itself)"
        },
    )
    std_eps: float = field(default=1e-4, metadata={"help": "added to a std before dividing by it"})
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "how token losses are averaged: grpo (per reply, then over replies: the seed's), bnpo (over the "
            "batch's tokens), dr_grpo (token sum / (replies x --max_new_tokens)), dapo (over all processes' tokens)",
            "choices": list(LOSS_TYPES),
        },
    )
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip (active from the second update on)"})
    epsilon_high: float = field(
        default=None, metadata={"help": "upper ratio clip, 1 + this (DAPO's clip-higher); default --clip_range"}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "replies that hit --max_new_tokens without ending add nothing to the loss"}
    )
    kl_coef: float = field(default=0.02, metadata={"help": "beta: weight of the KL to the reference"})
    kl_in: str = field(
        default="loss",
        metadata={
            "help": "loss: beta x k3 per token in the loss (GRPO); reward: beta x the reply's summed log-ratio "
            "taken off its reward before the advantage (RLOO, REINFORCE++)",
            "choices": ["loss", "reward"],
        },
    )
    adapt_kl: bool = field(default=False, metadata={"help": "adapt beta toward --target_kl (Ziegler controller)"})
    target_kl: float = field(default=0.3, metadata={"help": "target per-reply KL for --adapt_kl"})
    kl_horizon: int = field(default=10_000, metadata={"help": "horizon of the adaptive KL controller, in replies"})
    entropy_coef: float = field(default=0.1, metadata={"help": "weight of (H - target_entropy)^2"})
    target_entropy: float = field(default=1.8, metadata={"help": "per-token entropy the policy is held near"})
    # output
    eval_batch_size: int = field(default=64, metadata={"help": "prompts per generate call when evaluating"})
    run_name: str = field(
        default=RUN_NAME,
        metadata={
            "help": "names the run: runs/NAME/, NAME_best/, NAME_rlhf_model/ (evaluate_models.py reads grpo and "
            "grpo_oracle)"
        },
    )


# The tiny base model samples at ~0.3 nats per token: the seed's target_entropy of 1.8 (and its weak
# KL) pushes it to word salad that the tiny reward model still scores well (KL ~60 nats per reply),
# so the tiny preset holds entropy near the base model's (0.3; at 0.6 the oracle's share of real answers
# was 0.75 against 0.82) and weighs the KL term 10x more (0.5 held an earlier tiny model too close: eval
# reward 0.26 against 0.74 at 0.2).
TINY = dict(
    reward_max_length=256,
    eval_prompts=64,
    total_steps=30,
    rollout_batch_size=8,
    group_size=4,
    learning_rate=2e-4,
    kl_coef=0.2,
    target_entropy=0.3,
    eval_every=10,
    save_every=10,
    snapshot_every=8,
)

CURVES = [
    "objective/scores",
    "eval/reward",
    "eval/gold",
    "eval/oracle",
    "eval/sample_kl",
    "objective/kl",
    "objective/entropy",
    "grpo/loss",
    "grpo/within_group_std",
    "grpo/zero_spread_share",
    "response/length",
    "response/distinct_share",
]


def group_advantages(scores, group_size, estimator="grpo", scaling="group+batch", eps=1e-4, gather=None):
    """Each reply's advantage from the scores of its group: (N,) -> (N,). Rows i * G ... (i + 1) * G - 1 answer the
    same prompt. `gather` collects a tensor from every process (the batch's std spans them all).

    1. a baseline taken off each score r_i of a group of G:
       grpo          r_i - mean(r)                     DeepSeekMath §4.1.2 (Shao et al. 2024)
       rloo          r_i - mean of the other G - 1     Ahmadian et al. (2024): G / (G - 1) x grpo's, unbiased
       reinforce_pp  r_i - mean(r), then / (std of every process's advantages + eps): REINFORCE++ with a
                     baseline (Hu et al. 2025), which normalises itself (`scaling` does not apply);
    2. a scaling (`scaling`): `group` divides by the group's reward std + eps (DeepSeekMath), `batch` by the std of
       every process's rewards + eps (TRL's, Lite PPO's), `group+batch` by the group's, then by the std of every
       process's advantages (their mean is 0 already: the seed's default), `none` neither.
    A group whose scores are all equal gets advantage 0 exactly, under every estimator and scaling.
    """
    gather = gather or (lambda x: x)
    grouped = scores.view(-1, group_size)  # (num_prompts, G)
    if estimator == "rloo":
        advantages = grouped - (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    else:
        advantages = grouped - grouped.mean(1, keepdim=True)
    if estimator == "reinforce_pp":
        scaling = "advantages"  # the batch's advantage std, below
    if scaling in ("group", "group+batch"):
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    elif scaling == "batch":
        advantages = advantages / (gather(scores).std() + eps)
    # A group whose replies all scored the same has nothing to prefer: exactly 0, not a rounding residue.
    spread = grouped.amax(1, keepdim=True) - grouped.amin(1, keepdim=True)
    advantages = torch.where(spread > 0, advantages, 0.0).flatten()
    if scaling in ("advantages", "group+batch"):
        advantages = advantages / (gather(advantages).std() + eps)
    return advantages


def k3_kl(logprobs, ref_logprobs):
    """Per-token KL(pi || ref) estimate, DeepSeekMath eq. 4 (Schulman's k3): unbiased and >= 0."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(per_token, mask, loss_type, max_new_tokens, tokens_per_process=None):
    """The token losses (N, R) as one number, by `loss_type` (TRL's names and forms):
    grpo     1/N sum_i 1/|o_i| sum_t l_it       DeepSeekMath eq. 3: each reply's mean, then their mean
    bnpo     sum_it l_it / sum_i |o_i|          a token mean over this batch
    dr_grpo  sum_it l_it / (N x max_new_tokens) Dr. GRPO (Liu et al. 2025): no length normalisation
    dapo     sum_it l_it / (tokens of every process / processes)   DAPO (Yu et al. 2025): a token mean over the
             global batch; `tokens_per_process` (on one process: this batch's tokens, bnpo's)
    """
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_new_tokens)
    return total / max(tokens_per_process, 1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, entropy, mask, args, kl_coef, tokens_per_process=None,
              reply_mask=None):  # fmt: skip
    """DeepSeekMath eq. 3 plus the seed's entropy term; every input (N, R) except advantages (N,).

    Per token: -min(ratio x A, clip(ratio, 1 - clip_range, 1 + epsilon_high) x A) (+ kl_coef x k3 with
    `--kl_in loss`), averaged by `--loss_type` (`aggregate`). The entropy term acts on the mean per-token entropy,
    each reply's mean then their mean, whatever the loss type (a regulariser of the policy, not a token loss).
    Tokens where `mask` is 0 (after a reply's first EOS, or a truncated reply's with --mask_truncated_completions)
    contribute nothing, whatever they hold; the logged KL counts every reply token (`reply_mask`, default `mask`),
    so a masked truncated reply's KL is still seen. Returns the loss and its parts (detached) for logging.
    """
    keep = mask.bool()
    reply = keep if reply_mask is None else reply_mask.bool()
    high = args.clip_range if args.epsilon_high is None else args.epsilon_high
    # Zero the masked log-ratios before exp(), so padding can never overflow into inf * 0 = nan.
    log_ratio = torch.where(keep, logprobs - old_logprobs, 0.0)  # (N, R)
    ratio = torch.exp(log_ratio)
    advantages = advantages[:, None]  # (N, 1)
    pg_losses = -advantages * ratio  # (N, R)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - args.clip_range, 1 + high)
    pg_loss_tokens = torch.max(pg_losses, pg_losses_clipped)  # pessimistic bound of PPO
    kl = k3_kl(torch.where(reply, logprobs, 0.0), torch.where(reply, ref_logprobs, 0.0))  # (N, R), 0 after EOS
    kl_weight = kl_coef if args.kl_in == "loss" else 0.0

    def per_reply_mean(x):  # 1/G sum_i 1/|o_i| sum_t: mean over each reply's tokens, then over replies
        if args.mask_truncated_completions:  # over the replies with a token left in the loss
            return masked_mean(masked_mean(x, mask, dim=1), keep.any(1).float())
        return masked_mean(x, mask, dim=1).mean()

    def token_share(x):  # the share of the batch's reply tokens where x holds
        return masked_mean(x.float(), mask)

    pg_loss = aggregate(pg_loss_tokens, mask, args.loss_type, args.max_new_tokens, tokens_per_process)
    kl_loss = kl_weight * aggregate(kl, mask, args.loss_type, args.max_new_tokens, tokens_per_process)
    mean_entropy = per_reply_mean(entropy)
    entropy_loss = args.entropy_coef * (mean_entropy - args.target_entropy) ** 2
    loss = pg_loss + kl_loss + entropy_loss
    stats = {
        "grpo/loss": loss,
        "grpo/pg_loss": pg_loss,
        "grpo/kl_loss": kl_loss,
        "grpo/entropy_loss": entropy_loss,
        "grpo/clipfrac": per_reply_mean(((ratio < 1 - args.clip_range) | (ratio > 1 + high)).float()),
        # the tokens the clip held back (TRL's keys): a low ratio on a worse reply, a high one on a better reply
        "grpo/clip_ratio/low": token_share((ratio < 1 - args.clip_range) & (advantages < 0)),
        "grpo/clip_ratio/high": token_share((ratio > 1 + high) & (advantages > 0)),
        "objective/entropy": mean_entropy,
        "objective/kl": kl.sum(1).mean(),  # per reply: k3 summed over its tokens
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def prompt_order(num_prompts, needed, seed):
    """A seeded sequence of prompt indices, one permutation after another: resuming at step s draws the same."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(num_prompts) for _ in range(-(-needed // num_prompts))])


def grpo_step(policy, reference, reward, tokenizer, optimizer, prompts, args, kl_coef, accelerator, stop_hint):
    """One GRPO step on this process's `prompts`: sample groups, score, advantages, reference log-probs, update(s).

    Returns the samples, the scores of every process's replies (gathered), the loss statistics of
    each update and this process's mean of each reward function. A non-finite loss on any process
    stops them all with `stop_hint` in the message.
    """
    # 1. sample a group of replies per prompt, stopped and masked at the first EOS
    samples = generate_responses(
        unwrap(policy),
        tokenizer,
        prompts,
        args.max_prompt_length,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        num_return_sequences=args.group_size,
        compile=args.compile_generation,
    )
    input_ids, attention_mask = samples.input_ids, samples.attention_mask  # (N, P + R), N = prompts x G
    truncated = ~samples.ended(tokenizer.eos_token_id)  # (N,) hit max_new_tokens without ending
    mask = samples.response_mask  # (N, R)
    if args.mask_truncated_completions:
        mask = mask * ~truncated[:, None]
    context_length = samples.query_ids.shape[1]
    tokens_per_process = None  # dapo's normaliser: every process's reply tokens, per process (DDP averages them)
    if args.loss_type == "dapo":
        tokens_per_process = accelerator.gather(mask.sum()).sum().item() / accelerator.num_processes

    # 2. score every (prompt, reply) with the reward model (or the --reward_funcs mix)
    scores, parts = reward(samples, tokenizer)
    all_scores = accelerator.gather(scores)  # (N * world,)

    # 3. log-probs of the replies under the frozen reference
    with torch.no_grad():
        ref_logprobs, _, _ = response_logprobs(reference, input_ids, attention_mask, context_length, args.temperature)

    # 4. gradient steps on the rollout; the first one's log-probs are the sampling policy's (pi_old), from which
    # the advantages come: group-relative (`--advantage`, `--scale_rewards`), with --kl_in reward from the rewards
    # less beta x each reply's summed log-ratio to the reference
    update_stats = []
    for update in range(args.updates_per_rollout):
        logprobs, entropy, _ = response_logprobs(
            policy, input_ids, attention_mask, context_length, args.temperature, entropy=True
        )  # (N, R) each
        if update == 0:
            old_logprobs = logprobs.detach()
            rewards = scores
            if args.kl_in == "reward":
                rewards = scores - kl_coef * ((old_logprobs - ref_logprobs) * samples.response_mask).sum(1)
            advantages = group_advantages(
                rewards, args.group_size, args.advantage, args.scale_rewards, args.std_eps, accelerator.gather
            )  # (N,)
        loss, stats = grpo_loss(
            logprobs, old_logprobs, ref_logprobs, advantages, entropy, mask, args, kl_coef, tokens_per_process,
            reply_mask=samples.response_mask,
        )  # fmt: skip
        stats["response/truncated_share"] = truncated.float().mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_cpu_memory(accelerator.device)  # a CPU run's heap would grow step after step (common.py)
        update_stats.append(stats)
    # a NaN/inf on any process stops them all, checked once per step, not per update (each check is a GPU-to-CPU
    # sync): the weights a bad update spoiled are never checkpointed, as the run stops before its save
    losses = accelerator.gather(torch.stack([s["grpo/loss"] for s in update_stats]))
    if not torch.isfinite(losses).all():
        raise UserError(f"the loss is {losses.tolist()} {stop_hint}")
    return samples, all_scores, update_stats, {f"reward/{name}": values.mean() for name, values in parts.items()}


def main(args):
    for name in ("total_steps", "rollout_batch_size", "updates_per_rollout", "eval_every", "save_every"):
        check(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    check(
        args.group_size >= 2, f"--group_size must be at least 2 (a group of one has no baseline), got {args.group_size}"
    )
    check_live_eval_args(args)
    check(
        args.max_new_tokens >= 1 and args.max_prompt_length >= 1,
        "--max_new_tokens and --max_prompt_length must be at least 1",
    )
    check(args.temperature > 0 and 0 < args.top_p <= 1, "--temperature must be > 0 and --top_p in (0, 1]")
    check(
        args.clip_range > 0 and args.kl_coef >= 0 and args.std_eps > 0,
        "--clip_range and --std_eps must be > 0, --kl_coef >= 0",
    )
    check(not args.adapt_kl or args.target_kl > 0, f"--target_kl must be > 0 with --adapt_kl, got {args.target_kl}")
    check(
        args.scale_rewards in SCALINGS,
        f"--scale_rewards takes {', '.join(SCALINGS)}, got {args.scale_rewards!r} (the old True is group+batch, or "
        "group with --normalize_advantages off; False is --advantage reinforce_pp, or none with it off)",
    )
    check(args.epsilon_high is None or args.epsilon_high > 0, f"--epsilon_high must be > 0, got {args.epsilon_high}")
    check(
        re.fullmatch(r"grpo[\w.-]*", args.run_name) is not None,  # never another script's folders (ppo, dpo, ...)
        f"--run_name must start with grpo and be a folder name (letters, digits, _ . -), got {args.run_name!r}",
    )
    best_dir, final_dir = grpo_dirs(args.run_name)
    run_dir = Path(args.work_dir) / "runs" / args.run_name
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume:
        check_resumable(ckpt_path)

    accelerator = make_accelerator(args, run_dir)
    is_main, device = accelerator.is_main_process, accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if is_main:
        remove_leftovers(run_dir, args.work_dir)
    set_seed(args.seed)

    # data: train prompts for rollouts (the held-out ones: live_eval.py)
    data = load_processed_data(args)
    train_prompts = list(data["train"]["prompt"])
    order = prompt_order(len(train_prompts), args.total_steps * args.rollout_batch_size * world, args.seed)

    # models: the policy (trained) and its frozen reference, both the start model (sft_model/ or the base model:
    # --init_from), and the frozen reward model
    start = start_model(args, run_dir, is_main)
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(start, tokenizer)
    check_positions(policy.config, args.max_prompt_length + args.max_new_tokens, PROMPT_AND_REPLY)
    reference = freeze(copy.deepcopy(policy).to(device))
    proxy = load_reward_model(args.work_dir, device, args)  # the proxy reward model: trained on, and a held-out judge
    reward = RewardMix(args, device, proxy=proxy)  # what GRPO maximises: the proxy unless --reward_funcs says otherwise
    if is_main and args.reward_funcs != "model":
        print(f"reward: {reward.describe()}")
    live = LiveEval(args, data, tokenizer, reference, proxy, device, reward=reward, rank=rank, world=world)
    policy.eval()  # dropout off: the loss's log-probs are those of the policy that sampled
    optimizer = adamw(policy.parameters(), args.learning_rate, args.weight_decay, accelerator.device)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)

    # one id per run, written into both output folders: evaluation can tell a pair from two runs
    start_step, run_id, state = 0, uuid.uuid4().hex[:12], {}
    if args.resume:
        state = load_checkpoint(ckpt_path)
        unwrap(policy).load_state_dict(state["policy"])
        load_optimizer_state(optimizer, state["optimizer"])
        check_same_objective(state, args, OBJECTIVE_FLAGS)
        start_step, kl_ctl.value = state["step"], state["kl_coef"]
        run_id = state.get("run_id", run_id)
        check(start_step <= args.total_steps, f"--resume: the checkpoint is at step {start_step} > --total_steps")
    monitor = Monitor(live, args, state.get("monitor"))
    last_step = monitor.stopped or args.total_steps  # where the run ends: --total_steps, or where the alarm stopped it
    if args.resume and is_main:
        print(f"resumed from {ckpt_path} at step {start_step}{FINISHING if start_step == last_step else ''}")
        if monitor.stopped:
            print(monitor.finished_line())
    resume_step = start_step if args.resume else None
    start_tracking(accelerator, args, run_dir, args.run_name, resume_step)
    logger = MetricsLogger(run_dir / "metrics.jsonl", resume_step=resume_step, enabled=is_main, tracker=accelerator)
    if is_main:
        save_args(args, run_dir / "args.json")
        sync_snapshots(run_dir, start_step, args.total_steps, args.snapshot_every, unwrap(policy))

    def evaluate(step):
        """The held-out evaluation at `step` (live_eval.py), identical on every process; its tokens counted."""
        metrics = monitor(step, policy, say=tqdm.write if is_main else lambda line: None)
        logger.add_tokens(monitor.tokens)
        return metrics

    if not monitor.history and args.eval_every:  # the start model is the first candidate: NAME_best/ is never worse
        logger.log(0, evaluate(0))

    # counted by hand, not by iterating: into a log file (a redraw every 30 s) an iterating bar shows a stale count
    progress = tqdm(total=args.total_steps, initial=start_step, desc="grpo", disable=not is_main)
    truncation_warned = False
    for step in range(start_step + 1, last_step + 1):
        first = ((step - 1) * world + rank) * args.rollout_batch_size
        prompts = [train_prompts[i] for i in order[first : first + args.rollout_batch_size]]
        # 1-5. sample, score, group advantages, reference log-probs, the update(s): `grpo_step` above
        kl_coef = kl_ctl.value if args.adapt_kl else args.kl_coef
        hint = (
            f"at step {step}: stopped; the last good checkpoint is {ckpt_path} "
            "(rerun with --resume and a lower --learning_rate)"
        )
        samples, all_scores, update_stats, reward_parts = grpo_step(
            policy, reference, reward, tokenizer, optimizer, prompts, args, kl_coef, accelerator, hint
        )
        attention_mask, mask = samples.attention_mask, samples.response_mask

        # 6. metrics: per-process means gathered in one transfer, read once (each .item() would stall a GPU)
        local = {k: torch.stack([s[k] for s in update_stats]).mean() for k in update_stats[0]}
        local |= {
            "objective/kl": update_stats[0]["objective/kl"],  # per reply (k3 summed over its tokens), before updating
            "response/length": mask.sum(1).float().mean(),
            "response/eos_share": samples.ended(tokenizer.eos_token_id).float().mean(),
            "tokens": attention_mask.sum().float() * world,  # the mean over processes times their number: the sum
            **reward_parts,  # each --reward_funcs, unweighted
        }
        grouped = all_scores.view(-1, args.group_size)  # (prompts x world, G), already gathered
        overall = {
            "objective/scores": all_scores.mean(),
            "grpo/reward_std": all_scores.std(),
            "grpo/within_group_std": grouped.std(1).mean(),
            "grpo/zero_spread_share": (grouped.amax(1) == grouped.amin(1)).float().mean(),
        }
        gathered = accelerator.gather(torch.stack(list(local.values())).unsqueeze(0)).mean(0)  # (K,)
        values = torch.cat([gathered, torch.stack(list(overall.values())).float()]).tolist()
        metrics = dict(zip([*local, *overall], values))
        logger.add_tokens(metrics.pop("tokens") * (3 + args.updates_per_rollout))  # generation, reference, reward,
        replies = gather_object(samples.responses)  # updates
        metrics |= {"objective/kl_coef": kl_coef, "response/distinct_share": len(set(replies)) / len(replies)}

        if metrics["response/truncated_share"] > 0.5 and not truncation_warned and is_main:
            tqdm.write(
                f"warning: at step {step}, {metrics['response/truncated_share']:.0%} of the replies hit "
                f"--max_new_tokens {args.max_new_tokens} without ending: their rewards score cut-off text (raise "
                "--max_new_tokens, or --mask_truncated_completions); said once"
            )
        truncation_warned |= metrics["response/truncated_share"] > 0.5

        # 7. adaptive KL on the per-reply KL, measured before the update
        if args.adapt_kl:
            kl_ctl.update(metrics["objective/kl"], len(all_scores))
        if args.eval_every and (step % args.eval_every == 0 or step == args.total_steps):
            metrics |= evaluate(step)
        logger.log(step, metrics)
        progress.set_postfix(
            score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}", refresh=False
        )
        progress.update()  # redraws at most every TQDM_MININTERVAL s, the postfix with it

        if is_main and snapshot_due(step, args.total_steps, args.snapshot_every):
            save_snapshot(run_dir, step, unwrap(policy))
        if step % args.save_every == 0 or step == args.total_steps or monitor.stop:
            if is_main:
                save_checkpoint(
                    ckpt_path,
                    {
                        "policy": unwrap(policy).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "monitor": monitor.state(),
                        "kl_coef": kl_ctl.value,
                        "run_id": run_id,
                        "objective": objective(args, OBJECTIVE_FLAGS),
                    },
                )
                if (
                    step < args.total_steps and not monitor.stop
                ):  # the curves so far (the last step's are drawn with the final policy)
                    plot_metrics(run_dir / "metrics.jsonl", CURVES, run_dir / "grpo_curves.png", "GRPO")
            accelerator.wait_for_everyone()
        if monitor.stop:
            last_step = step
            break
    progress.close()

    # 8. save the final policy and the best-by-held-out-reward one, each with the run's metrics, curves and card
    if is_main:
        plot_metrics(run_dir / "metrics.jsonl", CURVES, run_dir / "grpo_curves.png", "GRPO")
        records = read_metrics(run_dir / "metrics.jsonl")

        def folder_files(step, title):
            """What both folders hold; eval_results.json is the held-out evaluation logged at `step`."""
            record = next(r for r in records if r["step"] == step and "eval/reward" in r)
            results = {"split": "validation", "prompts": len(live.prompts), "step": step}
            results |= {k: v for k, v in record.items() if k.startswith("eval/")}
            return {
                "metrics.jsonl": lambda p: shutil.copy(run_dir / "metrics.jsonl", p),
                "grpo_curves.png": lambda p: shutil.copy(run_dir / "grpo_curves.png", p),
                "args.json": lambda p: shutil.copy(run_dir / "args.json", p),
                RUN_ID_FILE: lambda p: atomic_write_json(p, {"run_id": run_id}),
                "eval_results.json": lambda p: atomic_write_json(p, results),
                "README.md": card_writer(
                    "grpo",
                    args,
                    results,
                    "GRPO_training.py",
                    TINY,
                    curves="grpo_curves.png",
                    title=title,
                    note=f"Its reward: {reward.describe()}.",
                ),
            }

        best = monitor.best
        final_title = f"GRPO policy, step {last_step}" + (
            " (stopped by the over-optimisation alarm)" if monitor.stopped else ""
        )
        best_title = f"GRPO policy, best step {best.saved['step']} by held-out {args.select_by}"
        save_pretrained_atomic(
            Path(args.work_dir) / final_dir, policy, tokenizer, extra=folder_files(last_step, final_title)
        )
        extra = folder_files(best.saved["step"], best_title)
        extra["best.json"] = lambda p: atomic_write_json(p, best.info(len(live.prompts)))
        save_pretrained_atomic(
            Path(args.work_dir) / best_dir, monitor.best_policy(start, tokenizer), tokenizer, extra=extra
        )
        print(best.line(args.work_dir, best_dir))
        print(f"final policy -> {args.work_dir}/{final_dir}")
    end_run(accelerator, args, Path(args.work_dir) / best_dir)  # what evaluate_models.py reports as GRPO
    return unwrap(policy)


if __name__ == "__main__":
    run(main, Args, TINY, checkpoint=lambda args: Path(args.work_dir) / "runs" / args.run_name / "checkpoint.pt")
