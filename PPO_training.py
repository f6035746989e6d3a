"""Step 3 of the pipeline: RLHF with PPO against the learned reward model.

The policy (the base causal LM plus a value head on its last hidden state) samples
replies to prompts from `processed_data/`'s train split, the frozen reward model from
`final_reward_model/` scores them, and PPO maximises score minus a per-token KL penalty
to a frozen copy of the base model (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences"; Schulman et al. 2017, "Proximal Policy Optimization
Algorithms"; Huang et al. 2024, "The N Implementation Details of RLHF with PPO"). One
step of the loop below:

1. generate: `rollout_batch_size` prompts per process (left truncated, so each keeps its
   final "Assistant:"), one sampled reply each (KV cache, `top_k=0`, `temperature`,
   `top_p`), masked after its first EOS;
2. score: `get_reward` on `join_conversation(prompt, reply)`, read at the last real token
   (or the mix of `--reward_funcs`, `common.RewardMix`: the gold reward model, the tiny
   world's oracle, a length penalty, a function of your own; `--missing_eos_penalty`);
3. per-token KL penalty: r_t = -beta * (log pi(y_t) - log pi_ref(y_t)) on every reply
   token, plus the score at the last one (the first EOS, or the last token without one);
   beta follows Ziegler's adaptive controller toward `target_kl` (KL = per-sequence sum);
4. GAE (gamma, lam) over reply tokens, returns = advantages + values, advantages whitened;
5. PPO epochs: `ppo_epochs` passes over the rollout in `num_minibatches` minibatches with the
   clipped policy loss, the clipped value loss and the seed's entropy term
   `entropy_coef * (H - target_entropy)**2` (H = mean per-token entropy over reply tokens),
   grad-norm clipping.

    python PPO_training.py                                   # gpt2, the seed's settings (GPU)
    python PPO_training.py --preset tiny --work_dir runs/tiny  # offline, ~1 minute on 2 CPU cores
    accelerate launch --num_processes 2 PPO_training.py       # data parallel on 2 GPUs, unchanged
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 PPO_training.py --preset tiny --work_dir runs/tiny

(On CPU, `accelerate launch --num_processes 2 --cpu` runs the script unchanged but, in
accelerate 1.x, as a single process; the last line above starts two gloo processes.)

Writes `ppo_rlhf_model/` (policy, tokenizer, `value_head.safetensors`, `metrics.jsonl`,
`ppo_curves.png`, `args.json`, `eval_results.json`: score, KL, distinct share and length
of one sample per held-out test prompt, for the policy and the base model, sampled with
`eval_top_p` = 1.0 as evaluate_models.py does). While it
trains, `runs/ppo/` holds `checkpoint.pt` (every `save_every` steps) for `--resume`, and with
`--snapshot_every N` (tiny: 5) a policy-only snapshot every N steps in `runs/ppo/snapshots/step-N/`,
the points of evaluate_models.py's reward-KL frontier.

Deliberate choices and departures:
* `rollout_batch_size` is per process (the global batch is it times the process count).
* Dropout is off throughout (the policy stays in eval mode), as in the N details: with
  dropout on, the first minibatch's ratio would not be 1 and clipfrac/approx_kl would be noise.
* The value head reads `hidden_states[-1]`, which in transformers 5 is GPT-2's state after
  the final layer norm (the vector lm_head reads). It shares the policy's transformer (one
  module, so DDP syncs both) and starts at zero, so it adds no noise to the first advantages.
* Losses are token means over the minibatch's reply tokens; approx_kl is the k3
  estimator, mean((ratio - 1) - log ratio) (Schulman, "Approximating KL divergence").
* With `top_p` < 1 replies are sampled from the truncated distribution while log-probs,
  ratios and KL use the full tempered one (as the seed and TRL do): slightly off-policy.
* Scores are used as the reward model gives them (no reward normalisation or whitening),
  and a reply without EOS is not penalised; the learning rate is constant.
"""

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers.utils import ModelOutput

from common import (
    PROMPT_AND_REPLY,
    AdaptiveKLController,
    FP32Linear,
    RewardMix,
    adamw,
    check_positions,
    freeze,
    generate_responses,
    get_reward,
    load_causal_lm,
    load_optimizer_state,
    load_processed_data,
    load_reward_model,
    load_tokenizer,
    make_accelerator,
    masked_mean,
    masked_whiten,
    release_cpu_memory,
    response_logprobs,
    save_pretrained_atomic,
    sequence_kl,
    set_seed,
    start_model,
    test_prompt_sample,
    unwrap,
)
from lifecycle import (
    FINISHING,
    PPO_BEST_DIR,
    PPO_DIR,
    REWARD_FLAGS,
    GenerationArgs,
    LiveEvalArgs,
    PolicyArgs,
    RewardArgs,
    UserError,
    atomic_write_json,
    check,
    check_resumable,
    check_same_objective,
    load_checkpoint,
    objective,
    remove_leftovers,
    run,
    save_checkpoint,
    save_snapshot,
    snapshot_due,
    sync_snapshots,
)
from live_eval import LiveEval, Monitor, check_live_eval_args, save_best
from reporting import MetricsLogger, card_writer, end_run, plot_metrics, start_tracking


@dataclass
class Args(PolicyArgs, GenerationArgs, RewardArgs, LiveEvalArgs):
    # data
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept, truncated from the left"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest sampled reply, in tokens"})
    reward_max_length: int = field(default=512, metadata={"help": "tokens the reward model reads (left truncated)"})
    # optimisation
    total_steps: int = field(default=1500, metadata={"help": "PPO steps (one rollout and its updates each)"})
    rollout_batch_size: int = field(default=8, metadata={"help": "prompts per rollout, per process"})
    num_minibatches: int = field(default=1, metadata={"help": "minibatches per PPO epoch over the rollout"})
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    # algorithm
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout"})
    clip_range: float = field(default=0.1, metadata={"help": "PPO ratio clip epsilon"})
    clip_range_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    value_coef: float = field(default=0.3, metadata={"help": "weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "discount over reply tokens"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial beta of the per-token KL penalty"})
    adapt_kl: bool = field(default=True, metadata={"help": "adapt beta toward target_kl (Ziegler et al. 2019)"})
    target_kl: float = field(default=0.3, metadata={"help": "target per-sequence KL (sum over reply tokens)"})
    kl_horizon: int = field(default=10_000, metadata={"help": "adaptive KL horizon in samples (Ziegler: 10000)"})
    entropy_coef: float = field(default=0.1, metadata={"help": "weight of (H - target_entropy)**2"})
    target_entropy: float = field(default=1.8, metadata={"help": "target mean per-token entropy (nats)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use it too)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling threshold"})
    # output
    log_samples_every: int = field(default=100, metadata={"help": "print a table of sample replies this often"})
    test_prompts: int = field(
        default=150, metadata={"help": "test prompts scored at the end, those of evaluate_models.py (0: none)"}
    )
    eval_top_p: float = field(
        default=1.0, metadata={"help": "nucleus threshold of the final evaluation (as evaluate_models.py)"}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per batch in the held-out evaluations"})


# Tiny: a larger rollout and learning rate, few steps (~1 minute on 2 cores). Changes of substance:
# target_entropy is the tiny model's own per-token entropy on its replies (~0.28 nats; the seed's 1.8 is
# gpt2's scale, and even 0.5 pushed the sharper tiny model to word salad: KL 24, oracle share 0.47 against
# base's 0.58); rollouts sample the full distribution (top_p 1.0, as the evaluation does: at 0.9 the tail the
# rollouts never visit grew unchecked into salad); the entropy term weighs 0.3, not 0.1 (at 0.1 the per-token
# entropy climbed in bursts and the per-reply KL reached 12 nats). The tiny reward model cannot tell a splice or
# a repeat from an answer (docs/known_limits.md), so the policy must stay near base: beta starts at 0.3, and
# each rollout gets one minibatch (2 updates, not 4). With 2 minibatches and beta 0.2 the run sat on a knife's
# edge: over seeds 42, 1, 2 on one machine its oracle share was 0.51, 0.66, 0.51 at KL 8.0, 4.6, 9.8 (base 0.58),
# and beta 0.4 or 0.5 there blew up (KL 17 and 498); with these settings, over seeds 42, 1, 2, 3: 0.71, 0.70,
# 0.66, 0.64 at KL 1.9-2.6 (PPO alone on one set of reward models, evaluate_models.py on 150 test prompts).
TINY = dict(
    total_steps=20,
    rollout_batch_size=32,
    learning_rate=2e-4,
    kl_coef=0.3,
    kl_horizon=1000,
    entropy_coef=0.3,
    target_entropy=0.3,
    top_p=1.0,
    reward_max_length=256,
    save_every=10,
    snapshot_every=5,
    log_samples_every=10,
    eval_every=5,
    eval_prompts=64,
)

RUN_NAME = "ppo"
VALUE_HEAD_FILE = "value_head.safetensors"
PLOT_KEYS = [
    "objective/scores",
    "eval/proxy",
    "eval/gold",
    "eval/oracle",
    "eval/sample_kl",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "ppo/pg_loss",
    "ppo/vf_loss",
    "ppo/clipfrac",
    "ppo/approx_kl",
    "response/length",
]


@dataclass
class PolicyOutput(ModelOutput):
    logits: torch.Tensor = None  # (B, T, V)
    values: torch.Tensor = None  # (B, T)
    hidden_states: tuple = None  # each (B, T, H); the last is what lm_head reads


class PolicyWithValueHead(nn.Module):
    """The causal LM and its value head as one module, so accelerate/DDP wraps and syncs both."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.value_head = FP32Linear(policy.config.hidden_size, 1)  # values in fp32 under autocast
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        kwargs["output_hidden_states"] = True
        output = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        # In transformers 5, GPT-2's hidden_states[-1] is the state after the final layer norm:
        # the very vector lm_head reads (tests/test_ppo.py checks it).
        values = self.value_head(output.hidden_states[-1]).squeeze(-1)  # (B, T)
        return PolicyOutput(logits=output.logits, values=values, hidden_states=output.hidden_states)

    def get_output_embeddings(self):  # the LM head, for `common.response_logprobs`
        return self.policy.get_output_embeddings()


def load_value_head(folder):
    """The value head saved beside a PPO policy (`ppo_rlhf_model/value_head.safetensors`)."""
    state = load_file(Path(folder) / VALUE_HEAD_FILE)
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head


def policy_forward(model, input_ids, attention_mask, context_length, temperature):
    """Log-probs (at the temperature) of each reply token, the entropies and values of the positions that predict
    them: (B, R) each."""
    logprobs, entropy, output = response_logprobs(
        model, input_ids, attention_mask, context_length, temperature, entropy=True
    )
    return logprobs, entropy, output.values[:, context_length - 1 : -1].float()


def per_token_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef):
    """Ziegler et al. (2019) eq. 2 per token: r_t = -beta * (logp_t - ref_logp_t), plus the score at the last token.

    The last token is the first EOS, or the final one when the reply has none; tokens
    after it are masked and get nothing. Returns (rewards, kl, non_score_reward), each (B, R).
    """
    kl = (logprobs - ref_logprobs) * response_mask  # (B, R)
    non_score_reward = -kl_coef * kl  # (B, R)
    last = response_mask.sum(1) - 1  # (B,) the mask is 1 up to and including the first EOS
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl, non_score_reward


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over reply tokens: (B, R) -> (B, R).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with
    V = 0 after the last real token (the episode ends there).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), a token mean. Returns (pg_loss, clipfrac, approx_kl)."""
    log_ratio = logprobs - old_logprobs  # (B, R)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 estimator of KL(old || new), >= 0
    return pg_loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss (as in OpenAI baselines' PPO2 / lm-human-preferences), a token mean. Returns (vf_loss, vf_clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_losses = (values - returns) ** 2  # (B, R)
    vf_losses_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).float(), mask)
    return vf_loss, vf_clipfrac.detach()


@torch.no_grad()
def evaluate(policy, ref_model, tokenizer, reward_model, rm_tokenizer, prompts, args):
    """One sampled reply per prompt: mean score and its standard error, KL to the reference, distinct share, length.

    `policy` and `ref_model` are bare causal LMs (the reference scored against itself has KL 0).
    KL is the per-sequence sum of log pi - log pi_ref over reply tokens, as in training. The random state is reset
    to `--seed` first, so the policy and its reference reply from the same random stream, run after run.
    """
    set_seed(args.seed)
    scores, kls, lengths, responses = [], [], [], []
    for i in range(0, len(prompts), args.eval_batch_size):
        samples = generate_responses(
            policy, tokenizer, prompts[i : i + args.eval_batch_size], args.max_prompt_length, args.max_new_tokens,
            args.temperature, args.eval_top_p, compile=args.compile_generation,
        )  # fmt: skip
        kls.append(sequence_kl(policy, ref_model, samples, args.temperature))  # (b,)
        lengths.append(samples.response_mask.sum(1).float())
        scores.append(
            get_reward(reward_model, rm_tokenizer, samples.prompts, samples.responses, args.reward_max_length)
        )
        responses += samples.responses
    scores, kls, lengths = torch.cat(scores).cpu(), torch.cat(kls).cpu(), torch.cat(lengths).cpu()
    return {
        "n": len(responses),
        "score": scores.mean().item(),
        "score_se": (scores.std() / len(scores) ** 0.5).item() if len(scores) > 1 else float("nan"),
        "kl": kls.mean().item(),
        "distinct_share": len(set(responses)) / len(responses),
        "length": lengths.mean().item(),
    }


def sample_table(prompts, responses, scores, n=4, width=90):
    """A few (question, reply, score) rows as plain text."""
    lines = [f"{'score':>6}  question -> reply"]
    for prompt, response, score in list(zip(prompts, responses, scores.tolist()))[:n]:
        question = prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:")[0].strip()
        lines.append(f"{score:6.2f}  {question[:40]!r} -> {response[: width - 40]!r}")
    return "\n".join(lines)


def ppo_step(model, ref_model, reward, tokenizer, optimizer, prompts, args, kl_coef, accelerator, stop_hint):
    """One PPO step on this process's `prompts`: generate, score, KL penalty, GAE, then the PPO epochs.

    Returns the samples, their scores (B,), this process's metrics (0-d tensors, not yet gathered) and
    the number of tokens through forward passes. A non-finite loss on any process stops them all with
    `stop_hint` in the message.
    """
    device = accelerator.device
    mini_batch_size = args.rollout_batch_size // args.num_minibatches

    # 1. generate: one reply per prompt, masked after its first EOS
    samples = generate_responses(
        unwrap(model).policy, tokenizer, prompts, args.max_prompt_length, args.max_new_tokens,
        args.temperature, args.top_p, compile=args.compile_generation,
    )  # fmt: skip
    input_ids, attention_mask = samples.input_ids, samples.attention_mask  # (B, P + R)
    response_mask = samples.response_mask  # (B, R)
    context_length = samples.query_ids.shape[1]
    # real tokens through forward passes, as every script counts them: generation, reward model (same tokenizer
    # family, so about the full text's tokens), policy and reference, then each PPO epoch's pass over the rollout
    n_tokens = attention_mask.sum() * (4 + args.ppo_epochs)  # a tensor: read once, with the metrics

    # 2. score: the reward model reads join_conversation(prompt, reply) at its last real token (`--reward_funcs`:
    # a weighted sum of reward functions, each logged as reward/<name>)
    scores, reward_parts = reward(samples, tokenizer)

    # log-probs and values of the rollout policy, log-probs of the reference, at the sampling temperature
    with torch.no_grad():
        logprobs, entropy, values = policy_forward(model, input_ids, attention_mask, context_length, args.temperature)
        entropy = masked_mean(entropy, response_mask)
        ref_logprobs, _, _ = response_logprobs(ref_model, input_ids, attention_mask, context_length, args.temperature)

    # 3. per-token KL penalty and the score at the last token (Ziegler et al. 2019, eq. 2)
    rewards, kl, non_score_reward = per_token_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef)

    # 4. GAE over reply tokens (Schulman et al. 2016); returns are the value targets, advantages get whitened
    values = values * response_mask
    advantages = compute_gae(rewards, values, response_mask, args.gamma, args.lam)  # (B, R)
    returns = advantages + values  # (B, R)
    raw_advantages_mean = masked_mean(advantages, response_mask)
    advantages = masked_whiten(advantages, response_mask)

    # 5. PPO epochs over the rollout in minibatches (Schulman et al. 2017)
    stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy_loss")}
    for _ in range(args.ppo_epochs):
        for mb in torch.randperm(args.rollout_batch_size, device=device).split(mini_batch_size):
            mb_mask = response_mask[mb]  # (b, R)
            mb_logprobs, mb_entropy, mb_values = policy_forward(
                model, input_ids[mb], attention_mask[mb], context_length, args.temperature
            )  # (b, R) each
            pg_loss, clipfrac, approx_kl = policy_loss(
                mb_logprobs, logprobs[mb], advantages[mb], mb_mask, args.clip_range
            )
            vf_loss, vf_clipfrac = value_loss(mb_values, values[mb], returns[mb], mb_mask, args.clip_range_value)
            mb_entropy = masked_mean(mb_entropy, mb_mask)
            entropy_loss = args.entropy_coef * (mb_entropy - args.target_entropy) ** 2  # the seed's term
            loss = pg_loss + args.value_coef * vf_loss + entropy_loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            release_cpu_memory(accelerator.device)  # a CPU run's heap would grow step after step (common.py)
            for k, v in zip(stats, (pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, entropy_loss)):
                stats[k].append(v.detach())
    # a NaN/inf on any process stops them all, checked once per step (a GPU-to-CPU sync per minibatch would stall
    # the GPU): the weights a bad minibatch spoiled are never checkpointed, as the run stops before its save
    parts = torch.stack([torch.stack(stats[k]) for k in ("pg_loss", "vf_loss", "entropy_loss")])  # (3, minibatches)
    if not torch.isfinite(accelerator.reduce(parts.sum(), "sum")):
        bad = (~torch.isfinite(parts)).any(0)  # (minibatches,)
        if not bad.any():
            raise UserError(f"non-finite loss on another process {stop_hint}")
        pg, vf, ent = parts[:, bad.long().argmax()].tolist()  # the first bad minibatch
        raise UserError(f"non-finite loss (pg {pg:.4g}, vf {vf:.4g}, entropy {ent:.4g}) {stop_hint}")

    # this process's metrics; main gathers them
    local = {
        "objective/scores": scores.mean(),
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": entropy,
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean(),
        **{f"ppo/{k}": torch.stack(v).mean() for k, v in stats.items()},
        "ppo/returns_mean": masked_mean(returns, response_mask),
        "ppo/advantages_mean": raw_advantages_mean,
        "response/length": response_mask.sum(1).float().mean(),
        "response/eos_share": samples.ended(tokenizer.eos_token_id).float().mean(),
        **{f"reward/{name}": values.mean() for name, values in reward_parts.items()},  # each --reward_funcs, unweighted
    }
    return samples, scores, local, n_tokens


def main(args):
    """Train, evaluate and save; returns the trained policy with its value head (for tests and notebooks)."""
    check(args.total_steps > 0 and args.ppo_epochs > 0, "--total_steps and --ppo_epochs must be positive")
    check(
        args.rollout_batch_size > 0
        and args.num_minibatches > 0
        and args.rollout_batch_size % args.num_minibatches == 0,
        f"--rollout_batch_size ({args.rollout_batch_size}) must be a positive multiple of --num_minibatches "
        f"({args.num_minibatches})",
    )
    check(
        args.max_prompt_length > 0 and args.max_new_tokens > 0,
        "--max_prompt_length and --max_new_tokens must be positive",
    )
    check(args.temperature > 0 and 0 < args.top_p <= 1, "--temperature must be > 0 and --top_p in (0, 1]")
    check(args.target_kl > 0 and args.kl_horizon > 0, "--target_kl and --kl_horizon must be positive")
    check(args.save_every > 0 and args.log_samples_every > 0, "--save_every and --log_samples_every must be positive")
    check(args.test_prompts >= 0, f"--test_prompts must be >= 0, got {args.test_prompts}")
    check_live_eval_args(args)
    check(0 < args.eval_top_p <= 1, f"--eval_top_p must be in (0, 1], got {args.eval_top_p}")
    run_dir = Path(args.work_dir) / "runs" / RUN_NAME
    checkpoint_path = run_dir / "checkpoint.pt"
    if args.resume:
        check_resumable(checkpoint_path)
    accelerator = make_accelerator(args, run_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    if is_main:
        remove_leftovers(run_dir, args.work_dir)
    set_seed(args.seed)

    # data: a seeded order over the train prompts, one shuffle per pass; step s, process p reads a disjoint slice
    data = load_processed_data(args)
    train_prompts = list(data["train"]["prompt"])
    global_batch = args.rollout_batch_size * accelerator.num_processes
    passes = -(-args.total_steps * global_batch // len(train_prompts))
    order_rng = np.random.default_rng(args.seed)
    order = np.concatenate([order_rng.permutation(len(train_prompts)) for _ in range(passes)])
    test_indices, test_prompts = test_prompt_sample(data["test"], args.test_prompts, args.seed)  # evaluate_models.py's

    # models: policy + value head (trained) and its frozen reference, both from the start model (sft_model/ or the
    # base model: --init_from), and the reward model (frozen)
    start = start_model(args, run_dir, is_main)
    tokenizer = load_tokenizer(args.model)
    model = PolicyWithValueHead(load_causal_lm(start, tokenizer))
    check_positions(model.policy.config, args.max_prompt_length + args.max_new_tokens, PROMPT_AND_REPLY)
    ref_model = freeze(load_causal_lm(start, tokenizer).to(device))
    reward_model, rm_tokenizer = load_reward_model(args.work_dir, device, args)  # the final evaluation's judge
    check_positions(reward_model.config, args.reward_max_length, "--reward_max_length")
    reward = RewardMix(args, device, proxy=(reward_model, rm_tokenizer))  # what PPO maximises: --reward_funcs
    if is_main and args.reward_funcs != "model":
        print(f"reward: {reward.describe()}")
    rank, world = accelerator.process_index, accelerator.num_processes
    live = LiveEval(args, data, tokenizer, ref_model, (reward_model, rm_tokenizer), device, reward, rank, world)
    model.eval()  # dropout off for good: rollout and update must see the same policy
    optimizer = adamw(model.parameters(), args.learning_rate, args.weight_decay, accelerator.device)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)

    start_step, state = 0, {}
    if args.resume:
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        check_same_objective(state, args, REWARD_FLAGS)
        start_step, kl_ctl.value = state["step"], state["kl_coef"]
        check(
            start_step <= args.total_steps,
            f"--resume: {checkpoint_path} is at step {start_step} > --total_steps {args.total_steps}: raise --total_steps",
        )
    elif checkpoint_path.exists() and is_main:
        print(f"starting afresh: {checkpoint_path} from an earlier run will be overwritten (--resume continues it)")
    monitor = Monitor(live, args, state.get("monitor"))
    last_step = monitor.stopped or args.total_steps  # where the run ends: --total_steps, or where the alarm stopped it
    if args.resume:
        print(f"resumed from {checkpoint_path} at step {start_step}{FINISHING if start_step == last_step else ''}")
        if monitor.stopped:
            print(monitor.finished_line())
    if is_main:
        sync_snapshots(run_dir, start_step, args.total_steps, args.snapshot_every, unwrap(model).policy)
    model, optimizer = accelerator.prepare(model, optimizer)

    resume_step = start_step if args.resume else None
    start_tracking(accelerator, args, run_dir, RUN_NAME, resume_step)
    logger = MetricsLogger(run_dir / "metrics.jsonl", resume_step=resume_step, enabled=is_main, tracker=accelerator)

    def evaluate_held_out(step):
        """The held-out evaluation at `step` (live_eval.py), identical on every process; its tokens counted."""
        metrics = monitor(step, unwrap(model).policy, say=tqdm.write if is_main else lambda line: None)
        logger.add_tokens(monitor.tokens)
        return metrics

    if not monitor.history and args.eval_every:  # the start model is the first candidate: ppo_best/ is never worse
        logger.log(0, evaluate_held_out(0))
    # counted by hand, not by iterating: into a log file (a redraw every 30 s) an iterating bar shows a stale count
    progress = tqdm(total=args.total_steps, initial=start_step, desc="ppo", disable=not is_main)
    for step in range(start_step, last_step):
        first = step * global_batch + accelerator.process_index * args.rollout_batch_size
        prompts = [train_prompts[i] for i in order[first : first + args.rollout_batch_size]]

        # 1-5. generate, score, KL penalty, GAE, the PPO epochs: `ppo_step` above
        kept = f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.exists() else "no checkpoint yet"
        hint = f"at step {step + 1}: stopped; {kept}; try a lower --learning_rate"
        samples, scores, local, n_tokens = ppo_step(
            model, ref_model, reward, tokenizer, optimizer, prompts, args, kl_ctl.value, accelerator, hint
        )

        # metrics: per-process means, then gathered; beta adapts to the mean per-sequence KL of all processes
        gathered = accelerator.gather(torch.stack([v.float() for v in local.values()]).unsqueeze(0))  # (N, K)
        metrics = dict(zip(local, gathered.mean(0).tolist()))
        all_responses = gather_object(samples.responses)
        metrics["response/distinct_share"] = len(set(all_responses)) / len(all_responses)
        metrics["objective/kl_coef"] = kl_ctl.value
        logger.add_tokens(accelerator.reduce(n_tokens.float(), "sum").item())
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.total_steps):
            metrics |= evaluate_held_out(step + 1)
        logger.log(step + 1, metrics)
        if args.adapt_kl:
            kl_ctl.update(metrics["objective/kl"], global_batch)
        progress.set_postfix(
            score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}", refresh=False
        )
        progress.update()  # redraws at most every TQDM_MININTERVAL s, the postfix with it
        if is_main and (step + 1) % args.log_samples_every == 0:
            tqdm.write(f"step {step + 1}\n" + sample_table(samples.prompts, samples.responses, scores))
        if is_main and snapshot_due(step + 1, args.total_steps, args.snapshot_every):
            save_snapshot(run_dir, step + 1, unwrap(model).policy)
        if (step + 1) % args.save_every == 0 or step + 1 == args.total_steps or monitor.stop:
            if is_main:
                state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
                state |= {"step": step + 1, "kl_coef": kl_ctl.value, "objective": objective(args, REWARD_FLAGS)}
                save_checkpoint(checkpoint_path, state | {"monitor": monitor.state()})
            accelerator.wait_for_everyone()
        if monitor.stop:
            last_step = step + 1
            break
    progress.close()

    # data parallel keeps one policy: a gathered checksum shows every process holds the same weights
    if accelerator.num_processes > 1:
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().unsqueeze(0)
        sums = accelerator.gather(checksum)  # DDP averages gradients, so the weights must agree bit for bit
        if not (sums == sums[0]).all():
            raise RuntimeError(f"processes ended with different weights (parameter sums {sums.tolist()})")
        if is_main:
            print(f"weights identical on all {accelerator.num_processes} processes")

    if is_main:
        policy = unwrap(model).policy
        results = {}
        if test_prompts:
            # final eval: held-out test prompts, the trained policy against its reference, the model it started
            # from (under its name: "sft" or "base")
            results = {
                "prompts": len(test_prompts),
                "test_indices": test_indices,  # the test rows scored: evaluate_models.py's `test_index` column
                "ppo": evaluate(policy, ref_model, tokenizer, reward_model, rm_tokenizer, test_prompts, args),
                args.init_from: evaluate(
                    ref_model, ref_model, tokenizer, reward_model, rm_tokenizer, test_prompts, args
                ),
            }
            for name in (args.init_from, "ppo"):
                r = results[name]
                print(
                    f"eval {name:>4}: score {r['score']:.3f} +- {r['score_se']:.3f}, KL {r['kl']:.2f}, "
                    f"distinct {r['distinct_share']:.2f}, length {r['length']:.1f} tokens (on {r['n']} test prompts: "
                    f"those of evaluate_models.py --num_prompts {r['n']} --seed {args.seed})"
                )
        plot_metrics(run_dir / "metrics.jsonl", PLOT_KEYS, run_dir / f"{RUN_NAME}_curves.png", title="PPO")
        files = {  # what the final folder and ppo_best/ both hold
            "metrics.jsonl": lambda path: shutil.copy(run_dir / "metrics.jsonl", path),
            f"{RUN_NAME}_curves.png": lambda path: shutil.copy(run_dir / f"{RUN_NAME}_curves.png", path),
            "args.json": lambda path: atomic_write_json(path, asdict(args)),
        }

        def card(results, title=None):
            curves, note = f"{RUN_NAME}_curves.png", f"Its reward: {reward.describe()}."
            return card_writer("ppo", args, results, "PPO_training.py", TINY, curves=curves, title=title, note=note)

        value_head = {k: v.detach().cpu() for k, v in unwrap(model).value_head.state_dict().items()}
        files_final = files | {
            VALUE_HEAD_FILE: lambda path: save_file(value_head, path),
            "eval_results.json": lambda path: atomic_write_json(path, results),
            "README.md": card(
                results,
                monitor.stopped and f"PPO policy, step {last_step} (stopped by the over-optimisation alarm)" or None,
            ),
        }
        save_pretrained_atomic(Path(args.work_dir) / PPO_DIR, policy, tokenizer, extra=files_final)
        print(f"wrote {Path(args.work_dir) / PPO_DIR}")
        if args.eval_every:  # the best held-out checkpoint by --select_by: the policy alone, no value head
            save_best(monitor, Path(args.work_dir) / PPO_BEST_DIR, start, tokenizer, "PPO", files, card)
    end_run(accelerator, args, Path(args.work_dir) / PPO_DIR)
    return unwrap(model)


if __name__ == "__main__":
    run(main, Args, TINY, checkpoint=lambda args: Path(args.work_dir) / "runs" / RUN_NAME / "checkpoint.pt")
