"""Step 2 of the pipeline: supervised fine-tuning (SFT) of the base model on the chosen replies.

Every trusted RLHF pipeline starts from a model that already answers (InstructGPT's step 1, Ouyang et al. 2022;
DeepSpeed-Chat's step 1; TRL's and OpenRLHF's SFT trainers; the DPO authors fine-tune on hh-rlhf's preferred
replies first). This script trains the base causal LM on `prompt + chosen_response` of `processed_data/`'s train
split with the negative log-likelihood of the reply's tokens only, averaged over them:

    loss = -(1 / #reply tokens) * sum over reply tokens t of log p(y_t | x, y_<t)

the prompt and the padding masked out. PPO, GRPO and DPO then start from `sft_model/` and keep it as their
reference (`--init_from`, default auto: sft_model/ when the work dir has one). Validation loss and perplexity on the
validation split's chosen replies at step 0 (the base model's), every `--eval_steps` and at the end. Writes the
model and its tokenizer to `sft_model/` (with `metrics.jsonl`, the curves PNG, `args.json`, `eval_results.json`
and a model card); while training, state lives in `runs/sft/` (`--resume` continues).

    python SFT_training.py                                        # gpt2 (GPU)
    accelerate launch --num_processes 4 SFT_training.py           # data-parallel on 4 GPUs, batch x 4
    python SFT_training.py --preset tiny --work_dir runs/tiny     # offline, CPU, seconds

The gpt2 settings are TRL's `SFTConfig` defaults (trl 1.16: learning rate 2e-5, batch 8, linear decay to 0, no
warm-up, no weight decay, gradient norm clipped at 1, the NLL of the completion tokens averaged over them) with
one epoch, as the DPO authors' SFT on hh-rlhf (eric-mitchell/direct-preference-optimization, `n_epochs: 1`; TRL's
3 would read each of 160k pairs three times), and `max_seq_len` 512 with the prompt cut from the left, DPO's
sequence rule here (`common.build_sequence`; TRL cuts from the right at 1,024 and may lose the reply).

Deliberate departures from TRL: dropout is off (as in DPO here), so a resumed run is bit-identical to an
uninterrupted one and the validation loss measures the model that is saved; no gradient checkpointing (gpt2 fits);
with `--gradient_accumulation_steps` > 1 each micro-batch's loss is its own token mean, and the step averages the
micro-batches (TRL averages over every token of the accumulated batch: the same with 1, the default).
"""

import math
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import (
    EpochShuffle,
    adamw,
    check_positions,
    collate_pairs,
    disable_dropout,
    load_causal_lm,
    load_optimizer_state,
    load_processed_data,
    load_tokenizer,
    make_accelerator,
    pair_length,
    release_cpu_memory,
    resolve_model_name,
    response_logprobs,
    save_pretrained_atomic,
    set_seed,
    tokenize_pairs,
    unwrap,
)
from lifecycle import (
    FINISHING,
    SFT_DIR,
    TrainArgs,
    UserError,
    atomic_write_json,
    check,
    check_resumable,
    load_checkpoint,
    remove_leftovers,
    run,
    save_args,
    save_checkpoint,
)
from reporting import MetricsLogger, card_writer, end_run, plot_metrics, start_tracking


@dataclass
class Args(TrainArgs):
    # data
    max_train_samples: int = field(default=0, metadata={"help": "use the first N pairs of the train split (0 = all)"})
    max_eval_samples: int = field(default=0, metadata={"help": "use the first N validation pairs (0 = all)"})
    max_seq_len: int = field(
        default=512, metadata={"help": "tokens per prompt + reply; the prompt is cut from the left"}
    )
    # optimisation
    num_train_epochs: int = field(default=1, metadata={"help": "passes over the train pairs' chosen replies"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps to run; overrides num_train_epochs (0 = off)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "replies per micro-batch per process"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "replies per evaluation batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "share of the steps with a linear warm-up, then linear decay"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient to this global norm"})
    group_by_length: bool = field(
        default=True,
        metadata={"help": "batches of replies of similar lengths: the same replies per epoch, less padding"},
    )
    # output
    logging_steps: int = field(default=10, metadata={"help": "log training metrics every N optimizer steps"})
    eval_steps: int = field(default=500, metadata={"help": "validation loss every N optimizer steps (0 = end only)"})
    save_every: int = field(default=500, metadata={"help": "write runs/sft/checkpoint.pt every N steps"})


# Tiny: a high learning rate for a few steps of a 1M model, as DPO's tiny preset (3e-4); one epoch over 640 of the
# chosen replies (40 steps of 16). Its batches stay shuffled, as DPO's tiny ones (a 40-step run would see each
# length group in a handful of batches).
TINY = dict(
    group_by_length=False,
    max_train_samples=640,
    max_eval_samples=256,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    learning_rate=3e-4,
    logging_steps=4,
    eval_steps=20,
    save_every=20,
)

RUN_NAME = "sft"
PLOT_KEYS = ("sft/loss", "eval/loss", "eval/perplexity", "train/grad_norm", "train/learning_rate")


def reply_nll(model, batch):
    """Summed negative log-likelihood of each row's reply tokens (its EOS included) and their number: (B,), (B,).

    Only the columns from the first reply token on go through the LM head (`common.response_logprobs`); position
    ids come from the attention mask, so the left padding changes nothing."""
    context_length = batch["context_length"]
    logprobs, _, _ = response_logprobs(model, batch["input_ids"], batch["attention_mask"], context_length)
    mask = batch["loss_mask"][:, context_length:]  # (B, T - c): the reply and its EOS; prompt and padding are 0
    return -(logprobs * mask).sum(-1), mask.sum(-1)  # (B,), (B,)


@torch.no_grad()
def evaluate(model, loader, accelerator):
    """Validation NLL per reply token over every validation reply, and its perplexity: ({eval/...}, tokens)."""
    nll, count, tokens = 0.0, 0, 0
    for batch in loader:
        row_nll, row_count = accelerator.gather_for_metrics(reply_nll(model, batch))
        nll, count = nll + row_nll.sum(), count + row_count.sum()
        tokens += batch["attention_mask"].sum()
    loss = (nll / count).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(loss)}, int(tokens)


def main(args):
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

    # data: the chosen reply of every pair after its prompt, a seeded shuffle per epoch
    data = load_processed_data(args)
    tokenizer = load_tokenizer(args.model)
    splits = {
        name: data[name].select(range(min(limit or len(data[name]), len(data[name]))))
        for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples))
    }
    train_set, val_set = (tokenize_pairs(splits[name], tokenizer, keys=("chosen",)) for name in splits)
    collate = partial(
        collate_pairs, eos_token_id=tokenizer.eos_token_id, max_seq_len=args.max_seq_len, keys=("chosen",)
    )
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

    # the model: the base causal LM, dropout off
    model = load_causal_lm(resolve_model_name(args.model), tokenizer)
    disable_dropout(model)
    check_positions(model.config, args.max_seq_len, "--max_seq_len")

    # optimiser: AdamW, linear warm-up (none by default) then linear decay to 0
    num_processes = accelerator.num_processes
    batches_per_epoch = math.ceil(len(train_set) / (args.per_device_train_batch_size * num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.num_train_epochs * steps_per_epoch
    optimizer = adamw(model.parameters(), args.learning_rate, args.weight_decay, accelerator.device)
    # A prepared scheduler advances num_processes times per optimizer step (accelerate's convention).
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * total_steps) * num_processes, total_steps * num_processes
    )
    step, eval_metrics = 0, None
    if args.resume:
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, eval_metrics = state["step"], state["last_eval"]
        check(
            state["total_steps"] == total_steps,
            f"--resume: the checkpoint's run has {state['total_steps']} steps, this one {total_steps}: resume with the "
            "same --max_steps / --num_train_epochs",
        )
        print(f"resumed from {checkpoint_path} at step {step}{FINISHING if step == total_steps else ''}")
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    resume_step = step if args.resume else None
    start_tracking(accelerator, args, run_dir, RUN_NAME, resume_step)
    logger = MetricsLogger(run_dir / "metrics.jsonl", resume_step=resume_step, enabled=is_main, tracker=accelerator)
    if is_main:
        print(
            f"SFT: {len(train_set)} train / {len(val_set)} validation chosen replies, {total_steps} optimizer steps "
            f"of {args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes} replies "
            f"on {num_processes} process(es)"
        )

    def count_tokens(tokens):  # tokens through this process's forward passes, summed over processes
        logger.add_tokens(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item())

    def evaluate_and_count():
        model.eval()
        metrics, tokens = evaluate(model, val_loader, accelerator)
        count_tokens(tokens)
        return metrics

    if step == 0:  # the base model's validation loss: where SFT starts
        eval_metrics = evaluate_and_count()
        logger.log(0, eval_metrics)

    def save(step):
        accelerator.wait_for_everyone()
        if is_main:
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
            state |= {"scheduler": scheduler.state_dict(), "step": step, "total_steps": total_steps}
            save_checkpoint(checkpoint_path, state | {"last_eval": eval_metrics})
            if step < total_steps:  # the curves so far (the last step's are drawn with the final model)
                plot_metrics(logger.path, PLOT_KEYS, run_dir / f"{RUN_NAME}_curves.png", title="SFT")

    last_saved = step if args.resume else None
    window, tokens = [], 0  # (summed NLL, reply tokens) per micro-batch, and tokens through forwards, since the log
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not is_main)
    model.train()
    epochs = range(step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch))
    for epoch in epochs if step < total_steps else []:  # resumed at the last step: only the save is left
        train_loader.set_epoch(epoch)
        done = (step - epoch * steps_per_epoch) * args.gradient_accumulation_steps  # batches already trained on
        for i, batch in enumerate(train_loader):
            if i < done:
                continue
            # the reply tokens' mean NLL, backward, and at the end of an accumulation the optimizer step
            with accelerator.accumulate(model):
                nll, count = reply_nll(model, batch)
                accelerator.backward(nll.sum() / count.sum())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(torch.stack([nll.detach().sum(), count.sum()]))
            tokens += batch["attention_mask"].sum()  # a tensor, read at the log
            if not accelerator.sync_gradients:
                continue
            release_cpu_memory(accelerator.device)  # a CPU run's heap would grow step after step (common.py)
            # a NaN/inf on any process stops them all: one check per optimizer step, before anything is saved
            sums = accelerator.reduce(torch.stack(window[-args.gradient_accumulation_steps :]).sum(0), "sum")
            if not torch.isfinite(sums).all():
                kept = f"step {last_saved} in {checkpoint_path}" if last_saved is not None else "none was written"
                raise UserError(
                    f"the loss is {(sums[0] / sums[1]).item()} at step {step + 1}: stopped; last good checkpoint: "
                    f"{kept} (lower --learning_rate, then --resume)"
                )
            step += 1
            bar.update()
            record = {}
            if step % args.logging_steps == 0 or step == total_steps:
                nll_sum, count_sum = accelerator.reduce(torch.stack(window).sum(0), "sum").tolist()
                record |= {"sft/loss": nll_sum / count_sum, "train/grad_norm": grad_norm.item()}
                record |= {"train/learning_rate": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch}
                count_tokens(int(tokens))
                window, tokens = [], 0
                bar.set_postfix(loss=f"{record['sft/loss']:.3f}", refresh=False)
            if (args.eval_steps and step % args.eval_steps == 0) or step == total_steps:
                eval_metrics = evaluate_and_count()
                model.train()
                record |= eval_metrics
            if record:
                logger.log(step, record)
            if step % args.save_every == 0 or step == total_steps:
                save(step)
                last_saved = step
            if step == total_steps:
                break
        if step == total_steps:
            break
    bar.close()

    # the final evaluation ran at the last step above; save the model
    if is_main:
        print(f"validation: loss {eval_metrics['eval/loss']:.4f}, perplexity {eval_metrics['eval/perplexity']:.2f}")
        curves = run_dir / f"{RUN_NAME}_curves.png"
        plot_metrics(logger.path, PLOT_KEYS, curves, title="SFT")
        results = {"split": "validation", "replies": len(val_set), "step": step, **eval_metrics}
        save_pretrained_atomic(
            Path(args.work_dir) / SFT_DIR,
            unwrap(model),
            tokenizer,
            extra={
                "metrics.jsonl": lambda path: shutil.copy(logger.path, path),
                curves.name: lambda path: shutil.copy(curves, path),
                "args.json": lambda path: save_args(args, path),
                "eval_results.json": lambda path: atomic_write_json(path, results),
                "README.md": card_writer("sft", args, results, "SFT_training.py", TINY, curves=curves.name),
            },
        )
        print(f"wrote {Path(args.work_dir) / SFT_DIR}")
    end_run(accelerator, args, Path(args.work_dir) / SFT_DIR)
    return unwrap(model)


if __name__ == "__main__":
    run(main, Args, TINY, checkpoint=lambda args: Path(args.work_dir) / "runs" / RUN_NAME / "checkpoint.pt")
