"""Step 2 of the pipeline: a pairwise reward model trained on `processed_data/`.

GPT-2 with a scalar head (`AutoModelForSequenceClassification`, `num_labels=1`) learns
a reward r(x, y) from preference pairs with the Bradley-Terry loss of Stiennon et al.
(2020), eq. 1, and Ouyang et al. (2022), eq. 1:

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected)),   averaged over the batch

Hugging Face `Trainer` runs the loop (checkpoints, resume, data-parallel) through a small
`RewardTrainer` that only changes the loss and the evaluation step. Validation loss,
accuracy (share of pairs with r_chosen > r_rejected) and mean margin are logged every
`--eval_steps`; at the end the same three are computed on the test split and written to
`final_reward_model/eval_results.json`, beside the model and tokenizer (safetensors),
`metrics.jsonl`, `reward_model_curves.png` and `args.json`. While training, checkpoints
and the live metrics sit in `runs/reward_model/`.

`--train_split gold_train` trains the *gold* reward model instead, on the pairs
`data_process.py --gold_share` set aside, into `final_gold_reward_model/` (and
`runs/gold_reward_model/`): the same recipe on pairs the proxy reward model and the
policies never read, so the evaluation can score the policies with a judge they were not
optimised against. `--model` may then name a larger GPT-2 with the same tokenizer
(`gpt2-medium`): a stronger gold than the proxy, as Gao et al. (2022) use.

    python reward_model_training.py                                        # gpt2, the seed's sizes (GPU)
    python reward_model_training.py --preset tiny --work_dir runs/tiny     # offline, CPU, about a minute
    python reward_model_training.py --preset tiny --work_dir runs/tiny --resume   # after Ctrl-C
    python reward_model_training.py --preset tiny --work_dir runs/tiny --train_split gold_train   # the gold one
    accelerate launch --num_processes 2 reward_model_training.py                # data-parallel on 2 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 reward_model_training.py --preset tiny ...

Deliberate departures from the seed (and from TRL's RewardTrainer):
* the reward is read at each sequence's last real token, found from the attention mask
  (`common.reward_scores`), not by Hugging Face's "last token that is not the pad id":
  GPT-2's pad id is its EOS id, so that rule misreads a text ending in EOS and a
  right-padded row. PPO, GRPO and evaluation score through the same function;
* chosen and rejected go through the model in one forward pass per batch (stacked
  along the batch, padded to one length), not two;
* no auxiliary loss (e.g. the reward-centering term some reward trainers add).
"""

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from tqdm import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState, ProgressCallback
from transformers.utils import logging as hf_logging

from common import (
    check_positions,
    fp32_head,
    fused_activation,
    load_processed_data,
    load_tokenizer,
    precision,
    release_cpu_memory,
    reward_scores,
    save_pretrained_atomic,
    set_seed,
    trainer_precision,
)
from lifecycle import (
    FINISHING,
    GOLD_REWARD_MODEL_DIR,
    GOLD_SPLIT,
    OFFLINE_HINT,
    PROCESSED_DIR,
    REWARD_MODEL_DIR,
    TrainArgs,
    UserError,
    atomic_write_json,
    check,
    command,
    damage,
    first_line,
    offline,
    remove_leftovers,
    resolve_model_name,
    run,
    save_args,
)
from reporting import (
    TRACKER_PROJECT,
    MetricsLogger,
    card_writer,
    plot_metrics,
    push_folder,
    tracker_errors,
    tracker_failure,
    trainer_tracking,
)


@dataclass
class Args(TrainArgs):
    # optimisation
    num_train_epochs: float = field(default=3.0, metadata={"help": "passes over the train split"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps to train for; > 0 overrides the epochs"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate of AdamW"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "preference pairs per device per step"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "preference pairs per device when evaluating"})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "batches accumulated per optimizer step"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the steps with a linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batches of pairs of similar lengths (Trainer's group_by_length; the seed: off): the same pairs "
            "per epoch, fewer padded tokens (tiny: 39% of the tokens were padding, 8% so)"
        },
    )
    # output
    logging_steps: int = field(default=10, metadata={"help": "log the training metrics every N optimizer steps"})
    eval_steps: int = field(default=500, metadata={"help": "evaluate on the validation split every N steps"})
    max_eval_samples: int = field(
        default=0, metadata={"help": "evaluate on the first N validation and test pairs (0 = all)"}
    )
    save_steps: int = field(default=500, metadata={"help": "write a checkpoint to runs/reward_model/ every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept in runs/reward_model/"})
    # data
    train_split: str = field(
        default="train",
        metadata={
            "help": "train the proxy reward model (train: final_reward_model/, runs/reward_model/) or the held-out "
            "gold one (gold_train, from data_process.py --gold_share: final_gold_reward_model/, "
            "runs/gold_reward_model/; --model may then be a larger GPT-2 with the same tokenizer)",
            "choices": ["train", GOLD_SPLIT],
        },
    )


TINY = dict(
    num_train_epochs=0.8,
    learning_rate=2e-3,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    gradient_accumulation_steps=1,
    logging_steps=4,
    eval_steps=29,  # an evaluation draws from the RNG (its data loader's seed): moving it changes the training
    save_steps=28,
)

RUN_NAME = "reward_model"


def outputs(args):
    """(run folder, final folder, run name): the proxy reward model's, or the gold one's (--train_split gold_train)."""
    gold = args.train_split == GOLD_SPLIT
    name = f"gold_{RUN_NAME}" if gold else RUN_NAME
    work_dir = Path(args.work_dir)
    return work_dir / "runs" / name, work_dir / (GOLD_REWARD_MODEL_DIR if gold else REWARD_MODEL_DIR), name


GOLD_NOTE = (
    "This is the *gold* reward model: trained on the gold_train pairs, held out from the proxy reward model's, it "
    "only judges the policies (evaluate_models.py), so a policy that games the proxy does not game it for free."
)

TOKEN_COLUMNS = ["input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected"]
CURVES = ["train/loss", "eval/loss", "train/accuracy", "eval/accuracy", "train/margin", "eval/margin"]


@dataclass
class RewardDataCollatorWithPadding:
    """Pads the chosen and rejected sequences of a batch together, to one length.

    One length for both halves lets `RewardTrainer` stack them into a single forward
    pass. Padding follows the tokenizer (left, the project's default); the reward is
    read from the attention mask, so the side does not matter.
    """

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, features):
        n = len(features)
        padded = self.tokenizer.pad(
            {
                "input_ids": [f["input_ids_chosen"] for f in features] + [f["input_ids_rejected"] for f in features],
                "attention_mask": [f["attention_mask_chosen"] for f in features]
                + [f["attention_mask_rejected"] for f in features],
            },
            return_tensors="pt",
        )
        return {
            "input_ids_chosen": padded["input_ids"][:n],  # (B, T)
            "attention_mask_chosen": padded["attention_mask"][:n],  # (B, T)
            "input_ids_rejected": padded["input_ids"][n:],  # (B, T)
            "attention_mask_rejected": padded["attention_mask"][n:],  # (B, T)
        }


class RewardTrainer(Trainer):
    """`Trainer` with the pairwise loss; counts tokens and training accuracy for the metrics log."""

    def __init__(self, *args, metrics_logger, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics_logger = metrics_logger
        # summed since the last log, per process: [tokens, correct pairs, margin, pairs]
        self.since_log = torch.zeros(4, device=self.args.device, dtype=torch.float64)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # 1. one forward pass over chosen and rejected, stacked along the batch
        input_ids = torch.cat([inputs["input_ids_chosen"], inputs["input_ids_rejected"]])  # (2B, T)
        attention_mask = torch.cat([inputs["attention_mask_chosen"], inputs["attention_mask_rejected"]])  # (2B, T)
        scores = reward_scores(model, input_ids, attention_mask)  # (2B,) at each row's last real token
        rewards_chosen, rewards_rejected = scores.chunk(2)  # (B,), (B,)
        # 2. Bradley-Terry loss, Stiennon et al. (2020) eq. 1: -log sigmoid(r_c - r_r)
        margins = rewards_chosen - rewards_rejected  # (B,)
        loss = -F.logsigmoid(margins).mean()

        self.since_log[0] += attention_mask.sum()  # real tokens only; evaluation passes count too
        if model.training:
            self.since_log[1] += (margins > 0).sum()
            self.since_log[2] += margins.detach().sum()
            self.since_log[3] += len(margins)
        if return_outputs:
            return loss, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = torch.stack([outputs["rewards_chosen"], outputs["rewards_rejected"]], dim=1)  # (B, 2)
        # Trainer only calls compute_metrics when there are labels; the "label" is always "chosen wins".
        labels = torch.zeros(len(logits), device=logits.device)  # (B,)
        return loss.detach(), logits, labels

    def log(self, logs, *args, **kwargs):
        # Every process calls log() at the same points, so the sums can be reduced here.
        tokens, correct, margin, pairs = self.accelerator.reduce(self.since_log, reduction="sum").tolist()
        self.metrics_logger.add_tokens(tokens)
        self.since_log[0] = 0
        if "loss" in logs and pairs > 0:  # a training log: accuracy and margin over every pair since the last one
            logs = {**logs, "accuracy": correct / pairs, "margin": margin / pairs}
            self.since_log.zero_()  # (an evaluation's log in between leaves them be)
        super().log(logs, *args, **kwargs)


class ProgressWithoutLogs(ProgressCallback):
    """Trainer's progress bars, without its logs printed as dicts of strings: they go to metrics.jsonl, and
    each evaluation is one line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = namespaced(logs or {})
        if state.is_world_process_zero and "eval/accuracy" in metrics:
            line = f"step {state.global_step}: validation accuracy {metrics['eval/accuracy']:.4f}, "
            tqdm.write(line + f"loss {metrics['eval/loss']:.4f}, margin {metrics['eval/margin']:.3f}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        # under the training bar: into a log file a second bar moves the cursor with escape codes, so terminals only
        if self.training_bar is None or sys.stderr.isatty():
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


def compute_metrics(eval_pred):
    rewards_chosen, rewards_rejected = eval_pred.predictions.T  # (N,), (N,)
    return {
        "accuracy": float((rewards_chosen > rewards_rejected).mean()),
        "margin": float((rewards_chosen - rewards_rejected).mean()),
    }


def namespaced(logs):
    """Trainer's log keys -> ours (`loss` -> `train/loss`, `eval_accuracy` -> `eval/accuracy`); timings dropped."""
    metrics = {}
    for key, value in logs.items():
        prefix, _, name = key.partition("_")
        if prefix in ("eval", "test") and name in ("loss", "accuracy", "margin"):
            metrics[f"{prefix}/{name}"] = value
        elif key in ("loss", "accuracy", "margin", "learning_rate", "grad_norm", "epoch"):
            metrics[f"train/{key}"] = value
    return metrics if set(metrics) != {"train/epoch"} else {}  # Trainer's closing summary has nothing of ours


class MetricsCallback(TrainerCallback, ExportableState):
    """Writes Trainer's logs to `metrics.jsonl` (namespaced, with the cost so far) and redraws the curves at saves.

    Each checkpoint's `trainer_state.json` records how many records the log held when it was written
    (`state()`), so a resume keeps exactly those: the final checkpoint is followed by the test record.
    """

    def __init__(self, metrics_logger, png_path):
        self.metrics_logger, self.png_path = metrics_logger, png_path

    def state(self):
        return {"args": {}, "attributes": {"metrics_records": self.metrics_logger.records}}

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = namespaced(logs or {})
        if metrics:
            self.metrics_logger.log(state.global_step, metrics)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(self.metrics_logger.path, CURVES, self.png_path, title="reward model")


class ReleaseCPUMemory(TrainerCallback):
    """`common.release_cpu_memory` after every optimizer step: on a CPU the heap would grow step after step."""

    def on_step_end(self, args, state, control, **kwargs):
        release_cpu_memory(args.device)


def checkpoints(run_dir):
    """Trainer's complete checkpoints (trainer_state.json is written last), newest first, each with what is
    damaged in it (None when every file reads)."""
    done = [p for p in Path(run_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    found = []
    for folder in sorted(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        files = sorted(f for f in folder.iterdir() if f.suffix in (".json", ".safetensors", ".pt", ".pth"))
        problems = [f"{f} is {why}" for f in files if (why := damage(f))]
        if not problems and "global_step" not in json.loads((folder / "trainer_state.json").read_text()):
            problems = [f"{folder / 'trainer_state.json'} has no global_step"]
        found.append((folder, problems[0] if problems else None))
    return found


def last_checkpoint(run_dir):
    """The newest intact checkpoint, or None."""
    return next((folder for folder, problem in checkpoints(run_dir) if problem is None), None)


def checkpoint_to_resume(run_dir):
    """The newest intact checkpoint; newer damaged ones are named and removed (the older one takes over)."""
    found = checkpoints(run_dir)
    check(found, f"--resume: no checkpoint in {run_dir}; start without --resume")
    intact = next((folder for folder, problem in found if problem is None), None)
    for folder, problem in found:
        if folder == intact:
            break
        check(intact is not None, f"--resume: {problem}, and no older checkpoint is intact: start without --resume")
        print(f"{problem}: resuming from the older {intact.name} instead (removed {folder.name})")
        shutil.rmtree(folder)
    return intact


def main(args):
    check(args.num_train_epochs > 0 or args.max_steps > 0, "--num_train_epochs or --max_steps must be positive")
    check(args.learning_rate > 0, f"--learning_rate must be positive, got {args.learning_rate}")
    check(
        min(args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) > 0,
        "--per_device_train_batch_size, --per_device_eval_batch_size and --gradient_accumulation_steps must be > 0",
    )
    check(0 <= args.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    check(
        min(args.logging_steps, args.eval_steps, args.save_steps, args.save_total_limit) > 0,
        "--logging_steps, --eval_steps, --save_steps and --save_total_limit must be > 0",
    )
    check(args.max_eval_samples >= 0, f"--max_eval_samples must be >= 0, got {args.max_eval_samples}")
    check(
        args.save_steps % args.logging_steps == 0,
        f"--save_steps ({args.save_steps}) must be a multiple of --logging_steps ({args.logging_steps}): "
        "a checkpoint then follows a log, and a resumed run logs what the uninterrupted one would",
    )
    run_dir, out_dir, run_name = outputs(args)
    processes = PartialState()  # what Trainer will run on; only the main process removes and prints
    checkpoint, finished, resume_step, records = None, False, None, {}
    if args.resume:
        if processes.is_main_process:
            checkpoint_to_resume(run_dir)  # says which damaged ones it removed
        processes.wait_for_everyone()
        checkpoint = last_checkpoint(run_dir)
        trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
        resume_step = trainer_state["global_step"]
        last_step = args.max_steps if args.max_steps > 0 else trainer_state["max_steps"]
        check(resume_step <= last_step, f"--resume: {checkpoint} is at step {resume_step} > --max_steps {last_step}")
        finished = resume_step == last_step
        records = trainer_state.get("stateful_callbacks", {}).get("MetricsCallback", {}).get("attributes", {})
        if processes.is_main_process:
            print(f"resuming from {checkpoint} (step {resume_step}){FINISHING if finished else ''}")

    set_seed(args.seed)  # before the randomly initialised score head is built
    data = load_processed_data(args, same_tokenizer=args.train_split == GOLD_SPLIT).select_columns(TOKEN_COLUMNS)
    check(
        args.train_split in data,
        f"{Path(args.work_dir) / PROCESSED_DIR} has no {args.train_split} split: rebuild it with "
        f"`{command('data_process.py', args)} --gold_share 0.5` (a gold reward model needs pairs of its own)",
    )
    for split in ("validation", "test") if args.max_eval_samples else ():
        data[split] = data[split].select(range(min(args.max_eval_samples, len(data[split]))))
    if args.group_by_length:  # a pair is padded to its longer text: that is its length
        data = data.map(
            lambda ex: {"length": max(len(ex["input_ids_chosen"]), len(ex["input_ids_rejected"]))},
            keep_in_memory=True,  # no cache file written into processed_data/
            desc="pair lengths",
        )
    tokenizer = load_tokenizer(args.model)
    # a run killed after its last checkpoint only has the test and the save left: its weights are there
    source = checkpoint if finished else args.model
    try:
        hf_logging.set_verbosity_error()  # its report of the score head it had to create: we say it below
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **fused_activation(source))
    except OSError as e:
        raise UserError(
            f"cannot load a reward model from {source} ({first_line(e)}){OFFLINE_HINT * offline()}"
        ) from None
    finally:
        hf_logging.set_verbosity_warning()
    if processes.is_main_process and not args.resume:
        print(f"a reward model: {args.model} with a new score head (a linear layer to one number, random at first)")
    if processes.is_main_process and (torch.cuda.is_available() or "RLHF_CPU_BF16" in precision()[1]):
        print(f"precision: {precision()[1]}")
    built = json.loads((Path(args.work_dir) / PROCESSED_DIR / "stats.json").read_text())["max_length"]
    check_positions(model.config, built, f"{PROCESSED_DIR}'s --max_length")
    model.config.pad_token_id = tokenizer.pad_token_id
    fp32_head(model.score)  # the score in fp32 under autocast, as every script reads it

    report_to, tracker_callbacks, tracker_run = trainer_tracking(
        args, run_dir, run_name, resume_step, processes.is_main_process
    )
    training_args = TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of the total steps
        lr_scheduler_type="linear",
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        **trainer_precision(),
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,  # our columns are not arguments of model.forward
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=report_to,  # Trainer's own integrations
        run_name=tracker_run,
        project=TRACKER_PROJECT,
        seed=args.seed,
    )
    is_main = training_args.process_index == 0
    if is_main:
        remove_leftovers(run_dir, args.work_dir)
    if is_main and not args.resume and list(run_dir.glob("checkpoint-*")):
        # A fresh run must not leave an older run's checkpoints for a later --resume to pick up.
        for old in run_dir.glob("checkpoint-*"):
            shutil.rmtree(old)
        print(f"removed the checkpoints of an earlier run in {run_dir}")
    metrics_logger = MetricsLogger(
        run_dir / "metrics.jsonl",
        resume_step=resume_step,
        keep_records=records.get("metrics_records"),
        enabled=is_main,
    )
    png_path = run_dir / f"{run_name}_curves.png"

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        data_collator=RewardDataCollatorWithPadding(tokenizer),
        train_dataset=data[args.train_split],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[MetricsCallback(metrics_logger, png_path), ReleaseCPUMemory(), *tracker_callbacks],
        metrics_logger=metrics_logger,
    )
    trainer.remove_callback(ProgressCallback)  # its logs are printed as dicts of strings
    trainer.add_callback(ProgressWithoutLogs)
    if finished:
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    else:
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if args.resume else None)
        except tracker_errors(args) as e:  # Trainer starts the trackers: wandb without a login, say
            raise tracker_failure(args, e) from None

    # final evaluation on the held-out test split
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    results = {
        "split": "test",
        "n": len(data["test"]),
        "loss": test["test_loss"],
        "accuracy": test["test_accuracy"],
        "margin": test["test_margin"],
        "global_step": trainer.state.global_step,
        "base_model": resolve_model_name(args.model),
        "train_split": args.train_split,
    }
    if trainer.is_world_process_zero():
        print(f"test: accuracy {results['accuracy']:.4f}, loss {results['loss']:.4f}, margin {results['margin']:.4f}")
        plot_metrics(metrics_logger.path, CURVES, png_path, title="reward model")
        card = {}
        if args.train_split == GOLD_SPLIT:
            card = {"title": f"gold reward model from {Path(resolve_model_name(args.model)).name}", "note": GOLD_NOTE}
        save_pretrained_atomic(
            out_dir,
            trainer.model,
            tokenizer,
            extra={
                "eval_results.json": lambda p: atomic_write_json(p, results),
                "metrics.jsonl": lambda p: shutil.copy(metrics_logger.path, p),
                png_path.name: lambda p: shutil.copy(png_path, p),
                "args.json": lambda p: save_args(args, p),
                "README.md": card_writer(
                    "reward_model", args, results, "reward_model_training.py", TINY, curves=png_path.name, **card
                ),
            },
        )
        print(f"wrote {out_dir}")
        if args.push_to_hub:
            push_folder(out_dir, args.push_to_hub)


if __name__ == "__main__":
    run(main, Args, TINY, checkpoint=lambda args: last_checkpoint(outputs(args)[0]))
