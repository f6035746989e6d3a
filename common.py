"""What the algorithms share, written once: the RLHF core every script reads the same way.

No algorithm lives here (each loss stays in its own script). This module holds what must be *identical*
across scripts, because copies that drift are how RLHF code breaks:

* the data rules: `filter_edge_cases`, `split_conversation`, `join_conversation`, `load_preference_data`,
  `load_processed_data`;
* tokenizer and model loading/saving (`load_tokenizer`, `load_causal_lm`, `load_reward_model`,
  `save_pretrained_atomic`);
* seeding, device/precision and CPU memory (`set_seed`, `precision`, `make_accelerator`, `release_cpu_memory`);
* the forward pass under left padding (`forward`, `position_ids_from_mask`), masked log-probs, entropy,
  `masked_mean`/`masked_whiten`;
* sampling with EOS masking (`generate_responses`) and reward scoring (`get_reward`), so PPO, GRPO and
  evaluation score exactly as the reward model was trained; the adaptive KL controller.

The run's plumbing lives beside it: `lifecycle.py` (flags, presets, checkpoints, resume, atomic writes) and
`reporting.py` (metrics log, plots, trackers, model cards).
"""

import ctypes
import functools
import gzip
import json
import os
import random
import shutil
import sys
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lifecycle import (
    GOLD_REWARD_MODEL_DIR,
    GOLD_SPLIT,
    OFFLINE_HINT,
    PROCESSED_DIR,
    REWARD_MODEL_DIR,
    SFT_DIR,
    START_FILE,
    TENSORBOARD_DIR,
    TINY_DATA_DIR,
    UserError,
    atomic_write_json,
    check,
    command,
    damage,
    first_line,
    offline,
    replace_folder,
    resolve_model_name,
    trackers,
)

hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": a bar per load, noise at our sizes


# The seed's character limit: 1024 tokens x ~6 characters per token.
CHAR_LIMIT = 1024 * 6
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
FILTER_RULES = ("tie", "short", "length_ratio", "char_limit", "unsplittable", "prompts_differ", "empty_reply")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# The autocast dtype of each precision (None: no autocast) and accelerate's / Trainer's name for it.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def precision(device=None):
    """This machine's compute precision and why, as (name, reason): bf16 autocast on a GPU with native bf16 (Ampere
    and newer); fp16 autocast with a gradient scaler on an older GPU (T4, V100, RTX 20xx), whose bf16 is emulated
    without tensor cores and refused by the fused attention kernels; fp32 on a CPU. With `device`, that device's:
    a model kept on the CPU of a GPU machine computes in fp32. `RLHF_CPU_BF16=1` asks for bf16 autocast on a CPU
    that computes bf16 natively (AMX or AVX512-BF16): 1.8x faster for SmolLM2-135M (docs/benchmarks.md), while the
    tiny model gains nothing and its figures would lose their exactness, so it is the real rehearsal's choice only."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        if os.environ.get("RLHF_CPU_BF16", "0") == "0":
            return "fp32", "a CPU: fp32"
        if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
            return "bf16", "RLHF_CPU_BF16=1 on a CPU with native bf16: bf16 autocast"
        return "fp32", "RLHF_CPU_BF16=1, but this CPU has no native bf16 (AMX or AVX512-BF16): fp32"
    gpu = (
        f"{torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
    )
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", f"{gpu} computes bf16 natively: bf16 autocast"
    return "fp16", f"{gpu} has no native bf16: fp16 autocast with a gradient scaler"


def trainer_precision():
    """`precision()` as Trainer's (and TRL's) flags: {"bf16": ..., "fp16": ...}; Trainer brings fp16's scaler.
    Trainer takes bf16 on a CPU (RLHF_CPU_BF16) only when told that it trains there (`use_cpu`)."""
    name = precision()[0]
    cpu_bf16 = {"use_cpu": True} if name == "bf16" and not torch.cuda.is_available() else {}
    return {"bf16": name == "bf16", "fp16": name == "fp16"} | cpu_bf16


def autocast(device):
    """Every forward pass's precision (the one policy of docs/code_layout.md): `precision()`'s autocast, entered by
    `forward` and around whole `generate` calls, so the trainers, their rollouts and the evaluation compute one
    sample's log-probs, KL and scores identically. fp32 (no autocast) on a CPU."""
    dtype = AUTOCAST_DTYPES[precision(device)[0]]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def freeze(model):
    """A frozen model (the reference, the reward models, evaluated policies): eval mode, no gradients, and under
    a 16-bit `precision()` its matrix-product weights stored in that dtype once instead of cast by autocast at
    every forward (gpt2: 170 MB less per model). Only the weights autocast would cast anyway are cast (`nn.Linear`,
    GPT-2's `Conv1D`); embeddings, norms and `FP32Linear` heads stay fp32, so the outputs are bit for bit the
    fp32 model's under autocast. Call it on the model where it computes (after `.to(device)`). Returns it."""
    from transformers.pytorch_utils import Conv1D

    model.eval().requires_grad_(False)
    dtype = AUTOCAST_DTYPES[precision(next(model.parameters()).device)[0]]
    if dtype is not None:
        for module in model.modules():
            if type(module) in (torch.nn.Linear, Conv1D):
                module.to(dtype)
    return model


def adamw(parameters, learning_rate, weight_decay, device):
    """The hand-written loops' AdamW, fused on a GPU: one kernel for every parameter, not one per tensor."""
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=device.type == "cuda")


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _resident_bytes():
    """This process's resident memory now (Linux's /proc/self/statm), or None where there is no /proc."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# Below this resident size a trim hands back little and costs much: the freed pages are faulted in again at the
# next step (the tiny reward model, 0.6 GB, ran 18% slower trimmed at every step).
TRIM_ABOVE_BYTES = 2**30


def release_cpu_memory(device):
    """After an optimizer step on a CPU, hand the C heap's free pages back to the system (glibc's `malloc_trim(0)`)
    when the process holds at least `TRIM_ABOVE_BYTES`; returns whether it did. Without it a CPU run's resident
    memory grows step after step at fixed batch sizes (the freed activations' blocks stay with the process):
    SmolLM2's reward model reached 8.1 GiB in 60 steps without it, 6.6 GiB with it, the same model
    (docs/real_rehearsal.md). Nothing on a GPU or off glibc."""
    trim = _malloc_trim() if torch.device(device).type == "cpu" else None
    if trim is None:
        return False
    resident = _resident_bytes()
    if resident is not None and resident < TRIM_ABOVE_BYTES:  # None: no /proc to ask, so trim
        return False
    trim(0)
    return True


def load_optimizer_state(optimizer, state):
    """`optimizer.load_state_dict(state)`, keeping this machine's fused choice: a checkpoint written on a CPU says
    fused=False (a GPU run resumed from it would step unfused), one written on a GPU says fused=True. Set before
    loading, so the step counters land where the fused kernel wants them."""
    groups = [
        {**saved, "fused": group.get("fused")} for saved, group in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


def make_accelerator(args=None, run_dir=None):
    """The hand-written loops' Accelerator in this machine's `precision()` (said in one line), with --report_to's
    trackers (TensorBoard writes run_dir/tensorboard/)."""
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker

    names = trackers(args) if args is not None else []
    log_with = [TensorBoardTracker(TENSORBOARD_DIR, run_dir) if name == "tensorboard" else name for name in names]
    name, reason = precision()
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[name], log_with=log_with or None)
    if accelerator.is_main_process and (accelerator.device.type == "cuda" or "RLHF_CPU_BF16" in reason):
        print(f"precision: {reason}")
    return accelerator


def unwrap(model):
    """The bare model under a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------
# Data rules
# ---------------------------------------------------------------------------


def split_conversation(text):
    """Split an hh-rlhf conversation into (prompt, final reply).

    Rule: find the last "\\n\\nHuman:" and the last "\\n\\nAssistant:". If there is no
    Human turn, or no Assistant turn after the last Human turn, return None. Otherwise
    the prompt is everything up to and including that last "\\n\\nAssistant:", and the
    response is the rest with its leading white space stripped (the data has one space
    after "Assistant:"). `join_conversation` is the inverse.
    """
    human = text.rfind(HUMAN)
    assistant = text.rfind(ASSISTANT)
    if human < 0 or assistant < human:
        return None
    cut = assistant + len(ASSISTANT)
    return text[:cut], text[cut:].lstrip()


def join_conversation(prompt, response):
    """The one way every script builds a full text from a prompt and a reply."""
    return prompt + " " + response


def drop_reason(example, scope="full", char_limit=CHAR_LIMIT):
    """The first rule (in FILTER_RULES order) that drops this pair, or None to keep it.

    scope "full" applies the length rules to the whole chosen/rejected strings, as the
    seed did; scope "response" applies them to the final replies only.
    """
    chosen, rejected = example["chosen"], example["rejected"]
    if chosen == rejected:
        return "tie"
    split_c, split_r = split_conversation(chosen), split_conversation(rejected)
    if scope == "response":
        if split_c is None or split_r is None:
            return "unsplittable"
        chosen, rejected = split_c[1], split_r[1]
    if len(chosen) < 10 or len(rejected) < 10:
        return "short"
    if not 0.5 <= len(chosen) / len(rejected) <= 2.0:
        return "length_ratio"
    if len(chosen) >= char_limit or len(rejected) >= char_limit:
        return "char_limit"
    if split_c is None or split_r is None:
        return "unsplittable"
    if split_c[0] != split_r[0]:
        return "prompts_differ"
    if not split_c[1] or not split_r[1]:
        return "empty_reply"
    return None


def filter_edge_cases(example, scope="full", char_limit=CHAR_LIMIT):
    """True when the pair survives every rule of `drop_reason` (for `Dataset.filter`)."""
    return drop_reason(example, scope, char_limit) is None


def _read_jsonl(path):
    try:
        return _parse_jsonl(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} of a line cannot be decoded)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a complete gzip file ({e or type(e).__name__})") from None


def _parse_jsonl(path):
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not (
                isinstance(row, dict) and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)
            ):
                raise UserError(f"{path}:{lineno}: expected an object with string fields 'chosen' and 'rejected'")
            rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
    return rows


def _split_file(folder, split):
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_preference_data(source):
    """hh-rlhf-style pairs as a DatasetDict with a `train` and (where present) a `test` split.

    `source` is a hub id (`Anthropic/hh-rlhf`), a `.jsonl`/`.jsonl.gz` file (one
    `train` split), a folder with `train.jsonl(.gz)` and `test.jsonl(.gz)`, or a folder
    of such subset folders (the official repository's layout), concatenated in name order.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    path = Path(source)
    if path.is_file():
        return DatasetDict(train=Dataset.from_list(_read_jsonl(path)))
    if path.is_dir():
        folders = [path] if _split_file(path, "train") else sorted(p for p in path.iterdir() if _split_file(p, "train"))
        if not folders:
            raise UserError(f"--dataset {source}: no train.jsonl(.gz) in it or in any folder inside it")
        splits = {}
        for split in ("train", "test"):
            files = [f for f in (_split_file(p, split) for p in folders) if f]
            if files:
                splits[split] = Dataset.from_list([row for f in files for row in _read_jsonl(f)])
        return DatasetDict(splits)
    if source.endswith((".jsonl", ".gz", ".json")) or source.startswith((".", "/", "~")):
        raise UserError(f"--dataset {source}: no such file or folder")
    try:
        return load_dataset(source)
    except Exception as e:  # offline, wrong id, ...: say what to do instead
        raise UserError(
            f"--dataset {source}: could not load it from the Hugging Face Hub ({type(e).__name__}); "
            "offline, pass --preset tiny, or a local folder with train.jsonl.gz and test.jsonl.gz"
        ) from None


def test_prompt_sample(test, n, seed):
    """A seeded sample of `n` test prompts (all, when fewer), in split order: (indices, prompts). PPO's final
    evaluation and evaluate_models.py both take it, so their base scores are on the same prompts."""
    indices = sorted(random.Random(seed).sample(range(len(test)), min(n, len(test))))
    return indices, list(test.select(indices)["prompt"])


def load_processed_data(args, same_tokenizer=False):
    """`processed_data/` written by data_process.py, checked against this run's base model (`same_tokenizer`:
    any model whose tokenizer is the one that built it, as a larger gold reward model's)."""
    from datasets import load_from_disk

    folder = Path(args.work_dir) / PROCESSED_DIR
    rebuild = command("data_process.py", args)
    if not (folder / "stats.json").is_file():
        raise UserError(f"{folder} not found: build it first with `{rebuild}`")
    try:
        built_with = json.loads((folder / "stats.json").read_text())["base_model"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / 'stats.json'} is damaged (no base_model in it): rebuild with `{rebuild}`") from None
    if built_with != resolve_model_name(args.model) and not (
        same_tokenizer and load_tokenizer(built_with).get_vocab() == load_tokenizer(args.model).get_vocab()
    ):
        raise UserError(
            f"{folder} was tokenized for base model {built_with!r}, not {resolve_model_name(args.model)!r}: "
            f"rebuild it with `{rebuild}`"
        )
    try:
        return load_from_disk(str(folder))
    except Exception as e:  # a missing split or index file, a truncated arrow file, garbage JSON: all damage
        why = f"{type(e).__name__}: {first_line(e)[:120]}"
        raise UserError(f"{folder} is damaged ({why}): rebuild it with `{rebuild}`") from None


# ---------------------------------------------------------------------------
# Tokenizer and models
# ---------------------------------------------------------------------------


def load_tokenizer(name_or_path):
    """The base model's tokenizer as every script uses it: EOS as pad, left padding, left truncation.

    Left truncation keeps a long conversation's final turn (its start is lost instead);
    `save_pretrained` records both sides, so whoever loads a saved model gets them too.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise UserError(
            f"--model {name_or_path}: cannot load a tokenizer from it ({first_line(e)}){OFFLINE_HINT * offline()}"
        ) from None
    check(
        tokenizer.eos_token is not None, f"--model {name_or_path}: its tokenizer has no EOS token to end replies with"
    )
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def fused_activation(name_or_path):
    """`from_pretrained` settings that load GPT-2-family weights with `gelu_pytorch_tanh`, the one-kernel form of
    their `gelu_new` (the same function within 3e-7): `gelu_new` is about eight elementwise kernels whose fp32
    intermediates autocast keeps for backward, about twice the activation memory. {} for other models."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "gpt2" and config.activation_function == "gelu_new":
        return {"activation_function": "gelu_pytorch_tanh"}
    return {}


class FP32Linear(torch.nn.Linear):
    """An output head (the LM head, a reward model's score, PPO's value head) computed in fp32 even under autocast.

    Under bf16 autocast a head's output would be rounded to bf16: GPT-2's raw logits are tens, where bf16's step is
    0.125-0.5 (log-probs from them are off by as much), and a reward beyond 4 moves in steps of 0.03 (equal rewards
    inside a GRPO group, quantised PPO value targets). The body stays in the autocast dtype; only the head, one
    matrix product, runs in fp32. Without autocast (a CPU here) it is exactly `nn.Linear`."""

    def forward(self, hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def fp32_head(head):
    """Make a loaded `nn.Linear` head an `FP32Linear` in place (its weights untouched); returns it."""
    if type(head) is torch.nn.Linear:
        head.__class__ = FP32Linear
    return head


PROMPT_AND_REPLY = "--max_prompt_length + --max_new_tokens"


def check_positions(config, tokens, what):
    """A one-line error when `what` needs more positions (`tokens`) than the model has (`max_position_embeddings`:
    GPT-2's n_positions, a Llama's or Qwen2's context length): GPT-2 would index past its position table, a rotary
    model would read positions it never trained on."""
    positions = getattr(config, "max_position_embeddings", None)
    check(
        positions is None or tokens <= positions, f"{what} ({tokens} tokens) exceeds the model's {positions} positions"
    )


def load_causal_lm(name_or_path, tokenizer):
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **fused_activation(name_or_path))
    except OSError as e:
        hint = OFFLINE_HINT * offline()
        raise UserError(f"cannot load a causal LM from {name_or_path} ({first_line(e)}){hint}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    fp32_head(model.get_output_embeddings())  # log-probs from fp32 logits
    return model


def start_model(args, run_dir, is_main=True):
    """What a policy starts from and its reference model is (InstructGPT): `sft_model/` or the base model, by
    `--init_from` (auto: sft_model/ when the work dir has one). Records the choice in `args.init_from` (so args.json
    and the card say it) and in runs/<name>/start.json, which a --resume follows: its reference stays the one it
    started with, even if an SFT model was trained since. Returns the folder or hub id to load."""
    sft, record = Path(args.work_dir) / SFT_DIR, Path(run_dir) / START_FILE
    choice = args.init_from
    if args.resume and record.is_file():
        started = json.loads(record.read_text())["init_from"]
        check(
            choice in ("auto", started),
            f"--init_from {choice}: the run being resumed started from {started}; resume with --init_from {started}",
        )
        choice = started
    elif choice == "auto":
        choice = "sft" if (sft / "config.json").is_file() else "base"
    if choice == "sft":
        train = command("SFT_training.py", args)
        check((sft / "config.json").is_file(), f"--init_from sft: {sft} not found: train it first with `{train}`")
        weights = sft / "model.safetensors"
        check(damage(weights) is None, f"{weights} is {damage(weights)}: retrain it with `{train}`")
    if is_main:
        if not args.resume:
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record, {"init_from": choice})
        where = f"{sft} (the SFT model)" if choice == "sft" else f"the base model {args.model}"
        print(f"starting from {where} (--init_from {args.init_from}); the reference model is the same")
    args.init_from = choice
    return str(sft) if choice == "sft" else resolve_model_name(args.model)


def load_reward_model(work_dir, device, args=None, gold=False):
    """The frozen reward model from `final_reward_model/` (`gold`: `final_gold_reward_model/`), in eval mode, and
    its tokenizer.

    `args` (the calling run's) makes the hint to train it name the same preset and model."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(work_dir) / (GOLD_REWARD_MODEL_DIR if gold else REWARD_MODEL_DIR)
    train = (
        command("reward_model_training.py", args) if args else f"python reward_model_training.py --work_dir {work_dir}"
    ) + (f" --train_split {GOLD_SPLIT}" if gold else "")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} not found: train it first with `{train}`")
    weights = folder / "model.safetensors"
    if why := damage(weights):
        raise UserError(f"{weights} is {why}: retrain it with `{train}`")
    model = AutoModelForSequenceClassification.from_pretrained(folder, **fused_activation(folder)).to(device)
    fp32_head(model.score)  # rewards in fp32
    return freeze(model), load_tokenizer(folder)


def save_pretrained_atomic(folder, model, tokenizer, extra=None):
    """save_pretrained (safetensors) into a temporary folder, then rename it into place.

    `extra` maps file names to callables that write them into the temporary folder
    (settings, metrics, a value head), so the final folder appears complete or not at all.
    """
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, write in (extra or {}).items():
        write(tmp / name)
    replace_folder(tmp, folder)


# ---------------------------------------------------------------------------
# Supervised batches: prompt + reply token ids, left padded (SFT and DPO)
# ---------------------------------------------------------------------------


def tokenize_pairs(split, tokenizer, keys=("chosen", "rejected")):
    """Every pair as token ids: its prompt's, and each reply's (`keys`: `chosen` for SFT, both for DPO) as the rest of
    `join_conversation(prompt, reply)`.

    GPT-2's pre-tokenizer splits before the space that opens the reply, so the joined
    text's tokens start with the prompt's own; a tokenizer that merges across that
    boundary would make the reply's log-probs ill-defined, and is refused.
    """
    prompts = tokenizer(list(split["prompt"]))["input_ids"]
    pairs = [{"idx": i, "prompt": ids} for i, ids in enumerate(prompts)]
    for key in keys:
        texts = [join_conversation(p, r) for p, r in zip(split["prompt"], split[f"{key}_response"])]
        for pair, ids in zip(pairs, tokenizer(texts)["input_ids"]):
            n = len(pair["prompt"])
            check(
                ids[:n] == pair["prompt"],
                f"--model {tokenizer.name_or_path}: its tokenizer merges the prompt's last token with the reply's first "
                f"(pair {pair['idx']}), so the reply's tokens are not a suffix of the conversation's",
            )
            pair[key] = ids[n:]
    return pairs


def build_sequence(prompt_ids, reply_ids, eos_token_id, max_seq_len):
    """prompt + reply + EOS in at most `max_seq_len` tokens: (ids, reply mask).

    A reply too long by itself is cut from the right (and so loses its EOS); the
    prompt keeps at least one token, which predicts the reply's first token, and is cut
    from the left so that it keeps its final "Assistant:".
    """
    reply_ids = (reply_ids + [eos_token_id])[: max_seq_len - 1]
    prompt_ids = prompt_ids[-(max_seq_len - len(reply_ids)) :]
    return prompt_ids + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)


def collate_pairs(pairs, eos_token_id, max_seq_len, padding_side="left", keys=("chosen", "rejected")):
    """A batch of B pairs as B x len(keys) padded rows, each key's in turn (DPO: chosen first then rejected: (2B, T)
    tensors; SFT: the chosen rows alone), idx (B,) and
    `context_length`, the first column holding a reply token (a Python int: on a GPU, reading it from `loss_mask`
    would wait for the device at every micro-batch).

    The pad token is EOS: what is padding comes from `attention_mask`, what is scored from
    `loss_mask` (the reply and its EOS), never from comparing ids with the pad id.
    """
    rows = [build_sequence(p["prompt"], p[key], eos_token_id, max_seq_len) for key in keys for p in pairs]
    width = max(len(ids) for ids, _ in rows)

    def pad(seq, value):
        fill = [value] * (width - len(seq))
        return fill + seq if padding_side == "left" else seq + fill

    loss_mask = torch.tensor([pad(mask, 0) for _, mask in rows])  # (2B, T)
    return {
        "input_ids": torch.tensor([pad(ids, eos_token_id) for ids, _ in rows]),  # (2B, T)
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows]),  # (2B, T)
        "loss_mask": loss_mask,
        "idx": torch.tensor([p["idx"] for p in pairs]),  # (B,)
        "context_length": int(loss_mask.any(0).long().argmax()),
    }


def pair_length(pair, max_seq_len):
    """The width a pair pads its batch to: its longest row, prompt + reply + EOS, at most `max_seq_len` tokens."""
    longest = max(len(ids) for key, ids in pair.items() if key not in ("idx", "prompt"))
    return min(len(pair["prompt"]) + longest + 1, max_seq_len)


class EpochShuffle(Sampler):
    """A fresh permutation per epoch, seeded by (seed, epoch): every process and a resumed run see the same order.

    With `lengths` (each pair's `pair_length`), grouped by length as Trainer's `group_by_length` does: the
    permutation is cut into windows of 50 batches (of `batch_size` pairs: all processes' together), each sorted
    longest first, so that a batch pads to about its own pairs' length rather than to the longest of the split.
    The same pairs in every epoch; which pairs share a batch is still shuffled from epoch to epoch.
    """

    def __init__(self, n, seed, lengths=None, batch_size=1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.window = lengths, 50 * batch_size

    def set_epoch(self, epoch):  # accelerate's prepared loader forwards `set_epoch` to its sampler
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        if self.lengths is None:
            yield from order
            return
        for start in range(0, self.n, self.window):
            yield from sorted(order[start : start + self.window], key=lambda i: -self.lengths[i])


def disable_dropout(model):
    """Dropout off (as TRL's DPO and SFT do): the policy at step 0 equals its reference, and losses measure training."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------
# Forward passes under left padding, log-probs and masked statistics
# ---------------------------------------------------------------------------


def position_ids_from_mask(attention_mask):
    """GPT-2's positions are absolute: under left padding they must start at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids, attention_mask, **kwargs):
    """A forward pass with position ids taken from the attention mask (any padding side), in `autocast`."""
    with autocast(input_ids.device):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            **kwargs,
        )


def gather_logprobs(logits, labels):
    """log p(label) under `logits`: (B, T, V), (B, T) -> (B, T), computed in fp32."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits):
    """Entropy of the categorical distribution at every position: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# Floats of logits the LM head writes at once in `response_logprobs` (128 MB in fp32): gpt2's 50,257-word head
# runs on 667 reply tokens per chunk; a small vocabulary in one chunk.
LOGITS_CHUNK = 2**25


def _head_logprobs(head, hidden, labels, temperature, with_entropy):
    """One chunk of `response_logprobs`: the LM head in fp32 (`FP32Linear`'s product, whatever the head's class),
    then log p(label) and (with_entropy) the entropy."""
    logits = FP32Linear.forward(head, hidden)
    if temperature != 1.0:  # at 1 no division: it would copy the chunk for nothing
        logits = logits / temperature
    logprobs = gather_logprobs(logits, labels)
    return logprobs, entropy_from_logits(logits) if with_entropy else logprobs.new_zeros(())


def response_logprobs(model, input_ids, attention_mask, context_length, temperature=1.0, entropy=False):
    """log p of each token after the first `context_length` under the model at `temperature`: (B, T - c), and with
    `entropy=True` the entropy of each of those positions' distributions (B, T - c), else None; and the output.

    The LM head runs here, on the final hidden state, in fp32 and a chunk of reply tokens at a time: the full
    (B, T - c, V) logits never exist at once (gpt2: 200 KB a token in fp32, 0.8 GiB per DPO pair of 511-token
    replies, three times that in backward). Under autograd each chunk is recomputed in backward (activation
    checkpointing: one more head product, about 10% of a gpt2 step) instead of stored. Works for any Hugging Face
    causal LM whose `hidden_states[-1]` is the normed state its head reads (GPT-2, Llama, Qwen2: tested).
    """
    from torch.utils.checkpoint import checkpoint

    head = unwrap(model).get_output_embeddings()
    # logits_to_keep=1: the model's own head runs on one position only; the hidden states are what we read
    output = forward(model, input_ids, attention_mask, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = output.hidden_states[-1][:, context_length - 1 : -1]  # (B, R, H): predicts tokens c .. T - 1
    labels = input_ids[:, context_length:]  # (B, R)
    shape = labels.shape
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk = max(1, LOGITS_CHUNK // head.weight.shape[0])
    logprobs, entropies = [], []
    for start in range(0, labels.shape[0], chunk):
        part = (head, hidden[start : start + chunk], labels[start : start + chunk])
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_head_logprobs, *part, temperature, entropy, use_reentrant=False)
        else:
            lp, ent = _head_logprobs(*part, temperature, entropy)
        logprobs.append(lp)
        entropies.append(ent)
    logprobs = torch.cat(logprobs).view(shape)
    return logprobs, torch.cat(entropies).view(shape) if entropy else None, output


def last_token_index(attention_mask):
    """Index of each row's last real token, for left or right padding: (B, T) -> (B,)."""
    return attention_mask.shape[1] - 1 - attention_mask.long().flip(-1).argmax(-1)


def masked_mean(values, mask, dim=None):
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values, mask):
    """Unbiased variance of the masked entries."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    return masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def masked_whiten(values, mask, shift_mean=True):
    """Normalise the masked entries to mean 0 (unless shift_mean=False) and variance 1."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------


def response_mask_from_eos(response_ids, eos_token_id):
    """1 for every response token up to and including the first EOS, 0 after it: (B, R).

    The pad token is the EOS token, so this is the only reliable way to find where a
    response ends: comparing ids with the pad id would also drop a real final EOS.
    """
    is_eos = (response_ids == eos_token_id).long()
    after_first_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_first_eos).long()


# A reply that writes one of these has begun a new turn of the conversation (an instruct model in the hh
# "Human:/Assistant:" format rarely emits its EOS and writes the user's next line itself): it ends there.
NEW_TURNS = (HUMAN, ASSISTANT)


def _turn_stop(tokenizer):
    """`generate`'s stopping criterion for NEW_TURNS, built once per tokenizer (it indexes the whole vocabulary)."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    if "_turn_stop" not in tokenizer.__dict__:
        tokenizer.__dict__["_turn_stop"] = StopStringCriteria(tokenizer, list(NEW_TURNS))
    return tokenizer.__dict__["_turn_stop"]


def end_at_new_turns(response_ids, tokenizer):
    """Replies cut where they begin a new turn, the turn's first token replaced by EOS and what follows by padding
    (EOS): in place on `response_ids` (B, R). Returns each row's reply text (stripped).

    From here on such a reply *is* one that ended with EOS: its mask, its reward (read on the text before the new
    turn), `response/eos_share` and its length are an EOS-ended reply's, and training raises the log-prob of EOS
    where the policy began a new turn (the end of its reply, as OpenRLHF appends EOS to replies a stop string
    ended). The text is decoded from the kept tokens, so what the reward model reads is what the policy wrote.
    """
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    is_eos = response_ids == tokenizer.eos_token_id
    ends = torch.where(is_eos.any(1), is_eos.long().argmax(1), response_ids.shape[1]).tolist()  # first EOS or R
    for row, text in enumerate(texts):
        if not any(turn in text for turn in NEW_TURNS):
            continue
        text = tokenizer.decode(response_ids[row, : ends[row]], skip_special_tokens=True)  # before its own EOS
        starts = [i for i in (text.find(turn) for turn in NEW_TURNS) if i >= 0]
        if not starts:
            texts[row] = text
            continue
        # the first token whose decoded prefix reaches the new turn's first character (prefix lengths grow with k)
        lo, hi = 0, ends[row] - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(response_ids[row, : mid + 1], skip_special_tokens=True)) > min(starts):
                hi = mid
            else:
                lo = mid + 1
        response_ids[row, lo:] = tokenizer.eos_token_id
        texts[row] = tokenizer.decode(response_ids[row, :lo], skip_special_tokens=True)
    return [text.strip() for text in texts]


@dataclass
class Samples:
    """A batch of sampled responses; row i answers prompts[i // num_return_sequences]."""

    query_ids: torch.Tensor  # (B, P) left padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right padded after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    prompts: list
    responses: list  # decoded reply text, as `join_conversation` expects it

    @property
    def input_ids(self):  # (B, P + R)
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self):  # (B, P + R)
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def ended(self, eos_token_id):
        """(B,) bool: the reply ended, with an EOS in it (or a new turn made one); False for one cut at
        max_new_tokens. The padding after an EOS is EOS too, so the EOS must lie within the reply's mask."""
        return (self.response_ids.eq(eos_token_id) & self.response_mask.bool()).any(1)


# --compile_generation: prompts are left padded to a multiple of COMPILE_PAD tokens (one compiled graph per width
# and batch size, not one per prompt length), and the decode step is compiled with this backend and mode (inductor
# with CUDA graphs on a GPU; tests use a light backend).
COMPILE_PAD = 64
COMPILE_BACKEND, COMPILE_MODE = "inductor", "reduce-overhead"


def _pad_left(enc, width, pad_token_id):
    """Left pad a tokenizer batch to `width` columns: ids with the pad id, the mask with 0."""
    extra = width - enc["input_ids"].shape[1]
    if extra <= 0:
        return enc
    return {
        "input_ids": torch.nn.functional.pad(enc["input_ids"], (extra, 0), value=pad_token_id),
        "attention_mask": torch.nn.functional.pad(enc["attention_mask"], (extra, 0), value=0),
    }


def _kept_static_cache(model, rows, length):
    """--compile_generation's KV cache for `rows` sequences of up to `length` tokens, kept on the model and emptied
    for each call: CUDA graphs replay on fixed addresses, and a fresh cache per call (what `generate` makes) would
    make them record again every time. One per row count (each holds 2 x layers x rows x length x width values)."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_kept_static_caches", {})
    if (rows, length) not in caches:
        caches[(rows, length)] = StaticCache(config=model.config, max_cache_len=length)
    caches[(rows, length)].reset()
    return caches[(rows, length)]


@torch.no_grad()
def sequence_kl(policy, base, samples, temperature):
    """Per-sample KL estimate: sum over reply tokens of log pi(a_t) - log pi_base(a_t): (B,). A model scored against
    itself has KL 0, without the forward passes."""
    if base is policy:
        return torch.zeros(len(samples.input_ids), device=samples.input_ids.device)
    inputs = (samples.input_ids, samples.attention_mask, samples.query_ids.shape[1], temperature)
    logprobs, _, _ = response_logprobs(policy, *inputs)  # (B, R)
    ref_logprobs, _, _ = response_logprobs(base, *inputs)  # (B, R)
    return ((logprobs - ref_logprobs) * samples.response_mask).sum(-1)  # (B,)


def generate_responses(
    model,
    tokenizer,
    prompts,
    max_prompt_length,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    num_return_sequences=1,
    do_sample=True,
    compile=False,
):
    """Sample replies to `prompts` in one batched, KV-cached `generate` call, in one `autocast`.

    Prompts are left padded and truncated from the left (they keep their final
    "Assistant:"); `top_k=0` so Hugging Face's default top-k of 50 does not silently
    truncate the distribution the log-probs are computed under. Each prompt is encoded
    once and expanded to `num_return_sequences` samples inside `generate`; the KV cache is
    a static one, allocated once for prompt and reply. `compile=True` (--compile_generation) pads the prompts to a
    multiple of COMPILE_PAD tokens and compiles the decode step (on a GPU with CUDA graphs: a decode step of gpt2
    is about 580 small kernels, launch-bound in eager mode); its samples are the eager path's (tests/test_common.py).
    """
    from transformers import CompileConfig

    device = next(unwrap(model).parameters()).device
    prompts = list(prompts)  # a datasets 5 column is a lazy object the tokenizer refuses
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length)
    longest = enc["input_ids"].shape[1]
    if compile:
        width = min(-(-longest // COMPILE_PAD) * COMPILE_PAD, max(max_prompt_length, 1))
        enc = _pad_left(enc, width, tokenizer.pad_token_id)
    enc = {k: v.to(device) for k, v in enc.items()}
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    )
    if compile:
        config = CompileConfig(backend=COMPILE_BACKEND, mode=COMPILE_MODE if device.type == "cuda" else "default")
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        cache = _kept_static_cache(
            unwrap(model), len(prompts) * num_return_sequences, max_prompt_length + max_new_tokens
        )
        sampling |= dict(compile_config=config, disable_compile=False, cache=cache)
    else:  # a static cache, one buffer for the whole reply instead of a copy per token: the same samples, 22% faster
        # on the tiny model (150 prompts x 64 tokens: 3.0 s -> 2.35 s); no torch.compile, which a static cache turns
        # on by default on a GPU (a recompile per length)
        sampling |= dict(disable_compile=True, cache_implementation="static")
    with autocast(device):  # one autocast for the whole call: the policy's weight casts are cached across tokens
        sequences = unwrap(model).generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=[_turn_stop(tokenizer)],  # a row that began a new turn stops (cut below)
            **sampling,
        )
    context_length = enc["input_ids"].shape[1]
    response_ids = sequences[:, context_length:]  # (B, R)
    # the columns --compile_generation added hold padding only: the samples leave without them, so the log-probs,
    # scores and updates that follow compute no more than the eager path's (positions come from the mask)
    enc = {k: v[:, context_length - longest :] for k, v in enc.items()}
    # After its first EOS a finished row holds only pad (= EOS) tokens, which decoding skips.
    texts = end_at_new_turns(response_ids, tokenizer)
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    return Samples(
        query_ids=enc["input_ids"].repeat_interleave(num_return_sequences, 0),
        query_mask=enc["attention_mask"].repeat_interleave(num_return_sequences, 0),
        response_ids=response_ids,
        response_mask=response_mask,
        prompts=[p for p in prompts for _ in range(num_return_sequences)],
        responses=texts,
    )


def reward_scores(reward_model, input_ids, attention_mask):
    """The reward model's score at each row's last real token: (B, T) -> (B,).

    Hugging Face's sequence classifier pools at the rightmost token that is not the pad
    id; with GPT-2 the pad id is EOS, so a text that ends in EOS, or a right-padded
    batch, would be read at the wrong place. We read the per-token scores of the head
    (`score`) and pick the last real token from the attention mask instead. Works for
    a DDP-wrapped model too (the forward still goes through the wrapper).
    """
    captured = []
    handle = unwrap(reward_model).score.register_forward_hook(lambda module, inputs, out: captured.append(out))
    try:
        forward(reward_model, input_ids, attention_mask)
    finally:
        handle.remove()
    per_token = captured[0].squeeze(-1)  # (B, T)
    return per_token[
        torch.arange(per_token.shape[0], device=per_token.device), last_token_index(attention_mask)
    ].float()


@torch.no_grad()
def get_reward(reward_model, tokenizer, prompts, responses, max_length, batch_size=32):
    """Score `join_conversation(prompt, response)` texts exactly as the reward model was trained: (N,)."""
    device = next(reward_model.parameters()).device
    texts = [join_conversation(p, r) for p, r in zip(list(prompts), list(responses))]
    scores = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        scores.append(reward_scores(reward_model, enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    return torch.cat(scores)


# ---------------------------------------------------------------------------
# Reward functions: what PPO and GRPO maximise (--reward_funcs, --reward_weights, --missing_eos_penalty)
# ---------------------------------------------------------------------------


def load_oracle(work_dir):
    """The tiny world's oracle (`assets/tiny_oracle.py`) when processed_data/ holds the bundled tiny data, else None."""
    stats = json.loads((Path(work_dir) / PROCESSED_DIR / "stats.json").read_text())
    if Path(stats["dataset"]).resolve() != TINY_DATA_DIR.resolve():
        return None
    from assets import tiny_oracle

    return tiny_oracle


def user_reward_func(spec):
    """`module:function` (importable from the working directory or the Python path) as a checked function that
    takes (prompts, replies), lists of strings, and returns one float per reply."""
    import importlib
    import inspect

    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:  # a script's sys.path starts at its own folder, not at the working directory
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or an error inside the module: its one line
        raise UserError(f"--reward_funcs {spec}: cannot import {module_name} ({first_line(e)})") from None
    function = getattr(module, name, None)
    check(callable(function), f"--reward_funcs {spec}: {module_name} has no function {name!r}")
    try:
        inspect.signature(function).bind(["prompt"], ["reply"])
    except ValueError:  # no signature to read (a builtin): its first call checks it
        pass
    except TypeError:
        raise UserError(
            f"--reward_funcs {spec}: {name}{inspect.signature(function)} cannot be called as {name}(prompts, replies)"
        ) from None
    return function


class RewardMix:
    """The reward PPO and GRPO maximise: sum_k weight_k x reward_k(prompt, reply) over `--reward_funcs`, less
    `--missing_eos_penalty` for a reply that hit `--max_new_tokens` without ending (TRL's name and meaning).

    `model` is the proxy reward model (final_reward_model/, the default and the seed's only reward), `gold` the
    held-out gold one, `oracle` the tiny world's truth (1 for a real answer, `assets/tiny_oracle.py`), `length`
    minus the reply's tokens (its weight is the penalty per token), `module:function` the user's own. Calling it
    returns the rewards (N,) and each function's raw values (for `reward/<name>`)."""

    def __init__(self, args, device, proxy=None):
        names = [name.strip() for name in args.reward_funcs.split(",")]
        try:
            weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else [1.0] * len(names)
        except ValueError:
            raise UserError(f"--reward_weights {args.reward_weights}: expected a comma list of numbers") from None
        check(
            len(weights) == len(names),
            f"--reward_weights has {len(weights)} weights for {len(names)} --reward_funcs ({args.reward_funcs})",
        )
        check(len(set(names)) == len(names), f"--reward_funcs {args.reward_funcs}: a function named twice")
        self.weights, self.functions, self.penalty = dict(zip(names, weights)), {}, args.missing_eos_penalty
        self.models = {}  # name: (model, tokenizer) of the reward models it holds ("model", "gold")
        for name in names:
            if name in ("model", "gold"):
                model, tokenizer = (
                    proxy
                    if name == "model" and proxy
                    else load_reward_model(args.work_dir, device, args, gold=name == "gold")
                )
                check_positions(model.config, args.reward_max_length, "--reward_max_length")
                self.models[name] = model, tokenizer
                self.functions[name] = partial(get_reward, model, tokenizer, max_length=args.reward_max_length)
            elif name == "oracle":
                oracle = load_oracle(args.work_dir)
                check(oracle is not None, "--reward_funcs oracle: the oracle knows the tiny data only (--preset tiny)")
                self.functions[name] = partial(_oracle_rewards, oracle)
            elif name == "length":
                self.functions[name] = None  # minus the reply's tokens, from the samples
            elif ":" in name:
                self.functions[name] = user_reward_func(name)
            else:
                raise UserError(
                    f"--reward_funcs {name}: unknown; expected model, gold, oracle, length or module:function"
                )

    def describe(self):
        """The mix in words, for logs and model cards: "1 x model + 0.01 x length"."""
        mix = " + ".join(f"{w:g} x {name}" for name, w in self.weights.items())
        return mix + (f", less {self.penalty:g} for a reply that never ended" if self.penalty else "")

    def __call__(self, samples, tokenizer):
        """The rewards of `samples` (a `Samples`): (N,) on the samples' device, and {name: (N,)} raw values."""
        device = samples.response_ids.device
        ended = samples.ended(tokenizer.eos_token_id)
        parts = {}
        for name, function in self.functions.items():
            if function is None:
                values = -(samples.response_mask.sum(1) - ended.long()).float()  # reply tokens, not the EOS
            else:
                values = function(samples.prompts, samples.responses)
                if name not in ("model", "gold"):  # a user's function (or the oracle's): checked at every call
                    values = _checked_rewards(name, values, len(samples.responses))
            parts[name] = values.to(device).float()
        total = sum(self.weights[name] * values for name, values in parts.items())
        return total - self.penalty * (~ended).float(), parts


def _oracle_rewards(oracle, prompts, replies):
    return [float(oracle.judge(p, r) == "good") for p, r in zip(prompts, replies)]


def _checked_rewards(name, values, n):
    """A user function's return value as a tensor, or a one-line error naming the function and what was wrong."""
    try:
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):  # not numbers, or a tensor of more than one number per reply
        raise UserError(f"--reward_funcs {name}: expected a list of {n} numbers, got {type(values).__name__}") from None
    check(len(values) == n, f"--reward_funcs {name}: returned {len(values)} rewards for {n} replies")
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"--reward_funcs {name}: reward {values[bad[0]].item()} (not finite) for reply {bad[0]}")
    return values


class AdaptiveKLController:
    """Ziegler et al. (2019), eq. 2: move the KL coefficient beta toward a target KL.

    e_t = clip(KL_t / target - 1, -0.2, 0.2);  beta <- beta * (1 + K_beta * e_t),
    with K_beta = n_steps / horizon, n_steps the samples in this update. KL is the
    per-sequence sum over response tokens, the unit `target` is given in.
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon
