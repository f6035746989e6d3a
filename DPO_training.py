"""Step 5 of the pipeline: Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference.

Reads the preference pairs of `processed_data/` (the text columns `prompt`,
`chosen_response`, `rejected_response`) and trains the base model directly on them, with
no reward model and no sampling: for every pair it compares how much more likely the
policy makes the chosen reply than the frozen reference model does, against the same
for the rejected reply (eq. 7),

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))),

each log-prob summed over the reply's tokens only (prompt and padding masked). Writes
the policy and its tokenizer to `dpo_rlhf_model/` (with `metrics.jsonl`, the curves PNG
and `args.json`); while training, state lives in `runs/dpo/` (`--resume` continues), with
`--snapshot_every N` (tiny: 10) a policy-only snapshot every N steps in `runs/dpo/snapshots/step-N/`
for evaluate_models.py's reward-KL frontier.

    python DPO_training.py                                        # gpt2, seed settings (GPU)
    accelerate launch --num_processes 4 DPO_training.py           # data-parallel on 4 GPUs, batch x 4
    python DPO_training.py --preset tiny --work_dir runs/tiny     # offline, CPU, well under a minute
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 DPO_training.py --preset tiny --work_dir runs/tiny

(On CPU, `accelerate launch --cpu --num_processes 2` starts a single process; the last
line is how to get two, talking over gloo.)

Each sequence is the tokens of `join_conversation(prompt, reply)` followed by EOS (so the
model learns to end its turn); the reply's tokens are what follows the prompt's own
tokens, which GPT-2's pre-tokenizer keeps apart (checked for every pair). A pair's chosen and
rejected rows go through each model in one forward pass, left padded, with position ids
from the attention mask. The implicit reward of a reply is beta * (log pi - log ref).

Options: `--label_smoothing e` is conservative DPO (cDPO, Mitchell 2023: the labels are
taken as flipped with probability e); `--loss_type ipo` is IPO (Azar et al. 2023, eq. 17:
(h - 1/(2 beta))^2 with h the log-ratio difference of eq. 7); `--precompute_ref_logps`
computes the reference log-probs of every pair once before training and frees the
reference model.

Deliberate departures: dropout is switched off in the policy and the reference (as TRL
does), so that at step 0 the policy equals the reference exactly (loss = log 2) and the
implicit rewards measure training, not dropout noise. IPO uses summed log-probs, as in
the paper (TRL averages them per token). A reply longer than `max_seq_len` alone is cut
from the right (and then has no EOS); the prompt is cut from the left to make room.
`dpo/kl` is a diagnostic, not a KL estimate proper: the mean over pairs of the summed
log pi - log ref on the *chosen* replies, which are data, not samples of the policy.
There is no evaluation at step 0: the policy is the reference there, so the loss is
log 2 and every implicit reward is 0 (a tie, counted as a wrong answer by the accuracy).
"""

import math
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import (
    EpochShuffle,
    adamw,
    check_positions,
    collate_pairs,
    disable_dropout,
    freeze,
    load_causal_lm,
    load_optimizer_state,
    load_processed_data,
    load_reward_model,
    load_tokenizer,
    make_accelerator,
    pair_length,
    release_cpu_memory,
    response_logprobs,
    save_pretrained_atomic,
    set_seed,
    start_model,
    tokenize_pairs,
    unwrap,
)
from lifecycle import (
    DPO_BEST_DIR,
    DPO_DIR,
    FINISHING,
    REWARD_MODEL_DIR,
    LiveEvalArgs,
    PolicyArgs,
    UserError,
    atomic_write_json,
    check,
    check_resumable,
    load_checkpoint,
    remove_leftovers,
    run,
    save_args,
    save_checkpoint,
    save_snapshot,
    snapshot_due,
    sync_snapshots,
)
from live_eval import LiveEval, Monitor, check_live_eval_args, save_best
from reporting import MetricsLogger, card_writer, end_run, plot_metrics, start_tracking


@dataclass
class Args(PolicyArgs, LiveEvalArgs):
    # data
    max_train_samples: int = field(default=0, metadata={"help": "use the first N pairs of the train split (0 = all)"})
    max_eval_samples: int = field(default=0, metadata={"help": "use the first N validation pairs (0 = all)"})
    max_seq_len: int = field(
        default=512, metadata={"help": "tokens per prompt + reply; the prompt is cut from the left"}
    )
    # optimisation
    num_train_epochs: int = field(default=1, metadata={"help": "passes over the train pairs"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps to run; overrides num_train_epochs (0 = off)"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "pairs per micro-batch per process"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "pairs per evaluation batch per process"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "share of the steps with a linear warm-up, then linear decay"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient to this global norm"})
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batches of pairs of similar lengths (as Trainer's group_by_length; the seed: off): the same "
            "pairs per epoch, less padding"
        },
    )
    # algorithm
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: strength of the implicit KL to the reference"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "conservative DPO: probability that a label is flipped (sigmoid loss only)"}
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid: DPO (eq. 7); ipo: IPO's squared loss", "choices": ["sigmoid", "ipo"]},
    )
    precompute_ref_logps: bool = field(
        default=False, metadata={"help": "compute the reference log-probs of all pairs once, then free the reference"}
    )
    # output
    logging_steps: int = field(default=10, metadata={"help": "log training metrics every N optimizer steps"})
    eval_steps: int = field(
        default=100, metadata={"help": "evaluate on validation every N optimizer steps (0 = end only)"}
    )


# Tiny: a high learning rate for a few steps of a 1M model. With an earlier tiny model, 5e-4 drifted to word
# salad (KL 45 nats per reply, length x1.5). With today's (sharper, trained on fluent replies only) 2e-4 left
# the validation loss at 0.47, as the minimal salad pairs are hard; 3e-4 reaches 0.375 at KL 2.2, and the
# oracle's share of real answers goes from base's 0.58 to 0.79 (4e-4: 0.77 at KL 3.5). Its batches stay
# shuffled, not grouped by length: grouping would cut the padded share from 33% to 8% (benchmarks/padding.py on
# the tiny data, batches of 8), but the preset was tuned shuffled, and grouped (seed 42) its oracle share fell
# from 0.71 to 0.65, below base's interval; a 40-step run sees each length group in a handful of batches.
TINY = dict(
    group_by_length=False,
    max_train_samples=320,
    max_eval_samples=256,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=32,
    gradient_accumulation_steps=1,
    learning_rate=3e-4,
    logging_steps=4,
    eval_steps=20,
    save_every=20,
    snapshot_every=10,
    eval_every=10,
    eval_prompts=64,
    reward_max_length=256,
)

RUN_NAME = "dpo"
PLOT_KEYS = (
    "dpo/loss",
    "eval/loss",
    "dpo/rewards/accuracies",
    "eval/rewards/accuracies",
    "dpo/rewards/margins",
    "dpo/rewards/chosen",
    "dpo/rewards/rejected",
    "dpo/kl",
    "train/learning_rate",
    "eval/proxy",
    "eval/gold",
    "eval/oracle",
    "eval/sample_kl",
)


# ---------------------------------------------------------------------------
# Log-probs and the loss
# ---------------------------------------------------------------------------


def sequence_logps(model, input_ids, attention_mask, loss_mask, context_length=None):
    """log p(tokens where loss_mask is 1 | the tokens before them), summed per row: (N, T) -> (N,).

    Only the columns from the first scored token on go through the log-softmax; position
    ids come from the attention mask (`common.forward`), so any padding side gives the same sums.
    """
    if context_length is None:  # the first column holding a reply token (>= 1)
        context_length = int(loss_mask.any(0).long().argmax())
    logprobs, _, _ = response_logprobs(model, input_ids, attention_mask, context_length)  # (N, T - c)
    return (logprobs * loss_mask[:, context_length:]).sum(-1)  # (N,)


def batch_logps(model, batch):
    """Summed reply log-probs of the chosen and the rejected rows, in one forward pass: (B,), (B,)."""
    logps = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch.get("context_length")
    )  # (2B,)
    return logps.chunk(2)


@torch.no_grad()
def reference_logps(ref_model, ref_table, batch):
    """The frozen reference's (chosen, rejected) log-probs: looked up when precomputed, else one forward pass."""
    if ref_table is not None:
        return ref_table[batch["idx"]].unbind(-1)  # (B,), (B,)
    return batch_logps(ref_model, batch)


@torch.no_grad()
def precompute_ref_logps(ref_model, loader, n, accelerator):
    """Reference log-probs of every pair, computed once: ((n, 2) as [chosen, rejected], tokens through the forwards)."""
    table, tokens = torch.zeros(n, 2, device=accelerator.device), 0
    for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_main_process):
        chosen, rejected = reference_logps(ref_model, None, batch)
        idx, chosen, rejected = accelerator.gather_for_metrics((batch["idx"], chosen, rejected))
        table[idx] = torch.stack([chosen, rejected], -1).float()
        tokens += batch["attention_mask"].sum()
    return table, int(tokens)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing, loss_type):
    """Per-pair loss and implicit rewards, all (B,) from (B,) summed log-probs.

    sigmoid: Rafailov et al. 2023, eq. 7, with cDPO's label smoothing e:
        -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo: Azar et al. 2023, eq. 17: (h - 1 / (2 beta))^2
    where h = pi_logratios - ref_logratios. The implicit reward (eq. 5, up to the
    prompt's partition function) is beta * (log pi - log ref).
    """
    pi_logratios = chosen_logps - rejected_logps  # (B,)
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # (B,)
    logits = pi_logratios - ref_logratios  # (B,) h
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


def pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, ref_chosen_logps):
    """What is logged, per pair (B,) each, so that it can be gathered across processes and averaged."""
    return {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),  # a tie (step 0) counts as wrong
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
        "kl": (chosen_logps - ref_chosen_logps).detach(),  # summed log pi - log ref on the chosen reply
    }


def mean_stats(stats, accelerator, prefix):
    """Average per-pair stats over every process: {prefix/key: float}."""
    stats = accelerator.gather({k: torch.cat([s[k] for s in stats]).float() for k in stats[0]})
    means = torch.stack([v.mean() for v in stats.values()]).tolist()  # one GPU-to-CPU transfer
    return {f"{prefix}/{k}": v for k, v in zip(stats, means)}


@torch.no_grad()
def evaluate(policy, ref_model, ref_table, loader, args, accelerator):
    """DPO loss, implicit rewards and accuracy on the validation pairs: ({eval/key: float}, tokens through forwards)."""
    stats, tokens = [], 0
    # under the training bar: into a log file a second bar moves the cursor with escape codes, so terminals only
    bars = accelerator.is_main_process and sys.stderr.isatty()
    for batch in tqdm(loader, desc="eval", leave=False, disable=not bars):
        chosen_logps, rejected_logps = batch_logps(policy, batch)
        ref_chosen_logps, ref_rejected_logps = reference_logps(ref_model, ref_table, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            args.beta,
            args.label_smoothing,
            args.loss_type,
        )
        # gather_for_metrics drops the pairs that accelerate repeated to even out the last batch
        stats.append(
            accelerator.gather_for_metrics(
                pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, ref_chosen_logps)
            )
        )
        tokens += batch["attention_mask"].sum() * (1 if ref_table is not None else 2)
    means = torch.stack([torch.cat([s[k] for s in stats]).float().mean() for k in stats[0]]).tolist()
    return {f"eval/{k}": v for k, v in zip(stats[0], means)}, int(tokens)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def dpo_step(policy, ref_model, ref_table, batch, optimizer, scheduler, args, accelerator):
    """One micro-batch of DPO: log-probs, loss, backward; the optimizer steps at the end of an accumulation.

    Returns the batch's per-pair statistics and the gradient norm before clipping (None on a micro-batch
    that does not step). Nothing here waits for the GPU: the caller checks the losses once per optimizer step.
    """
    grad_norm = None
    with accelerator.accumulate(policy):
        # 1. summed reply log-probs: chosen and rejected in one forward pass per model
        chosen_logps, rejected_logps = batch_logps(policy, batch)  # (B,), (B,)
        ref_chosen_logps, ref_rejected_logps = reference_logps(ref_model, ref_table, batch)
        # 2. the DPO loss (eq. 7) and the implicit rewards
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta, args.label_smoothing,
            args.loss_type,
        )  # fmt: skip
        loss = losses.mean()
        # 3. backward; accelerate averages over the accumulated micro-batches and only steps at their end
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    stats = pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, ref_chosen_logps)
    return stats, grad_norm


def main(args):
    check(args.beta > 0, f"--beta must be positive, got {args.beta}")
    check(0 <= args.label_smoothing < 0.5, f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    check(args.label_smoothing == 0 or args.loss_type == "sigmoid", "--label_smoothing applies to --loss_type sigmoid")
    check(args.max_seq_len >= 2, f"--max_seq_len must hold a prompt token and a reply token, got {args.max_seq_len}")
    check(
        min(args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) > 0,
        "--per_device_train_batch_size, --per_device_eval_batch_size and --gradient_accumulation_steps must be positive",
    )
    check(args.learning_rate > 0 and 0 <= args.warmup_ratio < 1, "--learning_rate > 0 and --warmup_ratio in [0, 1)")
    check(args.num_train_epochs > 0 or args.max_steps > 0, "--num_train_epochs or --max_steps must be positive")
    check(min(args.logging_steps, args.save_every) > 0, "--logging_steps and --save_every must be positive")
    check(
        min(args.max_train_samples, args.max_eval_samples, args.eval_steps, args.max_steps) >= 0, "counts must be >= 0"
    )
    check_live_eval_args(args)
    run_dir = Path(args.work_dir) / "runs" / RUN_NAME
    accelerator = make_accelerator(args, run_dir)
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    is_main = accelerator.is_main_process
    checkpoint_path = run_dir / "checkpoint.pt"
    if args.resume:
        check_resumable(checkpoint_path)
    if is_main:
        remove_leftovers(run_dir, args.work_dir)
    set_seed(args.seed)

    # data: token ids of every pair, a seeded shuffle per epoch
    data = load_processed_data(args)
    tokenizer = load_tokenizer(args.model)
    splits = {
        name: data[name].select(range(min(limit or len(data[name]), len(data[name]))))
        for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples))
    }
    train_set, val_set = (tokenize_pairs(splits[name], tokenizer) for name in ("train", "validation"))
    collate = partial(collate_pairs, eos_token_id=tokenizer.eos_token_id, max_seq_len=args.max_seq_len)
    train_loader = DataLoader(
        train_set,
        batch_size=args.per_device_train_batch_size,
        sampler=EpochShuffle(
            len(train_set),
            args.seed,
            lengths=[pair_length(pair, args.max_seq_len) for pair in train_set] if args.group_by_length else None,
            batch_size=args.per_device_train_batch_size * accelerator.num_processes,
        ),
        collate_fn=collate,
    )
    val_loader = DataLoader(val_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate)

    # models: the policy and its frozen reference, both the start model (sft_model/ or the base model: --init_from)
    start = start_model(args, run_dir, is_main)
    policy = load_causal_lm(start, tokenizer)
    ref_model = freeze(load_causal_lm(start, tokenizer).to(accelerator.device))
    disable_dropout(policy)
    disable_dropout(ref_model)
    check_positions(policy.config, args.max_seq_len, "--max_seq_len")
    # held-out scores while training (live_eval.py): they need the proxy reward model, which DPO itself does not
    live = None
    if args.eval_every and (Path(args.work_dir) / REWARD_MODEL_DIR / "config.json").is_file():
        proxy = load_reward_model(args.work_dir, accelerator.device, args)
        rank, world = accelerator.process_index, accelerator.num_processes
        live = LiveEval(args, data, tokenizer, ref_model, proxy, accelerator.device, rank=rank, world=world)
    elif args.eval_every:
        check(
            args.select_by == "proxy" and not args.stop_on_overoptimization,
            f"--select_by {args.select_by} and --stop_on_overoptimization need held-out scores, and those the proxy "
            f"reward model: {Path(args.work_dir) / REWARD_MODEL_DIR} not found",
        )
        if is_main:
            print(
                f"no held-out scores while training (--eval_every): {Path(args.work_dir) / REWARD_MODEL_DIR} not found"
            )

    # optimiser: AdamW, linear warm-up then linear decay to 0
    num_processes = accelerator.num_processes
    batches_per_epoch = math.ceil(len(train_set) / (args.per_device_train_batch_size * num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.num_train_epochs * steps_per_epoch
    optimizer = adamw(policy.parameters(), args.learning_rate, args.weight_decay, accelerator.device)
    # A prepared scheduler advances num_processes times per optimizer step (accelerate's convention).
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * total_steps) * num_processes, total_steps * num_processes
    )
    step, eval_metrics, state = 0, None, {}
    if args.resume:
        state = load_checkpoint(checkpoint_path)
        policy.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, eval_metrics = state["step"], state.get("last_eval")
        check(step <= total_steps, f"--resume: the checkpoint is at step {step} of {total_steps}; raise --max_steps")
        # The checkpoint's optimizer holds the rate its own schedule gave the next step (0 after its last): a run
        # resumed for another number of steps follows this run's schedule from here instead.
        rates = [base * decay(scheduler.last_epoch) for base, decay in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        if state.get("total_steps", total_steps) != total_steps:
            print(
                f"--resume: the checkpoint's run had {state['total_steps']} steps, this one {total_steps}: the "
                f"learning rate follows the schedule of {total_steps} steps from step {step} on ({rates[0]:.3g})"
            )
    monitor = Monitor(live, args, state.get("monitor")) if live else None
    last_step = (monitor and monitor.stopped) or total_steps  # --max_steps, or where the alarm stopped the run
    if args.resume:
        print(f"resumed from {checkpoint_path} at step {step}{FINISHING if step == last_step else ''}")
        if monitor and monitor.stopped:
            print(monitor.finished_line())
    policy, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        policy, optimizer, train_loader, val_loader, scheduler
    )
    resume_step = step if args.resume else None
    start_tracking(accelerator, args, run_dir, RUN_NAME, resume_step)
    logger = MetricsLogger(run_dir / "metrics.jsonl", resume_step=resume_step, enabled=is_main, tracker=accelerator)
    if is_main:
        print(
            f"DPO: {len(train_set)} train / {len(val_set)} validation pairs, {total_steps} optimizer steps of "
            f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes} pairs "
            f"on {num_processes} process(es)"
        )

    def count_tokens(tokens):  # tokens through this process's forward passes, summed over processes
        logger.add_tokens(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item())

    ref_tables = {"train": None, "validation": None}
    if args.precompute_ref_logps and step < total_steps:
        in_order = accelerator.prepare(
            DataLoader(train_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
        )
        for name, loader, n in (("train", in_order, len(train_set)), ("validation", val_loader, len(val_set))):
            ref_tables[name], tokens = precompute_ref_logps(ref_model, loader, n, accelerator)
            count_tokens(tokens)
        ref_model = None  # every reference log-prob is in the tables now

    def evaluate_and_count():
        metrics, tokens = evaluate(policy, ref_model, ref_tables["validation"], val_loader, args, accelerator)
        count_tokens(tokens)
        return metrics

    def save(step):
        accelerator.wait_for_everyone()
        if is_main:
            state = {"model": unwrap(policy).state_dict(), "optimizer": optimizer.state_dict()}
            state |= {
                "scheduler": scheduler.state_dict(),
                "step": step,
                "total_steps": total_steps,
                "last_eval": eval_metrics,
                "monitor": monitor.state() if monitor else None,
            }
            save_checkpoint(checkpoint_path, state)
            if step < total_steps:  # the curves so far (the last step's are drawn with the final policy)
                plot_metrics(logger.path, PLOT_KEYS, run_dir / f"{RUN_NAME}_curves.png", title="DPO")

    def evaluate_held_out(step):
        """The held-out evaluation at `step` (live_eval.py), identical on every process; its tokens counted."""
        metrics = monitor(step, policy, say=tqdm.write if is_main else lambda line: None)
        count_tokens(monitor.tokens if is_main else 0)
        return metrics

    if monitor and not monitor.history:  # the start model is the first candidate: dpo_best/ is never worse
        logger.log(0, evaluate_held_out(0))
    last_saved = step if args.resume else None
    if is_main:
        sync_snapshots(run_dir, step, total_steps, args.snapshot_every, unwrap(policy))
    window, tokens = [], 0  # per-pair stats and tokens since the last log
    bar = tqdm(total=total_steps, initial=step, desc="dpo", disable=not is_main)
    policy.train()
    epochs = range(step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch))
    if step == last_step:  # resumed at the last step: only the save is left
        epochs = []
    for epoch in epochs:
        train_loader.set_epoch(epoch)
        done = (step - epoch * steps_per_epoch) * args.gradient_accumulation_steps  # batches already trained on
        for i, batch in enumerate(train_loader):
            if i < done:
                continue
            # 1-3. log-probs, the DPO loss, backward (and, at the end of an accumulation, the optimizer step)
            kept = f"step {last_saved} in {checkpoint_path}" if last_saved is not None else "none was written"
            hint = f"at step {step + 1}: stopped; last good checkpoint: {kept} (lower --learning_rate, then --resume)"
            stats, grad_norm = dpo_step(
                policy, ref_model, ref_tables["train"], batch, optimizer, scheduler, args, accelerator
            )  # fmt: skip
            window.append(stats)
            tokens += batch["attention_mask"].sum() * (1 if ref_model is None else 2)  # a tensor, read at the log
            if not accelerator.sync_gradients:
                continue
            release_cpu_memory(accelerator.device)  # a CPU run's heap would grow step after step (common.py)
            # a NaN/inf on any process stops them all: one check per optimizer step (the GPU is waited for here
            # only), before anything of this step is logged, evaluated or saved
            losses = accelerator.gather(torch.cat([s["loss"] for s in window[-args.gradient_accumulation_steps :]]))
            if not torch.isfinite(losses).all():
                raise UserError(f"the loss is {losses.mean().item()} {hint}")
            step += 1
            bar.update()
            record = {}
            if step % args.logging_steps == 0 or step == total_steps:
                record |= mean_stats(window, accelerator, "dpo")
                record |= {"train/learning_rate": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item()}
                record["train/epoch"] = step / steps_per_epoch
                count_tokens(int(tokens))
                window, tokens = [], 0
                bar.set_postfix(
                    loss=f"{record['dpo/loss']:.3f}", acc=f"{record['dpo/rewards/accuracies']:.2f}", refresh=False
                )
            if monitor and (step % args.eval_every == 0 or step == total_steps):
                record |= evaluate_held_out(step)
            if (args.eval_steps and step % args.eval_steps == 0) or step == total_steps or (monitor and monitor.stop):
                eval_metrics = evaluate_and_count()  # the validation pairs' loss: at the end, wherever that is
                record |= eval_metrics
            if record:
                logger.log(step, record)
            if is_main and snapshot_due(step, total_steps, args.snapshot_every):
                save_snapshot(run_dir, step, unwrap(policy))
            if step % args.save_every == 0 or step == total_steps or (monitor and monitor.stop):
                save(step)
                last_saved = step
            if step == total_steps or (monitor and monitor.stop):
                break
        if step == total_steps or (monitor and monitor.stop):
            break
    bar.close()
    if eval_metrics is None:  # resumed at the end from a checkpoint written before they were kept in it
        eval_metrics = evaluate_and_count()

    # the final evaluation ran at the last step above; save the policy
    if is_main:
        print(
            f"validation: loss {eval_metrics['eval/loss']:.4f}, "
            f"implicit-reward accuracy {eval_metrics['eval/rewards/accuracies']:.3f}, "
            f"margin {eval_metrics['eval/rewards/margins']:.3f}, kl {eval_metrics['eval/kl']:.2f}"
        )
        plot_metrics(logger.path, PLOT_KEYS, run_dir / f"{RUN_NAME}_curves.png", title="DPO")
        results = {"split": "validation", "pairs": len(val_set), "step": step, **eval_metrics}
        files = {  # what the final folder and dpo_best/ both hold
            "metrics.jsonl": lambda path: shutil.copy(logger.path, path),
            f"{RUN_NAME}_curves.png": lambda path: shutil.copy(run_dir / f"{RUN_NAME}_curves.png", path),
            "args.json": lambda path: save_args(args, path),
        }

        def card(results, title=None):
            return card_writer(
                "dpo", args, results, "DPO_training.py", TINY, curves=f"{RUN_NAME}_curves.png", title=title
            )

        stopped = monitor and monitor.stopped and f"DPO policy, step {step} (stopped by the over-optimisation alarm)"
        extra = files | {
            "eval_results.json": lambda path: atomic_write_json(path, results),
            "README.md": card(results, stopped or None),
        }
        save_pretrained_atomic(Path(args.work_dir) / DPO_DIR, policy, tokenizer, extra=extra)
        print(f"wrote {Path(args.work_dir) / DPO_DIR}")
        if monitor:  # the best held-out checkpoint by --select_by
            save_best(monitor, Path(args.work_dir) / DPO_BEST_DIR, start, tokenizer, "DPO", files, card)
    end_run(accelerator, args, Path(args.work_dir) / DPO_DIR)
    return unwrap(policy)


if __name__ == "__main__":
    run(main, Args, TINY, checkpoint=lambda args: Path(args.work_dir) / "runs" / RUN_NAME / "checkpoint.pt")
