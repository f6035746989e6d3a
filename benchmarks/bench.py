"""Throughput and peak memory of every training phase, ours and (optionally) TRL's.

For each phase it runs `--warmup` untimed steps, then `--steps` timed steps, each phase and
implementation in a fresh subprocess (so that one phase's memory peak does not carry into the
next), and prints one JSON line per phase and implementation:

    {"phase": "ppo", "impl": "ours", "samples_per_s": ..., "tokens_per_s": ..., "peak_mem_mb": ..., "gen_share": ...}

* phases, and what one step is (the seed's sizes, from each script's `Args` defaults; `--batch`
  changes the batch sizes):
  - `reward`: one optimizer step of the reward model on 8 pairs (`reward_model_training.RewardTrainer`);
  - `dpo`: one optimizer step on 4 pairs, policy and reference forwards (`DPO_training`);
  - `ppo`: one rollout of 8 prompts (<= 256 tokens) x 64 new tokens, reward scoring, policy/value and
    reference forwards, GAE, then `ppo_epochs` = 2 optimizer steps (`PPO_training`);
  - `grpo`: one rollout of 2 prompts (<= 192 tokens) x a group of 3 replies x 32 new tokens, scoring,
    reference forward, one optimizer step (`GRPO_training`);
  - `generate`: one `common.generate_responses` call on 8 prompts x 64 new tokens (PPO's settings).
* samples: preference pairs trained on (reward, dpo); sequences generated (ppo, grpo, generate).
* tokens: real (unpadded) tokens of the chosen and rejected sequences through the training forward
  (reward, dpo; the reference forward over the same tokens is not counted again); generated reply
  tokens, up to and including the first EOS (ppo, grpo, generate).
* `samples_per_s`, `tokens_per_s`: over the timed steps' wall time, data collation included.
  `gen_share` (ppo, grpo, generate): the share of that time spent inside `model.generate`.
* `peak_mem_mb`: the phase process's peak RSS on CPU (imports, models and data included);
  `torch.cuda.max_memory_allocated` on GPU.
* Replies are exactly `max_new_tokens` long in both implementations (`min_new_tokens` is set to it),
  so both do the same work whatever they sample; `--natural_length` lets EOS end them.
* `--repeats N` runs each phase N times per implementation, alternating ours and TRL's (a shared
  machine's load then falls on both alike), and reports each one's median run.

    python benchmarks/bench.py --preset tiny                                    # ours, every phase
    python benchmarks/bench.py --preset tiny --compare trl --repeats 3          # and TRL's, then the ratios
    python benchmarks/bench.py --model_config gpt2 --phases ppo,grpo --steps 5  # real size, random weights (GPU)
    python benchmarks/bench.py --model_config gpt2 --batch reward=4,dpo=2       # smaller batches

`--model_config gpt2` builds a randomly initialised `GPT2Config()` (124M parameters, 50257 tokens,
offline) and feeds it random token ids at the seed's full lengths (reward and DPO sequences of 512
tokens, prompts of 256): the worst case, for memory. The tokenizer is padded with added tokens to
GPT-2's vocabulary, so that random ids survive decode -> encode exactly.

With `--compare trl` every phase also runs through TRL (a dev-only dependency) on the same model,
data, batch sizes, lengths, dtype and sampling (`top_k=0`, `top_p`, temperature), without vLLM,
gradient checkpointing or bf16 on CPU (TRL's defaults turn both on), with dropout as ours, one
micro-batch per optimizer step and torch's AdamW; a last line `{"ratios": {phase: ours / trl
samples_per_s}}` follows. A `TrainerCallback` times TRL's steps from the end of the last warm-up
step to the end of the last step. The counterparts:
  - `reward`: `RewardTrainer` on the same token ids (pre-tokenized `chosen_ids`/`rejected_ids`);
  - `dpo`: `DPOTrainer` (sigmoid loss, the same beta, a reference model, no precomputed log-probs);
  - `ppo`: `RLOOTrainer`. TRL 1.x ships no PPO trainer; RLOO is the closest online trainer (the same
    generation and reward scoring, a reference forward, `num_iterations=2` optimizer steps per
    rollout like our `ppo_epochs=2`). Its leave-one-out baseline needs 2 replies per prompt, so its
    rollout is 4 prompts x 2 replies = 8 sequences (ours: 8 x 1). It has no value head, GAE or entropy term;
  - `grpo`: `GRPOTrainer` (`loss_type="grpo"`, the same group size, beta, clip and entropy coefficient,
    `num_iterations=1`);
  - `generate`: TRL's own generation path, `GRPOTrainer._generate` (tokenize, left-pad, `model.generate`
    with TRL's `GenerationConfig`, mask after EOS, decode).
Remaining differences: TRL scores `prompt + completion` and reads the reward at Hugging Face's "last
non-pad token" (ours: `prompt + " " + reply`, at the last real token); it pads right where we pad
left; its log-probs go through a chunked fused LM head that recomputes the logits in the backward
pass (less memory, more compute); it generates in the model's dtype where our PPO step autocasts
(bf16 on GPU; the same on CPU); it keeps per-step metrics of its own, while our logging, checkpoints
and progress bars are left out of the timed loops (TRL logs only after them: `logging_steps` is
past the run).
"""

# ruff: noqa: E402  (the repository root goes on sys.path before common.py and the scripts are imported)
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data_process
import DPO_training as dpo
import GRPO_training as grpo
import PPO_training as ppo
import reward_model_training as rm
from common import (
    RewardMix,
    collate_pairs,
    disable_dropout,
    filter_edge_cases,
    fp32_head,
    freeze,
    fused_activation,
    generate_responses,
    join_conversation,
    load_causal_lm,
    load_preference_data,
    load_tokenizer,
    make_accelerator,
    response_mask_from_eos,
    set_seed,
    tokenize_pairs,
    trainer_precision,
)
from lifecycle import PRESETS, CommonArgs, UserError, check, parse_args
from reporting import MetricsLogger, peak_memory_mb

PHASES = ("reward", "dpo", "ppo", "grpo", "generate")
ROLLOUT_PHASES = ("ppo", "grpo", "generate")


@dataclass
class Args(CommonArgs):
    preset: str = field(
        default="tiny",
        metadata={"help": "tiny: the bundled model and data (offline); gpt2: the hub's", "choices": list(PRESETS)},
    )
    # data and model
    dataset: str = field(default="Anthropic/hh-rlhf", metadata={"help": "preference pairs (tiny: the bundled set)"})
    model_config: str = field(
        default="",
        metadata={
            "help": "empty: load --model; gpt2: a randomly initialised GPT2Config() of the real size, random ids",
            "choices": ["", "gpt2"],
        },
    )
    # what to run
    phases: str = field(default=",".join(PHASES), metadata={"help": "comma-separated phases to benchmark"})
    compare: str = field(default="", metadata={"help": "trl: also run every phase through TRL", "choices": ["", "trl"]})
    steps: int = field(default=10, metadata={"help": "timed steps per phase"})
    warmup: int = field(default=2, metadata={"help": "untimed steps before them"})
    repeats: int = field(
        default=1, metadata={"help": "runs per phase and implementation, alternating; the median run is reported"}
    )
    batch: str = field(
        default="reward=8,dpo=4,ppo=8,grpo=2,generate=8",
        metadata={"help": "per phase: pairs (reward, dpo) or prompts (ppo, grpo, generate); name only those to change"},
    )
    natural_length: bool = field(
        default=False, metadata={"help": "let EOS end replies (default: every reply is max_new_tokens long)"}
    )
    # internal: the parent runs each phase as `--worker PHASE:IMPL --result_file FILE`
    worker: str = field(default="", metadata={"help": "internal: run one PHASE:IMPL in this process"})
    result_file: str = field(default="", metadata={"help": "internal: where the worker writes its JSON result"})


# TRL logs every `logging_steps`; past the run, it logs only its closing summary, as our timed loops log nothing.
LOG_NEVER = 10**9


def batch_sizes(spec):
    """`--batch` over the defaults: {phase: size}."""
    sizes = dict(item.split("=") for item in Args.batch.split(","))
    for item in filter(None, spec.split(",")):
        phase, _, size = item.partition("=")
        check(phase in PHASES and size.isdigit() and int(size) > 0, f"--batch: {item!r} is not PHASE=N with N > 0")
        sizes[phase] = size
    return {phase: int(size) for phase, size in sizes.items()}


# ---------------------------------------------------------------------------
# Parent: one fresh subprocess per phase, implementation and repeat
# ---------------------------------------------------------------------------


def run_worker(args, phase, impl):
    """The JSON result of one `bench.py --worker` process, or None (its stderr shown) when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        settings = {**vars(args), "worker": f"{phase}:{impl}", "result_file": str(result_file)}
        cmd = [sys.executable, __file__, *(f"--{k}={v}" for k, v in settings.items())]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not result_file.is_file():
            print(f"bench: {phase}/{impl} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return None
        return json.loads(result_file.read_text())


def parent(args):
    phases = [p for p in args.phases.split(",") if p]
    for phase in phases:
        check(phase in PHASES, f"--phases: unknown phase {phase!r} (choose from {', '.join(PHASES)})")
    check(args.steps > 0 and args.warmup >= 0 and args.repeats > 0, "--steps, --repeats > 0 and --warmup >= 0")
    batch_sizes(args.batch)
    impls = ["ours", "trl"] if args.compare == "trl" else ["ours"]
    if args.compare == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            raise UserError(
                "--compare trl needs TRL, a dev-only dependency: pip install -r requirements-dev.txt"
            ) from None
    results, failed = {}, False
    progress = tqdm(total=len(phases) * args.repeats * len(impls), desc="bench", unit="run")
    for phase in phases:
        runs = {impl: [] for impl in impls}
        for _ in range(args.repeats):  # alternating, so that both see the same (shared) machine on average
            for impl in impls:
                progress.set_postfix_str(f"{phase}/{impl}")
                result = run_worker(args, phase, impl)
                progress.update()
                failed |= result is None
                runs[impl] += [result] if result else []
        for impl, done in runs.items():
            if done:
                results[phase, impl] = sorted(done, key=lambda r: r["samples_per_s"])[(len(done) - 1) // 2]
                tqdm.write(json.dumps(results[phase, impl]))
    progress.close()
    if args.compare == "trl":
        ratios = {
            phase: round(results[phase, "ours"]["samples_per_s"] / results[phase, "trl"]["samples_per_s"], 3)
            for phase in phases
            if (phase, "ours") in results and (phase, "trl") in results
        }
        print(json.dumps({"ratios": ratios}), flush=True)
    if failed:
        raise UserError("some phases failed (their errors are above)")


# ---------------------------------------------------------------------------
# Worker: what is measured, the shared workload, one function per phase
# ---------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Meter:
    """Wall time, samples and tokens of the timed steps, and the time spent inside `generate`."""

    def __init__(self):
        self.running, self.elapsed, self.samples = False, 0.0, 0

    def start(self):
        sync()
        self.samples, self.tokens, self.gen_s = 0, 0, 0.0
        self.running, self.t0 = True, time.perf_counter()

    def stop(self):
        sync()
        self.elapsed, self.running = time.perf_counter() - self.t0, False

    def watch_generate(self, model, eos_token_id):
        """Time every `model.generate` call and count its sequences and reply tokens (up to the first EOS)."""
        generate = model.generate

        def timed_generate(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            sequences = generate(*args, **kwargs)
            sync()
            if self.running:
                self.gen_s += time.perf_counter() - t0
                replies = sequences[:, kwargs["input_ids"].shape[1] :]  # (B, R)
                self.samples += len(replies)
                self.tokens += response_mask_from_eos(replies, eos_token_id).sum()
            return sequences

        model.generate = timed_generate  # an instance attribute: ours and TRL's code both call model.generate

    def watch_pairs(self, model):
        """Count the pairs and real tokens of `model`'s training forwards (grad on), whose rows are [chosen; rejected]."""

        def count(module, args, kwargs):
            if self.running and torch.is_grad_enabled():
                mask = kwargs["attention_mask"]  # (2B, T)
                self.samples += mask.shape[0] // 2
                self.tokens += mask.sum()  # a tensor: no device sync per step

        model.register_forward_pre_hook(count, with_kwargs=True)

    def result(self, phase, impl):
        record = {
            "phase": phase,
            "impl": impl,
            "samples_per_s": round(self.samples / self.elapsed, 3),
            "tokens_per_s": round(int(self.tokens) / self.elapsed, 1),
            "peak_mem_mb": round(peak_memory_mb(), 1),
        }
        if phase in ROLLOUT_PHASES:
            record["gen_share"] = round(self.gen_s / self.elapsed, 3)
        return record


class TimingCallback(TrainerCallback):
    """Times optimizer steps begin + 1 ... end of a Trainer (`global_step` counts the finished ones)."""

    def __init__(self, meter, begin, end):
        self.meter, self.begin, self.end = meter, begin, end

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.begin and not self.meter.running:  # no warm-up: from the first step's start
            self.meter.start()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.begin:
            self.meter.start()
        if state.global_step == self.end:
            self.meter.stop()


class Workload:
    """The tokenizer, models and data of one phase, built the same way for ours and TRL's."""

    def __init__(self, args, out_dir):
        self.args, self.model_path = args, args.model
        set_seed(args.seed)
        self.tokenizer = load_tokenizer(args.model)
        self.eos = self.tokenizer.eos_token_id
        if args.model_config == "gpt2":
            config = GPT2Config(bos_token_id=self.eos, eos_token_id=self.eos, pad_token_id=self.eos)
            self.first_random_id, self.vocab_size = len(self.tokenizer), config.vocab_size
            check(self.first_random_id < self.vocab_size, f"--model {args.model}: its vocabulary leaves no room")
            # Added tokens "<tN>" up to GPT-2's vocabulary: random ids decode and re-encode to themselves.
            self.tokenizer.add_tokens([f"<t{i}>" for i in range(self.first_random_id, self.vocab_size)])
            # Saved, so that every model of the phase (and TRL's reference, which it loads by path) starts from it.
            self.model_path = str(Path(out_dir) / "random_gpt2")
            GPT2LMHeadModel(config).save_pretrained(self.model_path)

    def causal_lm(self, max_new_tokens=None):
        """The policy; its replies are max_new_tokens long unless --natural_length."""
        model = load_causal_lm(self.model_path, self.tokenizer)
        if max_new_tokens and not self.args.natural_length:
            model.generation_config.min_new_tokens = max_new_tokens
        return model

    def sequence_classifier(self):
        """A reward model (a scalar head on the same base): trained in `reward`, frozen in ppo and grpo."""
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, num_labels=1, **fused_activation(self.model_path)
        )
        fp32_head(model.score)  # as reward_model_training.py
        model.config.pad_token_id = self.eos
        return model

    def rows(self, n):
        """n pairs as data_process.py's text columns (prompt, chosen_response, rejected_response), cycled if short."""
        if self.args.model_config == "gpt2":
            # Random ids at the seed's full lengths: a 256-token prompt, replies that fill 512-token sequences.
            prompt_len = ppo.Args.max_prompt_length
            reply_len = data_process.Args.max_length - prompt_len - 1  # join_conversation's space is one token

            def text(length):
                return self.tokenizer.decode(torch.randint(self.first_random_id, self.vocab_size, (length,)))

            return [
                {"prompt": text(prompt_len), "chosen_response": text(reply_len), "rejected_response": text(reply_len)}
                for _ in range(n)
            ]
        raw = load_preference_data(self.args.dataset)["train"]
        raw = raw.select(range(min(len(raw), 2 * n + 100)))  # enough to survive the filter
        kept = raw.filter(filter_edge_cases).map(data_process.add_text_columns)
        check(len(kept) > 0, f"--dataset {self.args.dataset}: no pair survives the filter")
        return [kept[i % len(kept)] for i in range(n)]

    def token_rows(self, n):
        """n pairs as data_process.py's reward-model columns: `join_conversation` texts cut to its max_length."""
        rows = []
        for row in self.rows(n):
            ids = {}
            for key in ("chosen", "rejected"):
                text = join_conversation(row["prompt"], row[f"{key}_response"])
                enc = self.tokenizer(text, truncation=True, max_length=data_process.Args.max_length)
                ids[f"input_ids_{key}"], ids[f"attention_mask_{key}"] = enc["input_ids"], enc["attention_mask"]
            rows.append(ids)
        return rows

    def prompts(self, n, max_prompt_length):
        """n prompts, cut from the left to max_prompt_length tokens up front (TRL 1.x does not cut prompts)."""
        enc = self.tokenizer([r["prompt"] for r in self.rows(n)], truncation=True, max_length=max_prompt_length)
        return self.tokenizer.batch_decode(enc["input_ids"])


def trl_settings(args, out_dir, total_steps, script_args, scheduler):
    """Trainer settings for TRL (and our reward Trainer): the script's optimiser, TRL's extras switched off."""
    return dict(
        output_dir=out_dir,
        max_steps=total_steps,
        learning_rate=script_args.learning_rate,
        weight_decay=script_args.weight_decay,
        max_grad_norm=script_args.max_grad_norm,
        lr_scheduler_type=scheduler,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,  # TRL's default is on; ours never recomputes activations
        **trainer_precision(),  # TRL's default is bf16, on CPU too; ours: autocast on GPU only
        logging_steps=LOG_NEVER,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )


# --- reward -------------------------------------------------------------------------------------------------------


def bench_reward(work, meter, impl, batch, out_dir):
    """Ours is a Hugging Face Trainer too (reward_model_training.RewardTrainer): both are timed by TimingCallback."""
    args, script_args = work.args, rm.Args()
    total = args.warmup + args.steps
    rows = work.token_rows(total * batch)
    model = work.sequence_classifier()
    meter.watch_pairs(model)
    settings = trl_settings(args, out_dir, total, script_args, "linear")
    settings |= dict(per_device_train_batch_size=batch, warmup_steps=script_args.warmup_ratio)
    callbacks = [TimingCallback(meter, args.warmup, total)]
    if impl == "ours":
        trainer = rm.RewardTrainer(
            model=model,
            args=TrainingArguments(**settings, remove_unused_columns=False),
            data_collator=rm.RewardDataCollatorWithPadding(work.tokenizer),
            train_dataset=Dataset.from_list(rows),
            processing_class=work.tokenizer,
            callbacks=callbacks,
            metrics_logger=MetricsLogger(Path(out_dir) / "metrics.jsonl", enabled=False),
        )
    else:
        from trl import RewardConfig, RewardTrainer

        data = Dataset.from_list(
            [{"chosen_ids": r["input_ids_chosen"], "rejected_ids": r["input_ids_rejected"]} for r in rows]
        )
        # The ids are already cut to data_process's max_length; our reward model trains with dropout on, so this one does.
        config = RewardConfig(**settings, max_length=None, disable_dropout=False)
        trainer = RewardTrainer(
            model=model, args=config, train_dataset=data, processing_class=work.tokenizer, callbacks=callbacks
        )
    trainer.train()


# --- dpo ----------------------------------------------------------------------------------------------------------


def bench_dpo(work, meter, impl, batch, out_dir):
    args = work.args
    script_args = dpo.Args(per_device_train_batch_size=batch, gradient_accumulation_steps=1)
    total = args.warmup + args.steps
    rows = work.rows(total * batch)
    policy = work.causal_lm()
    reference = copy.deepcopy(policy)
    meter.watch_pairs(policy)
    if impl == "trl":
        from trl import DPOConfig, DPOTrainer

        # TRL joins prompt + completion: the leading space is join_conversation's.
        data = Dataset.from_list(
            [
                {"prompt": r["prompt"], "chosen": " " + r["chosen_response"], "rejected": " " + r["rejected_response"]}
                for r in rows
            ]
        )
        config = DPOConfig(
            **trl_settings(args, out_dir, total, script_args, "linear"),
            per_device_train_batch_size=batch,
            warmup_steps=script_args.warmup_ratio,
            optim="adamw_torch",  # ours: torch.optim.AdamW
            max_length=script_args.max_seq_len,
            beta=script_args.beta,
            loss_type=[script_args.loss_type],
            label_smoothing=script_args.label_smoothing,
            precompute_ref_log_probs=script_args.precompute_ref_logps,
            disable_dropout=True,
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=config,
            train_dataset=data,
            processing_class=work.tokenizer,
            callbacks=[TimingCallback(meter, args.warmup, total)],
        )
        trainer.train()
        return

    # The script's own micro-batch step (DPO_training.dpo_step): both models' log-probs, dpo_loss,
    # backward, clipping, the optimizer and scheduler steps; its logging, evaluation and checkpoints are left out.
    accelerator = make_accelerator()
    split = {k: [r[k] for r in rows] for k in ("prompt", "chosen_response", "rejected_response")}
    collate = partial(collate_pairs, eos_token_id=work.eos, max_seq_len=script_args.max_seq_len)
    loader = DataLoader(tokenize_pairs(split, work.tokenizer), batch_size=batch, collate_fn=collate)
    disable_dropout(policy)
    disable_dropout(reference)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=script_args.learning_rate, weight_decay=script_args.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(script_args.warmup_ratio * total), total)
    policy, optimizer, loader, scheduler = accelerator.prepare(policy, optimizer, loader, scheduler)
    freeze(reference.to(accelerator.device))
    policy.train()
    for step, batch_data in enumerate(loader):
        if step == args.warmup:
            meter.start()
        dpo.dpo_step(policy, reference, None, batch_data, optimizer, scheduler, script_args, accelerator)
    meter.stop()


# --- ppo ----------------------------------------------------------------------------------------------------------


def time_online_steps(work, meter, step_fn, model, reference, reward_model, script_args, prompts, batch):
    """Ours for ppo and grpo: the script's step function, `batch` prompts a step, timed after the warm-up steps.

    The reference and reward models are frozen, the trained model stays in eval mode (dropout off) as in the
    scripts, and the optimizer is the scripts' AdamW.
    """
    args, accelerator = work.args, make_accelerator()
    reference = freeze(reference.to(accelerator.device))
    reward = RewardMix(
        script_args, accelerator.device, proxy=(freeze(reward_model.to(accelerator.device)), work.tokenizer)
    )
    model.eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=script_args.learning_rate, weight_decay=script_args.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            meter.start()
        chunk = prompts[step * batch : (step + 1) * batch]
        step_fn(
            model, reference, reward, work.tokenizer, optimizer, chunk, script_args, script_args.kl_coef, accelerator,
            "in the benchmark",
        )  # fmt: skip
    meter.stop()


def bench_ppo(work, meter, impl, batch, out_dir):
    args = work.args
    script_args = ppo.Args(rollout_batch_size=batch)
    total = args.warmup + args.steps
    prompts = work.prompts(total * batch, script_args.max_prompt_length)
    policy = work.causal_lm(script_args.max_new_tokens)
    reference = copy.deepcopy(policy)
    reward_model = work.sequence_classifier()
    meter.watch_generate(policy, work.eos)
    if impl == "trl":
        from trl import RLOOConfig, RLOOTrainer

        generations = 2  # RLOO's leave-one-out baseline needs at least two replies per prompt
        check(batch % generations == 0, f"--batch ppo={batch}: RLOO needs an even number of sequences")
        updates = script_args.ppo_epochs * script_args.num_minibatches  # optimizer steps per rollout
        config = RLOOConfig(
            **trl_settings(args, out_dir, total * updates, script_args, "constant"),
            per_device_train_batch_size=batch // script_args.num_minibatches,  # sequences per optimizer step
            steps_per_generation=script_args.num_minibatches,
            num_generations=generations,
            num_iterations=script_args.ppo_epochs,
            optim="adamw_torch",  # ours: torch.optim.AdamW
            max_completion_length=script_args.max_new_tokens,
            temperature=script_args.temperature,
            top_p=script_args.top_p,
            top_k=0,
            beta=script_args.kl_coef,
            epsilon=script_args.clip_range,
            generation_kwargs=None if args.natural_length else {"min_new_tokens": script_args.max_new_tokens},
            disable_dropout=True,  # ours keeps the policy in eval mode
        )
        trainer = RLOOTrainer(
            model=policy,
            reward_funcs=reward_model,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=work.tokenizer,
            reward_processing_classes=work.tokenizer,
            callbacks=[TimingCallback(meter, args.warmup * updates, total * updates)],
        )
        trainer.train()
        return

    # The script's own step (PPO_training.ppo_step): generate, score, policy/value and reference forwards, KL
    # penalty, GAE, the PPO epochs with the NaN guard; its metrics, sample tables and checkpoints are left out.
    time_online_steps(work, meter, ppo.ppo_step, ppo.PolicyWithValueHead(policy), reference, reward_model, script_args,
                      prompts, batch)  # fmt: skip


# --- grpo ---------------------------------------------------------------------------------------------------------


def bench_grpo(work, meter, impl, batch, out_dir):
    args = work.args
    script_args = grpo.Args(rollout_batch_size=batch)
    group_size, total = script_args.group_size, args.warmup + args.steps
    prompts = work.prompts(total * batch, script_args.max_prompt_length)
    policy = work.causal_lm(script_args.max_new_tokens)
    reference = copy.deepcopy(policy)
    reward_model = work.sequence_classifier()
    meter.watch_generate(policy, work.eos)
    if impl == "trl":
        from trl import GRPOConfig, GRPOTrainer

        updates = script_args.updates_per_rollout
        config = GRPOConfig(
            **trl_settings(args, out_dir, total * updates, script_args, "constant"),
            per_device_train_batch_size=batch * group_size,  # sequences per optimizer step: the whole rollout
            num_generations=group_size,
            num_iterations=updates,
            optim="adamw_torch",  # ours: torch.optim.AdamW
            max_completion_length=script_args.max_new_tokens,
            temperature=script_args.temperature,
            top_p=script_args.top_p,
            top_k=0,
            beta=script_args.kl_coef,
            epsilon=script_args.clip_range,
            loss_type=script_args.loss_type,  # grpo: eq. 3, each reply's token mean, then over replies, as ours
            epsilon_high=script_args.epsilon_high or script_args.clip_range,
            # TRL has no group-then-batch scaling (our default): its group scaling is the closest
            scale_rewards={"group+batch": "group"}.get(script_args.scale_rewards, script_args.scale_rewards),
            entropy_coef=script_args.entropy_coef,  # an entropy term in the loss as ours (TRL's is a plain bonus)
            generation_kwargs=None if args.natural_length else {"min_new_tokens": script_args.max_new_tokens},
            disable_dropout=True,  # ours keeps the policy in eval mode
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward_model,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=work.tokenizer,
            reward_processing_classes=work.tokenizer,
            callbacks=[TimingCallback(meter, args.warmup * updates, total * updates)],
        )
        trainer.train()
        return

    # The script's own step (GRPO_training.grpo_step): sample the groups, score, group advantages, reference
    # log-probs, the update with its NaN guard; its metrics, evaluations and checkpoints are left out.
    time_online_steps(work, meter, grpo.grpo_step, policy, reference, reward_model, script_args, prompts, batch)


# --- generate -----------------------------------------------------------------------------------------------------


def bench_generate(work, meter, impl, batch, out_dir):
    args, script_args = work.args, ppo.Args()
    total = args.warmup + args.steps
    prompts = work.prompts(total * batch, script_args.max_prompt_length)
    accelerator = make_accelerator()
    policy = work.causal_lm(script_args.max_new_tokens).to(accelerator.device).eval()
    meter.watch_generate(policy, work.eos)
    if impl == "trl":
        from trl import GRPOConfig, GRPOTrainer

        check(batch >= 2, "--batch generate: TRL's GRPOConfig needs at least 2 sequences")
        config = GRPOConfig(
            **trl_settings(args, out_dir, total, script_args, "constant"),
            per_device_train_batch_size=batch,
            num_generations=batch,  # unused: _generate is called on `batch` distinct prompts
            max_completion_length=script_args.max_new_tokens,
            temperature=script_args.temperature,
            top_p=script_args.top_p,
            top_k=0,
            generation_kwargs=None if args.natural_length else {"min_new_tokens": script_args.max_new_tokens},
            disable_dropout=True,
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),  # unused: only _generate runs
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=work.tokenizer,
        )
        generate = trainer._generate  # TRL's generation path: tokenize, left-pad, generate, mask after EOS, decode
    else:

        def generate(chunk):  # as PPO_training's step 1 (in common.autocast: bf16 on a GPU)
            with torch.no_grad():
                return generate_responses(
                    policy, work.tokenizer, chunk, script_args.max_prompt_length, script_args.max_new_tokens,
                    script_args.temperature, script_args.top_p,
                )  # fmt: skip

    for step in range(total):
        if step == args.warmup:
            meter.start()
        generate(prompts[step * batch : (step + 1) * batch])
    meter.stop()


PHASE_FUNCTIONS = {
    "reward": bench_reward,
    "dpo": bench_dpo,
    "ppo": bench_ppo,
    "grpo": bench_grpo,
    "generate": bench_generate,
}


def worker(args):
    phase, _, impl = args.worker.partition(":")
    check(phase in PHASE_FUNCTIONS and impl in ("ours", "trl"), f"--worker: expected PHASE:IMPL, got {args.worker!r}")
    meter = Meter()
    with tempfile.TemporaryDirectory() as out_dir:
        PHASE_FUNCTIONS[phase](Workload(args, out_dir), meter, impl, batch_sizes(args.batch)[phase], out_dir)
    check(meter.elapsed > 0 and meter.samples > 0, f"{phase}/{impl}: no timed step ran")
    Path(args.result_file).write_text(json.dumps(meter.result(phase, impl)))


def main(args):
    """The parent runs every phase (and implementation) in a `--worker` process of its own."""
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    # lifecycle.parse_args takes a missing --preset as gpt2; this script's default is tiny (offline).
    if not any(a == "--preset" or a.startswith("--preset=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--preset", "tiny"]
    try:
        main(parse_args(Args))
    except UserError as e:  # lifecycle.run would also do this, but would suggest a --resume that a benchmark lacks
        sys.exit(f"error: {e}")
