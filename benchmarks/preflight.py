"""Preflight: rehearse the real run at its real sizes for a few steps, and project what the full run costs.

Runs the seven pipeline scripts one after another, each as its own subprocess exactly as a user
would run it (`python data_process.py ...`), with the `gpt2` preset's settings: the seed's batch
sizes, gradient accumulation, sequence lengths, group size and epochs. Only three things change:

* how many optimizer steps each training script makes (`--steps`: the reward model's and DPO's
  `--max_steps`, PPO's and GRPO's `--total_steps`);
* how many prompts (or pairs) the scripts' own final evaluations and `evaluate_models.py` use
  (`--eval_prompts`);
* `--logging_steps 1` for the two scripts that log less often, so that every step is timed.

From each script's `metrics.jsonl` (`time/elapsed_s`, `tokens/processed` per step) and its process's
peak memory it reports, per phase (data, SFT, reward model, PPO, GRPO, DPO, evaluation): the steps run,
seconds per step with the first step (warm-up, allocator growth) apart, tokens per second, peak
memory (CUDA allocator peak on GPU, peak RSS of the process on CPU) and the projected wall time of
the full run at the configured sizes:

* SFT: epochs x ceil(ceil(train pairs / batch) / accumulation), plus a validation pass at step 0, every
  `eval_steps` and at the end, at the per-reply speed of its step-0 pass;
* reward model: epochs x ceil(train pairs / batch) // accumulation steps (HF Trainer's count), plus
  a validation pass every `eval_steps` and the test pass, at the per-pair speed of its test pass;
* PPO and GRPO: `total_steps`; GRPO also its evaluations (at step 0, every `eval_every`, the end);
* DPO: epochs x ceil(ceil(train pairs / batch) / accumulation), plus a validation pass every
  `eval_steps`, at the per-pair speed of its final one;
* evaluation: 150 prompts x 5 models at the measured seconds per prompt and model;
* every phase: its start-up and saving as measured, once (not scaled).

Train-set sizes come from the data step (`--project_to dataset`, the default when it ran in full)
or from hh-rlhf's published size (160,800 train and 8,552 test rows, the seed's 50,000-row subset,
filtered at the share the data step kept: `--project_to hh-rlhf`, the default when `--data_rows`
cut it short). The table goes to stdout and everything to `<work_dir>/preflight.json`; each
script's output is in `<work_dir>/preflight_logs/`.

    python benchmarks/preflight.py --steps 3                                  # your GPU: gpt2 and hh-rlhf from the hub
    python benchmarks/preflight.py --steps 3 --dataset /data/hh-rlhf --model /models/gpt2   # local copies
    OMP_NUM_THREADS=1 python benchmarks/preflight.py --random_init ../shared/gpt2-tokenizer \\
        --dataset ../shared/hh-rlhf-sample/harmless-base-test-first500.jsonl.gz \\
        --steps 2 --eval_prompts 4 --max_accumulation 1 --project_to hh-rlhf  # offline CPU, GPT-2's size

`--random_init TOKENIZER` builds a randomly initialised GPT-2 (`GPT2Config()`: 12 layers, 768 wide,
1024 positions; `--n_layer`/`--n_embd`/`--n_head` shrink it) with that tokenizer into
`<work_dir>/random_gpt2/` and rehearses with it: the shapes, lengths, memory and speed are real,
what the model says is not (it writes noise, never EOS, so every reply is `max_new_tokens` long,
and the reward model's scores are noise; nothing here treats that as an error).
`--max_accumulation K` (for CPUs, where one DPO optimizer step of 4 x 8 pairs takes minutes) runs
at most K micro-batches per optimizer step and scales the measured time per step by the seed's
accumulation / K; micro-batch shapes, and so memory and tokens per second, are unchanged.
On a GPU, each phase is also checked against 12 and 16 GB cards: it fits when its allocator's
reserved peak plus 1 GiB (CUDA context, fragmentation) is at most the card's memory.
"""

# ruff: noqa: E402  (the repository root goes on sys.path before common.py and the scripts are imported)
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import DPO_training
import evaluate_models
import GRPO_training
import PPO_training
import reward_model_training
import SFT_training
from lifecycle import (
    DPO_DIR,
    GRPO_FINAL_DIR,
    PPO_DIR,
    PROCESSED_DIR,
    REWARD_MODEL_DIR,
    SFT_DIR,
    CommonArgs,
    UserError,
    atomic_write_json,
    check,
    run,
)
from reporting import read_metrics

# Anthropic/hh-rlhf as published (all subsets of the default configuration), and the seed's subset.
HH_RLHF_ROWS = {"train": 160_800, "test": 8_552}
SEED_TRAIN_SUBSET = 50_000
EVAL_FULL_PROMPTS = 150  # evaluate_models.py's --num_prompts
EVAL_MODELS = 5  # base, SFT, PPO, GRPO, DPO
GPU_SIZES_GB = (12, 16)  # the seed's minimum and recommended card
GPU_SLACK_MB = 1024  # CUDA context and allocator fragmentation beyond the reserved peak

# What every child runs: the script itself as __main__, then, at exit, its peak memory into a file.
CHILD = """
import atexit, json, os, runpy, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
def report():
    import torch
    from reporting import peak_rss_mb
    peak = {"rss_mb": peak_rss_mb(), "cuda": torch.cuda.is_available()}
    if peak["cuda"]:
        peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        peak["cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    with open(os.environ["PREFLIGHT_PEAK_FILE"], "w") as f:
        json.dump(peak, f)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Args(CommonArgs):
    # what to rehearse
    work_dir: str = field(default="runs/preflight", metadata={"help": "folder the rehearsal writes into"})
    dataset: str = field(
        default="Anthropic/hh-rlhf", metadata={"help": "as data_process.py --dataset: a hub id or a local copy"}
    )
    random_init: str = field(
        default="",
        metadata={"help": "a tokenizer folder: rehearse with a randomly initialised GPT-2 built with it (offline)"},
    )
    n_layer: int = field(default=12, metadata={"help": "--random_init: layers (GPT-2: 12)"})
    n_embd: int = field(default=768, metadata={"help": "--random_init: width (GPT-2: 768)"})
    n_head: int = field(default=12, metadata={"help": "--random_init: attention heads (GPT-2: 12)"})
    # how much of it
    steps: int = field(default=3, metadata={"help": "optimizer steps per training script"})
    eval_prompts: int = field(
        default=32, metadata={"help": "prompts (pairs) for evaluate_models.py and each script's final evaluation"}
    )
    data_rows: int = field(default=0, metadata={"help": "cut the data step short at N train and N test rows (0: off)"})
    max_accumulation: int = field(
        default=0, metadata={"help": "at most K micro-batches per optimizer step, time scaled up (0: the seed's)"}
    )
    # projection
    project_to: str = field(
        default="auto",
        metadata={
            "help": "data size of the projected full run: the data step's, hh-rlhf's published one, or auto "
            "(hh-rlhf when --data_rows cut the data step short)",
            "choices": ["auto", "dataset", "hh-rlhf"],
        },
    )


# ---------------------------------------------------------------------------
# Running one script
# ---------------------------------------------------------------------------


def seed_default(args_cls, name):
    """The seed's value of a script's setting: its `Args` default (the gpt2 preset)."""
    return next(f.default for f in fields(args_cls) if f.name == name)


def run_script(script, argv, log_path, env):
    """Run `script` with `argv` as its own process; returns wall time, peak memory and timestamped output lines.

    Output lines (tqdm's carriage-return updates count as lines) are stamped with the seconds since
    the start, so a phase's processing window can be told from its start-up.
    """
    peak_file = log_path.with_suffix(".peak.json")
    peak_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", CHILD, str(REPO / script), *map(str, argv)]
    child_env = {**env, "PREFLIGHT_PEAK_FILE": str(peak_file), "PYTHONUNBUFFERED": "1"}
    lines, start = [], time.time()
    with open(log_path, "w") as log:
        log.write(f"$ python {script} {' '.join(map(str, argv))}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env)
        pending = b""
        while chunk := proc.stdout.read1(65536):
            log.write(chunk.decode("utf-8", "replace"))
            pending += chunk
            *done, pending = re.split(rb"[\r\n]", pending)
            now = time.time() - start
            lines += [(now, line.decode("utf-8", "replace")) for line in done if line.strip()]
        returncode = proc.wait()
    wall = time.time() - start
    if returncode != 0:
        last = [text for _, text in lines if text.strip()][-1:] or ["(no output)"]
        raise UserError(f"{script} exited with status {returncode}: {last[0].strip()} (full log: {log_path})")
    return wall, json.loads(peak_file.read_text()), lines


def peak_mb(peak):
    """CUDA allocator peak on GPU, peak RSS on CPU."""
    return peak["cuda_peak_mb"] if peak["cuda"] else peak["rss_mb"]


def first_time(lines, pattern):
    return next((t for t, text in lines if re.search(pattern, text)), None)


def last_time(lines, pattern):
    return next((t for t, text in reversed(lines) if re.search(pattern, text)), None)


# ---------------------------------------------------------------------------
# Step times from metrics.jsonl
# ---------------------------------------------------------------------------


def step_records(records, key):
    """{step: record} of the training records: those of steps >= 1 that hold `key` (e.g. `train/loss`)."""
    return {r["step"]: r for r in records if r["step"] >= 1 and key in r}


def step_timing(records, key, eval_steps=(), eval_s=None):
    """Durations of each step from consecutive `time/elapsed_s` (the records holding `key`), the first apart.

    `eval_steps`: steps whose record includes an evaluation; with `eval_s` known, that time is taken off
    them, otherwise they are left out of the steady-state mean unless no other step is left.
    Returns first_step_s, steady_s (mean of the later steps, or the first when there is none), the steps
    the steady figure came from, and tokens per second over those steps.
    """
    by_step = step_records(records, key)
    steps = sorted(by_step)
    before = {s: ([r for r in records if r["step"] < s] or [None])[-1] for s in steps}
    durations, tokens = {}, {}
    for s in steps:
        prev = before[s]
        durations[s] = by_step[s]["time/elapsed_s"] - (prev["time/elapsed_s"] if prev else 0.0)
        tokens[s] = by_step[s]["tokens/processed"] - (prev["tokens/processed"] if prev else 0)
        if s in eval_steps and eval_s is not None:
            durations[s] = max(durations[s] - eval_s, 0.0)
    later = [s for s in steps[1:] if s not in eval_steps or eval_s is not None] or steps[1:] or steps[:1]
    steady = sum(durations[s] for s in later) / len(later)
    tokens_per_s = sum(tokens[s] for s in later) / max(sum(durations[s] for s in later), 1e-9)
    return {
        "first_step_s": round(durations[steps[0]], 3),
        "steady_steps": later,
        "steady_s": round(steady, 3),
        "tokens_per_s": round(tokens_per_s, 1),
    }


# ---------------------------------------------------------------------------
# The random-init model, the data sizes of the full run
# ---------------------------------------------------------------------------


def build_random_model(args, folder):
    """A randomly initialised GPT-2 (GPT2Config with --n_layer/--n_embd/--n_head) and the tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    check(Path(args.random_init).is_dir(), f"--random_init {args.random_init}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.random_init)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"--random_init {args.random_init}: cannot load a tokenizer from it ({reason})") from None
    eos = tokenizer.eos_token_id
    check(eos is not None, f"--random_init {args.random_init}: the tokenizer has no EOS token")
    check(args.n_embd % args.n_head == 0, f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built a random-init GPT-2 ({args.n_layer} layers, {args.n_embd} wide, {n_params / 1e6:.1f}M) in {folder}")
    return n_params


def data_sizes(work_dir, args):
    """Pairs per split in the full run, and where the numbers come from."""
    stats = json.loads((Path(work_dir) / PROCESSED_DIR / "stats.json").read_text())
    basis = args.project_to if args.project_to != "auto" else ("hh-rlhf" if args.data_rows else "dataset")
    rows = stats["rows"]
    if basis == "dataset":
        source = f"the data step on {args.dataset}: {rows['train']} train, {rows['validation']} validation, {rows['test']} test pairs after filtering"
        return {"basis": basis, "source": source, **rows}
    read, dropped = stats["rows_read"], stats["rows_dropped"]
    kept = {s: 1 - sum(dropped[s].values()) / read[s] for s in ("train", "test")}
    train_all = min(SEED_TRAIN_SUBSET, HH_RLHF_ROWS["train"]) * kept["train"]
    validation_share = rows["validation"] / (rows["train"] + rows["validation"])
    sizes = {
        "train": round(train_all * (1 - validation_share)),
        "validation": round(train_all * validation_share),
        "test": round(HH_RLHF_ROWS["test"] * kept["test"]),
    }
    source = (
        f"hh-rlhf's published size ({HH_RLHF_ROWS['train']:,} train / {HH_RLHF_ROWS['test']:,} test rows; the seed's "
        f"{SEED_TRAIN_SUBSET:,}-row train subset), filtered at the share this data step kept "
        f"({kept['train']:.3f} train, {kept['test']:.3f} test)"
    )
    return {"basis": basis, "source": source, **sizes}


# ---------------------------------------------------------------------------
# The phases: command line, then what is measured and projected
# ---------------------------------------------------------------------------


def accumulation(args, seed_value):
    return min(seed_value, args.max_accumulation) if args.max_accumulation else seed_value


def rehearsal_rows(args):
    """Pairs per split of the rehearsal's own processed_data/."""
    return json.loads((Path(args.work_dir) / PROCESSED_DIR / "stats.json").read_text())["rows"]


def phase_data(args, common, sizes, log_dir, env):
    """The data step as the full run makes it (unless --data_rows cuts it short); `sizes` is not used."""
    argv = [*common, "--dataset", args.dataset]
    if args.data_rows:
        argv += ["--train_subset", args.data_rows, "--test_subset", args.data_rows]
    wall, peak, lines = run_script("data_process.py", argv, log_dir / "data.log", env)
    from datasets import load_from_disk

    work = Path(args.work_dir)
    stats = json.loads((work / PROCESSED_DIR / "stats.json").read_text())
    data = load_from_disk(str(work / PROCESSED_DIR))
    max_length = stats["max_length"]
    rows_read = sum(stats["rows_read"].values())
    pairs, truncated, tokens = 0, 0, 0
    for split in data.values():
        for chosen, rejected in zip(split["input_ids_chosen"], split["input_ids_rejected"]):
            pairs += 1
            truncated += max(len(chosen), len(rejected)) >= max_length
            tokens += len(chosen) + len(rejected)
    # processing window: from the first filter bar to the end (start-up and loading the file before it)
    window = wall - (first_time(lines, r"^filter train") or 0.0)
    sizes = data_sizes(work, args)
    full_rows = (
        rows_read
        if sizes["basis"] == "dataset"
        else min(SEED_TRAIN_SUBSET, HH_RLHF_ROWS["train"]) + HH_RLHF_ROWS["test"]
    )
    return {
        "wall_s": round(wall, 2),
        "rows_read": rows_read,
        "pairs_kept": pairs,
        "s_per_1000_rows": round(window / rows_read * 1000, 3),
        "tokens_per_s": round(tokens / window, 1),
        "peak_mb": round(peak_mb(peak), 1),
        "truncated_pair_share": round(truncated / pairs, 4),
        "train_token_lengths": stats["train_token_lengths"],
        "projection": {
            "rows": full_rows,
            "startup_s": round(wall - window, 2),
            "s_per_1000_rows": round(window / rows_read * 1000, 3),
            "total_s": round(wall - window + full_rows * window / rows_read, 1),
            "formula": "startup_s + rows x s_per_1000_rows / 1000",
        },
        "full_run_data": sizes,
        "_peak": peak,
    }


def training_projection(timing, wall, loop_s, full_steps, scale, evals=0.0, rehearsal_evals=0.0):
    """overhead (start-up, saving) + warm-up surplus + full_steps x scaled step time + evaluations.

    The overhead is what the process spent outside its training loop (`loop_s`, the last record's
    `time/elapsed_s`) and outside the rehearsal's own evaluations after it (`rehearsal_evals`).
    """
    overhead = max(wall - loop_s - rehearsal_evals, 0.0)
    warmup = max(timing["first_step_s"] - timing["steady_s"], 0.0)
    s_per_step = timing["steady_s"] * scale
    return {
        "steps": full_steps,
        "s_per_step": round(s_per_step, 3),
        "warmup_s": round(warmup, 3),
        "overhead_s": round(overhead, 2),
        "eval_s": round(evals, 1),
        "total_s": round(overhead + warmup + full_steps * s_per_step + evals, 1),
        "formula": "overhead_s + warmup_s + steps x s_per_step + eval_s",
    }


def training_result(timing, peak, steps_run, projection, scale, wall):
    return {
        "wall_s": round(wall, 2),
        "steps_run": steps_run,
        "first_step_s": timing["first_step_s"],
        "s_per_step": round(timing["steady_s"] * scale, 3),
        "measured_s_per_step": timing["steady_s"],
        "steady_steps": timing["steady_steps"],
        "accumulation_scale": scale,
        "tokens_per_s": timing["tokens_per_s"],
        "peak_mb": round(peak_mb(peak), 1),
        "projection": projection,
        "_peak": peak,
    }


def phase_reward(args, common, sizes, log_dir, env):
    RM = reward_model_training.Args
    seed_accum = seed_default(RM, "gradient_accumulation_steps")
    accum = accumulation(args, seed_accum)
    argv = [*common, "--max_steps", args.steps, "--logging_steps", 1, "--gradient_accumulation_steps", accum]
    argv += ["--max_eval_samples", args.eval_prompts]
    wall, peak, _ = run_script("reward_model_training.py", argv, log_dir / "reward.log", env)
    records = read_metrics(Path(args.work_dir) / REWARD_MODEL_DIR / "metrics.jsonl")
    timing = step_timing(records, "train/loss")
    steps = step_records(records, "train/loss")
    last = steps[max(steps)]
    # HF Trainer evaluates on validation at the last step too: its time gives the seconds per pair
    final_eval = [r for r in records if "eval/loss" in r and r["step"] == last["step"]][-1]
    rows = rehearsal_rows(args)
    n_val, n_test = min(args.eval_prompts, rows["validation"]), min(args.eval_prompts, rows["test"])
    s_per_pair = (final_eval["time/elapsed_s"] - last["time/elapsed_s"]) / n_val
    batch = seed_default(RM, "per_device_train_batch_size")
    epochs = seed_default(RM, "num_train_epochs")
    full_steps = math.ceil(epochs * max(math.ceil(sizes["train"] / batch) // seed_accum, 1))  # HF Trainer's count
    n_evals = math.ceil(full_steps / seed_default(RM, "eval_steps"))  # every eval_steps and at the end
    eval_pairs = n_evals * sizes["validation"] + sizes["test"]
    projection = training_projection(
        timing, wall, last["time/elapsed_s"], full_steps, seed_accum / accum, eval_pairs * s_per_pair,
        (n_val + n_test) * s_per_pair,
    )  # fmt: skip
    projection |= {"evals": n_evals, "eval_pairs": eval_pairs, "eval_s_per_pair": round(s_per_pair, 4)}
    return training_result(timing, peak, max(steps), projection, seed_accum / accum, wall)


def phase_sft(args, common, sizes, log_dir, env):
    S = SFT_training.Args
    seed_accum = seed_default(S, "gradient_accumulation_steps")
    accum = accumulation(args, seed_accum)
    argv = [*common, "--max_steps", args.steps, "--logging_steps", 1, "--gradient_accumulation_steps", accum]
    argv += ["--max_eval_samples", args.eval_prompts]
    wall, peak, _ = run_script("SFT_training.py", argv, log_dir / "sft.log", env)
    records = read_metrics(Path(args.work_dir) / SFT_DIR / "metrics.jsonl")
    eval_s = next(r for r in records if r["step"] == 0)["time/elapsed_s"]  # the base model's validation loss
    eval_steps = [r["step"] for r in records if r["step"] >= 1 and "eval/loss" in r]
    timing = step_timing(records, "sft/loss", eval_steps, eval_s)
    s_per_reply = eval_s / min(args.eval_prompts, rehearsal_rows(args)["validation"])
    batch, epochs = seed_default(S, "per_device_train_batch_size"), seed_default(S, "num_train_epochs")
    full_steps = epochs * math.ceil(math.ceil(sizes["train"] / batch) / seed_accum)  # SFT_training's count
    every = seed_default(S, "eval_steps")
    n_evals = 1 + full_steps // every + (full_steps % every != 0)  # step 0, every eval_steps, the last step
    projection = training_projection(
        timing, wall, records[-1]["time/elapsed_s"], full_steps, seed_accum / accum,
        n_evals * sizes["validation"] * s_per_reply,
    )  # fmt: skip
    projection["evals"], projection["eval_s_per_reply"] = n_evals, round(s_per_reply, 4)
    return training_result(timing, peak, max(step_records(records, "sft/loss")), projection, seed_accum / accum, wall)


def phase_ppo(args, common, sizes, log_dir, env):
    argv = [*common, "--total_steps", args.steps, "--test_prompts", args.eval_prompts, "--eval_every", 0]
    wall, peak, _ = run_script("PPO_training.py", argv, log_dir / "ppo.log", env)
    records = read_metrics(Path(args.work_dir) / PPO_DIR / "metrics.jsonl")
    timing = step_timing(records, "objective/scores")
    full_steps = seed_default(PPO_training.Args, "total_steps")
    projection = training_projection(timing, wall, records[-1]["time/elapsed_s"], full_steps, 1.0)
    projection["note"] = (
        f"overhead_s holds the final evaluation at {args.eval_prompts} prompts (the seed's: 150); the held-out "
        "evaluations while training (--eval_every) are left out"
    )
    return training_result(timing, peak, max(step_records(records, "objective/scores")), projection, 1.0, wall)


def phase_grpo(args, common, sizes, log_dir, env):
    G = GRPO_training.Args
    argv = [*common, "--total_steps", args.steps, "--eval_prompts", args.eval_prompts]
    wall, peak, _ = run_script("GRPO_training.py", argv, log_dir / "grpo.log", env)
    records = read_metrics(Path(args.work_dir) / GRPO_FINAL_DIR / "metrics.jsonl")
    eval_s = next(r for r in records if r["step"] == 0)["time/elapsed_s"]  # the base model's evaluation
    eval_steps = [r["step"] for r in records if r["step"] >= 1 and "eval/reward" in r]
    timing = step_timing(records, "objective/scores", eval_steps, eval_s)
    full_steps, every = seed_default(G, "total_steps"), seed_default(G, "eval_every")
    n_evals = 1 + full_steps // every + (full_steps % every != 0)  # step 0, every eval_every, the last step
    n_prompts = min(seed_default(G, "eval_prompts"), sizes["validation"])
    s_per_prompt = eval_s / min(args.eval_prompts, rehearsal_rows(args)["validation"])
    projection = training_projection(
        timing, wall, records[-1]["time/elapsed_s"], full_steps, 1.0, n_evals * n_prompts * s_per_prompt
    )
    projection["evals"], projection["eval_s_per_prompt"] = n_evals, round(s_per_prompt, 4)
    return training_result(timing, peak, max(step_records(records, "objective/scores")), projection, 1.0, wall)


def phase_dpo(args, common, sizes, log_dir, env):
    D = DPO_training.Args
    seed_accum = seed_default(D, "gradient_accumulation_steps")
    accum = accumulation(args, seed_accum)
    argv = [*common, "--max_steps", args.steps, "--logging_steps", 1, "--gradient_accumulation_steps", accum]
    argv += ["--max_eval_samples", args.eval_prompts, "--eval_every", 0]  # the held-out generations: not timed
    wall, peak, _ = run_script("DPO_training.py", argv, log_dir / "dpo.log", env)
    records = read_metrics(Path(args.work_dir) / DPO_DIR / "metrics.jsonl")
    eval_steps = [r["step"] for r in records if "eval/loss" in r]
    timing = step_timing(records, "dpo/loss", eval_steps)
    # the final evaluation's time: the last step less a plain step's (0 when no plain step was timed)
    steps = step_records(records, "dpo/loss")
    last = steps[max(steps)]["time/elapsed_s"] - (steps[max(steps) - 1]["time/elapsed_s"] if max(steps) > 1 else 0)
    plain = timing["steady_s"] if set(timing["steady_steps"]) - set(eval_steps) else last
    n_eval = min(args.eval_prompts, rehearsal_rows(args)["validation"])
    s_per_pair = max(last - plain, 0.0) / n_eval
    batch, epochs = seed_default(D, "per_device_train_batch_size"), seed_default(D, "num_train_epochs")
    full_steps = epochs * math.ceil(math.ceil(sizes["train"] / batch) / seed_accum)  # DPO_training's count
    every = seed_default(D, "eval_steps")
    n_evals = full_steps // every + (full_steps % every != 0)
    projection = training_projection(
        timing, wall, records[-1]["time/elapsed_s"], full_steps, seed_accum / accum,
        n_evals * sizes["validation"] * s_per_pair,
    )  # fmt: skip
    projection["evals"], projection["eval_s_per_pair"] = n_evals, round(s_per_pair, 4)
    return training_result(timing, peak, max(steps), projection, seed_accum / accum, wall)


def phase_evaluate(args, common, sizes, log_dir, env):
    argv = [*common, "--num_prompts", args.eval_prompts]
    wall, peak, lines = run_script("evaluate_models.py", argv, log_dir / "evaluate.log", env)
    records = [json.loads(line) for line in (Path(args.work_dir) / evaluate_models.RESPONSES_JSONL).open()]
    models = [k.removesuffix("_length") for k in records[0] if k.endswith("_length")]
    reply_tokens = sum(r[f"{m}_length"] for r in records for m in models)
    # sampling window: from the start of the first model's sampling to the end of the last one's
    start = first_time(lines, r"^evaluating base")
    end = last_time(lines, r"^evaluate \w+: 100%")
    window = (end - start) if start is not None and end is not None else wall
    s_per_item = window / (len(records) * len(models))
    total = wall - window + EVAL_FULL_PROMPTS * EVAL_MODELS * s_per_item
    return {
        "wall_s": round(wall, 2),
        "prompts": len(records),
        "models": models,
        "s_per_prompt_and_model": round(s_per_item, 3),
        "tokens_per_s": round(reply_tokens / window, 1),
        "tokens_counted": "reply tokens sampled",
        "peak_mb": round(peak_mb(peak), 1),
        "projection": {
            "prompts": EVAL_FULL_PROMPTS,
            "models": EVAL_MODELS,
            "overhead_s": round(wall - window, 2),
            "s_per_prompt_and_model": round(s_per_item, 3),
            "total_s": round(total, 1),
            "formula": "overhead_s + prompts x models x s_per_prompt_and_model",
        },
        "_peak": peak,
    }


PHASES = {
    "data": phase_data,
    "sft": phase_sft,
    "reward_model": phase_reward,
    "ppo": phase_ppo,
    "grpo": phase_grpo,
    "dpo": phase_dpo,
    "evaluation": phase_evaluate,
}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def table(report):
    gpu = report["machine"]["cuda"]
    head = ["phase", "steps", "first step", "s/step", "tokens/s", "peak MB", "full run", "projected"]
    head += [f"fits {g} GB" for g in GPU_SIZES_GB] if gpu else []
    rows = [head, ["---"] * len(head)]
    for name, r in report["phases"].items():
        p = r["projection"]
        if name == "data":
            cells = [
                name,
                f"{r['rows_read']} rows",
                "",
                f"{r['s_per_1000_rows']:.2f} /1k rows",
                f"{r['tokens_per_s']:.0f}",
            ]
            size = f"{p['rows']:,} rows"
        elif name == "evaluation":
            cells = [name, f"{r['prompts']} x {len(r['models'])}", "", f"{r['s_per_prompt_and_model']:.2f} /prompt"]
            cells += [f"{r['tokens_per_s']:.0f}"]
            size = f"{p['prompts']} x {p['models']}"
        else:
            scaled = f" (x{r['accumulation_scale']:g})" if r["accumulation_scale"] != 1 else ""
            cells = [name, str(r["steps_run"]), f"{r['first_step_s']:.1f}", f"{r['s_per_step']:.1f}{scaled}"]
            cells += [f"{r['tokens_per_s']:.0f}"]
            size = f"{p['steps']:,} steps"
        cells += [f"{r['peak_mb']:.0f}", size, duration(p["total_s"])]
        cells += ["yes" if r["fits_gb"][str(g)] else "no" for g in GPU_SIZES_GB] if gpu else []
        rows.append(cells)
    total = sum(r["projection"]["total_s"] for r in report["phases"].values())
    rows.append(["total", "", "", "", "", "", "", duration(total)] + ([""] * len(GPU_SIZES_GB) if gpu else []))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def machine_info():
    import torch

    info = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    return info


def main(args):
    check(args.preset == "gpt2", "the preflight rehearses the gpt2 preset's run: drop --preset")
    check(args.steps >= 1, f"--steps must be at least 1, got {args.steps}")
    check(args.eval_prompts >= 1, f"--eval_prompts must be at least 1, got {args.eval_prompts}")
    check(args.data_rows >= 0 and args.max_accumulation >= 0, "--data_rows and --max_accumulation must be >= 0")
    check(min(args.n_layer, args.n_embd, args.n_head) >= 1, "--n_layer, --n_embd and --n_head must be positive")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model, n_params = args.model, None
    if args.random_init:
        model = str((work / "random_gpt2").resolve())
        n_params = build_random_model(args, model)
    else:
        looks_like_path = model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") > 1
        check(not looks_like_path or Path(model).is_dir(), f"--model {model}: no such folder")
        from common import load_tokenizer

        load_tokenizer(model)  # a missing tokenizer fails here, in one line, not minutes into the data step
    log_dir = work / "preflight_logs"
    log_dir.mkdir(exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    common = ["--work_dir", work.resolve(), "--model", model, "--seed", args.seed]
    report = {
        "machine": machine_info(),
        "model": model,
        "model_parameters": n_params,
        "dataset": args.dataset,
        "settings": {k: getattr(args, k) for k in ("steps", "eval_prompts", "data_rows", "max_accumulation")},
        "phases": {},
    }
    sizes = None
    for name, phase in PHASES.items():
        print(f"== {name} ...", flush=True)
        t0 = time.time()
        result = phase(args, common, sizes, log_dir, env)
        if name == "data":
            sizes = report["full_run_data"] = result.pop("full_run_data")
        peak = result.pop("_peak")
        if peak["cuda"]:
            result["reserved_mb"] = round(peak["cuda_reserved_mb"], 1)
            result["fits_gb"] = {str(g): peak["cuda_reserved_mb"] + GPU_SLACK_MB <= g * 1024 for g in GPU_SIZES_GB}
        report["phases"][name] = result
        print(
            f"   done in {time.time() - t0:.0f} s; projected for the full run: {duration(result['projection']['total_s'])}"
        )
        atomic_write_json(work / "preflight.json", report)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["projected_total_s"] = round(sum(r["projection"]["total_s"] for r in report["phases"].values()), 1)
    atomic_write_json(work / "preflight.json", report)

    m = report["machine"]
    print(
        f"\npreflight {m['date']} on {m['device']}, {m['torch_threads']} torch thread(s), load average "
        f"{m['load_average_start'][0]} -> {m['load_average_end'][0]}; model {model}; data {args.dataset}"
    )
    print(f"full run sized from {sizes['source']}")
    if args.max_accumulation:
        print(
            f"--max_accumulation {args.max_accumulation}: s/step of the scaled phases is measured x (seed accumulation / {args.max_accumulation})"
        )
    print(table(report))
    print(f"wrote {work / 'preflight.json'}")


if __name__ == "__main__":
    run(main, Args)
