"""What every script of the pipeline shares, written once.

No algorithm lives here (each loss stays in its own script). This module holds what
must be *identical* across scripts, because copies that drift are how RLHF code breaks:

* presets and command-line parsing (`CommonArgs`, `parse_args`, `run`);
* the data rules: `filter_edge_cases`, `split_conversation`, `join_conversation`,
  `load_preference_data`, `load_processed_data`;
* tokenizer and model loading/saving (`load_tokenizer`, `save_pretrained_atomic`);
* the forward pass under left padding (`forward`, `position_ids_from_mask`), masked
  log-probs, entropy, `masked_mean`/`masked_whiten`;
* sampling with EOS masking (`generate_responses`) and reward scoring (`get_reward`),
  so PPO, GRPO and evaluation score exactly as the reward model was trained;
* seeding, device/precision, checkpoints, the metrics log and its plot;
* tracking and sharing: `--report_to` trackers, model cards, `--push_to_hub`.
"""

import argparse
import gzip
import importlib.util
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": a bar per load, noise at our sizes

REPO_DIR = Path(__file__).resolve().parent
ASSETS_DIR = REPO_DIR / "assets"
TINY_MODEL_DIR = ASSETS_DIR / "tiny_gpt2"
TINY_DATA_DIR = ASSETS_DIR / "tiny_hh"

# Each preset names its base model and data set; per-script sizes live beside each
# script's Args (its `TINY` dict), so every knob stays visible where it is used.
PRESETS = {
    "gpt2": {"model": "gpt2", "dataset": "Anthropic/hh-rlhf"},
    "tiny": {"model": str(TINY_MODEL_DIR), "dataset": str(TINY_DATA_DIR)},
}

# The seed's character limit: 1024 tokens x ~6 characters per token.
CHAR_LIMIT = 1024 * 6
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
FILTER_RULES = ("tie", "short", "length_ratio", "char_limit", "unsplittable", "prompts_differ", "empty_reply")

# Output folders, as every script and the evaluation name them.
PROCESSED_DIR = "processed_data"
GOLD_SPLIT = "gold_train"  # processed_data/'s pairs for the gold reward model alone (data_process.py --gold_share)
REWARD_MODEL_DIR = "final_reward_model"
GOLD_REWARD_MODEL_DIR = "final_gold_reward_model"
PPO_DIR = "ppo_rlhf_model"
GRPO_BEST_DIR = "grpo_best"
GRPO_FINAL_DIR = "grpo_rlhf_model"
DPO_DIR = "dpo_rlhf_model"
RUN_ID_FILE = "run.json"  # {"run_id": ...} in both GRPO folders: evaluation tells a pair from two runs


# Printed when --resume finds the run's last checkpoint: the training is done, its end is not.
FINISHING = ": its last step; finishing the final evaluation and save"


class UserError(Exception):
    """A mistake in the user's input or set-up: shown as one line, no traceback."""


# ---------------------------------------------------------------------------
# Settings and command line
# ---------------------------------------------------------------------------


@dataclass
class CommonArgs:
    """Flags every script takes. Each script's `Args` extends this dataclass."""

    preset: str = field(
        default="gpt2",
        metadata={"help": "gpt2: real model and data (hub); tiny: offline, CPU-sized", "choices": list(PRESETS)},
    )
    work_dir: str = field(default=".", metadata={"help": "folder holding every stage's inputs and outputs"})
    seed: int = field(default=42, metadata={"help": "seed for python, numpy, torch and data shuffles"})
    model: str = field(default="gpt2", metadata={"help": "base model: hub id or local path (tiny: bundled)"})


@dataclass
class TrainArgs(CommonArgs):
    """Flags every training script takes besides CommonArgs: trackers and the Hub."""

    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers, a comma list of tensorboard, wandb, trackio (metrics.jsonl is always written)"
        },
    )
    push_to_hub: str = field(
        default=None,
        metadata={
            "help": "upload the finished model folder, card included, to this Hub repo (user/name); needs HF_TOKEN"
        },
    )


class _Parser(HfArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(args_cls, tiny=None, argv=None):
    """Parse `argv` into `args_cls`; with `--preset tiny`, `tiny` overrides the defaults.

    Flags given on the command line always win over a preset. Unknown flags and bad
    values exit with status 2 and a one-line message naming them.
    """
    parser = _Parser(args_cls, allow_abbrev=False)  # `--total_step 5` is a mistake, not --total_steps
    for action in parser._actions:  # argparse %-formats help texts: a literal "95%" must be "95%%"
        if action.option_strings[0].startswith("--no_"):  # HfArgumentParser copies the positive flag's help
            # "%(default).0s" prints nothing, and keeps the formatter from adding this action's "(default: False)"
            action.help = f"turn off --{action.option_strings[0][5:]}%(default).0s"
        elif action.help:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    argv = sys.argv[1:] if argv is None else list(argv)
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--preset", default=args_cls.__dataclass_fields__["preset"].default)
    preset = peek.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        parser.error(f"argument --preset: invalid choice {preset!r} (choose from {', '.join(PRESETS)})")
    fields = set(args_cls.__dataclass_fields__)
    defaults = {k: v for k, v in PRESETS[preset].items() if k in fields}
    if preset == "tiny":
        defaults.update(tiny or {})
    parser.set_defaults(**defaults)
    (args, rest) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def run(main, args_cls, tiny=None, checkpoint=None):
    """The `__main__` entry of every script: parse, run, and turn user errors into one line.

    `checkpoint(args)` is where a training script's last checkpoint is (None for the others): Ctrl-C then
    says whether --resume has something to continue from."""
    args = parse_args(args_cls, tiny)
    started = time.time()
    signal.signal(signal.SIGTERM, stop_as_interrupted)  # how run_pipeline.sh stops the stages beside another
    try:
        check_work_dir(args.work_dir)
        use_cache_if_hub_unreachable(args)
        if isinstance(args, TrainArgs):  # before any training: a missing tracker or a Hub problem is one line now
            trackers(args)
            check_push(args)
        main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(interrupted(args, checkpoint, started))
    except Exception as e:  # Ctrl-C inside an import arrives wrapped (e.g. "Error calling __set_name__")
        if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
            sys.exit(interrupted(args, checkpoint, started))
        raise


def stop_as_interrupted(signum, frame):
    """SIGTERM (`kill`, or run_pipeline.sh stopping the stages beside an interrupted one) ends a run as Ctrl-C does."""
    raise KeyboardInterrupt


def interrupted(args, checkpoint, started):
    """What to do after Ctrl-C: --resume from this run's checkpoint (written since it started, or the one it
    resumed from), or start over."""
    path = checkpoint(args) if checkpoint else None
    if path is not None and path.exists() and (args.resume or path.stat().st_mtime >= started):
        return f"interrupted: rerun the same command with --resume to continue from {path}"
    if checkpoint:
        return "interrupted before the first checkpoint: rerun the same command, without --resume, to start over"
    return "interrupted: nothing was left half-written; rerun the same command"


def check_work_dir(work_dir):
    """At start-up, before hours of work: --work_dir must be a folder (or creatable) and writable."""
    path = Path(work_dir)
    check(not path.exists() or path.is_dir(), f"--work_dir {path} is a file, not a folder")
    if path.is_symlink() and not path.exists():
        raise UserError(f"--work_dir {path} is a link to {path.readlink()}, which is missing")
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:  # a real write: permissions alone say nothing about a read-only mount, or to root
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"--work_dir {path}: cannot write in {existing} ({e.strerror})") from None


OFFLINE_HINT = (
    "; the Hugging Face Hub cannot be reached from here: pass --preset tiny (bundled, offline), or a local "
    "--model folder and --dataset"
)


def offline():
    import huggingface_hub.constants

    return huggingface_hub.constants.HF_HUB_OFFLINE


def use_cache_if_hub_unreachable(args):
    """Without a network, the hub client retries for about 50 s before it fails. Probe the Hub once (3 s)
    when the run names a hub model or data set; if it cannot be reached, read only the local cache: a
    cached model still loads, a missing one fails at once, with OFFLINE_HINT."""
    import huggingface_hub.constants

    names = [getattr(args, key, None) for key in ("model", "dataset")]
    if offline() or all(name is None or Path(name).exists() for name in names):
        return
    host = re.sub(r"^\w+://", "", huggingface_hub.constants.ENDPOINT).split("/")[0]
    try:
        socket.create_connection(
            (host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout=3
        ).close()
    except OSError:
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # for datasets, which reads it when first imported
        print(f"{host} cannot be reached: reading models and data sets from the local cache only")


def first_line(error):
    """An exception's first line, for a one-line message (its type when it has no message)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check(condition, message):
    """Fail at start-up with a one-line message when a derived setting is wrong."""
    if not condition:
        raise UserError(message)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def use_bf16():
    """bf16 autocast where the GPU supports it; plain fp32 on CPU."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def make_accelerator(args=None, run_dir=None):
    """The hand-written loops' Accelerator, with --report_to's trackers (TensorBoard writes run_dir/tensorboard/)."""
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker

    names = trackers(args) if args is not None else []
    log_with = [TensorBoardTracker(TENSORBOARD_DIR, run_dir) if name == "tensorboard" else name for name in names]
    return Accelerator(mixed_precision="bf16" if use_bf16() else "no", log_with=log_with or None)


def unwrap(model):
    """The bare model under a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def save_args(args, path):
    atomic_write_json(path, vars(args))


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


def resolve_model_name(name):
    """What `from_pretrained` takes: an absolute path for a local folder, else the hub id."""
    return str(Path(name).resolve()) if Path(name).exists() else name


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
# Tokenizer, models, files
# ---------------------------------------------------------------------------


def load_tokenizer(name_or_path):
    """GPT-2 tokenizer as every script uses it: EOS as pad, left padding, left truncation.

    Left truncation keeps a long conversation's final turn (its start is lost instead);
    `save_pretrained` records both sides, so whoever loads a saved model gets them too.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise UserError(
            f"--model {name_or_path}: cannot load a tokenizer from it ({first_line(e)}){OFFLINE_HINT * offline()}"
        ) from None
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def load_causal_lm(name_or_path, tokenizer):
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except OSError as e:
        hint = OFFLINE_HINT * offline()
        raise UserError(f"cannot load a causal LM from {name_or_path} ({first_line(e)}){hint}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def damage(path):
    """Why a saved file cannot be read back (missing, truncated, garbage), or None when it is whole.

    Cheap checks that read no tensors: a safetensors header that covers the file, a torch file's zip
    directory (written last), JSON that parses.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt"):
                pass
        elif path.suffix in (".pt", ".pth") and not zipfile.is_zipfile(path):
            return "incomplete (cut short?)"
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as e:  # safetensors, JSON and decoding errors alike
        return f"unreadable ({first_line(e)[:80]})"
    return None


def command(script, args):
    """The command that runs `script` for the same run: its preset, work dir and (where not the preset's) model."""
    words = ["python", script, "--preset", args.preset, "--work_dir", str(args.work_dir)]
    if resolve_model_name(args.model) != resolve_model_name(PRESETS[args.preset]["model"]):
        words += ["--model", args.model]
    return shlex.join(words)


def command_for_work_dir(script, work_dir):
    """`command(script, ...)` for the run in `work_dir`: the preset and model its models were trained with (their
    args.json), or None where none of its folders has one."""
    from types import SimpleNamespace

    for path in sorted(Path(work_dir).glob("*/args.json")):
        saved = json.loads(path.read_text())
        if saved.get("preset") in PRESETS and saved.get("model"):
            return command(script, SimpleNamespace(preset=saved["preset"], model=saved["model"], work_dir=work_dir))
    return None


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
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(folder)


def atomic_write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def replace_folder(tmp, final):
    """Move a finished `tmp` folder to `final`; an earlier `final` is kept as `final.prev`."""
    final = Path(final)
    prev = final.with_name(final.name + ".prev")
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        final.rename(prev)
        print(f"kept the previous {final.name} as {prev}")
    Path(tmp).rename(final)


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
# Forward passes under left padding, log-probs and masked statistics
# ---------------------------------------------------------------------------


def position_ids_from_mask(attention_mask):
    """GPT-2's positions are absolute: under left padding they must start at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids, attention_mask, **kwargs):
    """A forward pass with position ids taken from the attention mask (any padding side)."""
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


def response_logits(model, input_ids, attention_mask, context_length, temperature=1.0, **kwargs):
    """Logits that predict each token after the first `context_length`: (B, T - context_length, V).

    Position t of the result is the distribution the model used for token
    `context_length + t`, divided by the sampling temperature. Returns (logits, output).
    """
    # logits_to_keep: the LM head runs only on the positions we read, not on the whole
    # prompt (for gpt2 that is 50257 floats saved per prompt token).
    keep = input_ids.shape[1] - context_length + 1
    output = forward(model, input_ids, attention_mask, logits_to_keep=keep, **kwargs)
    return output.logits[:, :-1] / temperature, output


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


@torch.no_grad()
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
):
    """Sample replies to `prompts` in one batched, KV-cached `generate` call.

    Prompts are left padded and truncated from the left (they keep their final
    "Assistant:"); `top_k=0` so Hugging Face's default top-k of 50 does not silently
    truncate the distribution the log-probs are computed under. Each prompt is encoded
    once and expanded to `num_return_sequences` samples inside `generate`; the KV cache is
    a static one, allocated once for prompt and reply.
    """
    device = next(unwrap(model).parameters()).device
    prompts = list(prompts)  # a datasets 5 column is a lazy object the tokenizer refuses
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length)
    enc = {k: v.to(device) for k, v in enc.items()}
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    )
    sequences = unwrap(model).generate(
        **enc,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        cache_implementation="static",  # one buffer for the whole reply instead of a copy per token: the same
        disable_compile=True,  # samples, 22% faster on the tiny model (150 prompts x 64 tokens: 3.0 s -> 2.35 s);
        **sampling,  # no torch.compile, which a static cache turns on by default on a GPU (a recompile per length)
    )
    context_length = enc["input_ids"].shape[1]
    response_ids = sequences[:, context_length:]  # (B, R)
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    # After its first EOS a finished row holds only pad (= EOS) tokens, which decoding skips.
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Samples(
        query_ids=enc["input_ids"].repeat_interleave(num_return_sequences, 0),
        query_mask=enc["attention_mask"].repeat_interleave(num_return_sequences, 0),
        response_ids=response_ids,
        response_mask=response_mask,
        prompts=[p for p in prompts for _ in range(num_return_sequences)],
        responses=[t.strip() for t in texts],
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16() and device.type == "cuda"):
            scores.append(reward_scores(reward_model, enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    return torch.cat(scores)


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


# ---------------------------------------------------------------------------
# Checkpoints, metrics and plots
# ---------------------------------------------------------------------------


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """torch.save to a temporary name, then rename: an interrupted save never corrupts the last one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({**state, "rng": rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """The state `save_checkpoint` wrote, with the random generators restored; a damaged file is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        rng = state.pop("rng")
    except Exception as e:  # truncated (a full disk), overwritten, not ours
        raise UserError(
            f"{path} is damaged ({type(e).__name__}: {first_line(e)[:100]}): it cannot be resumed; "
            "start afresh without --resume"
        ) from None
    set_rng_state(rng)
    return state


SNAPSHOTS_DIR = "snapshots"  # runs/<name>/snapshots/step-N/: policy-only snapshots for the evaluation's frontier


def snapshots(run_dir):
    """The complete snapshots in `run_dir`: [(step, folder)], in step order."""
    found = [(re.fullmatch(r"step-(\d+)", p.name), p) for p in (Path(run_dir) / SNAPSHOTS_DIR).glob("step-*")]
    # not a killed save's step-N.tmp-PID/, nor a folder without its config
    return sorted((int(m.group(1)), p) for m, p in found if m and (p / "config.json").is_file())


def snapshot_due(step, total_steps, every):
    """A snapshot is kept every `every` steps (0: never), but not at the last: the final model is that point."""
    return bool(every) and 0 < step < total_steps and step % every == 0


def save_snapshot(run_dir, step, policy):
    """A policy-only snapshot (safetensors + config, no optimizer state) at runs/<name>/snapshots/step-N/.

    Written before the step's checkpoint, so a checkpoint at step N always has the snapshots up to N."""
    folder = Path(run_dir) / SNAPSHOTS_DIR / f"step-{step}"
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(policy).save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def sync_snapshots(run_dir, step, total_steps, every, policy):
    """Make runs/<name>/snapshots/ what an uninterrupted run has at `step`: at a fresh start (step 0) an earlier
    run's snapshots go; at a resume from step N those written after the checkpoint go (the resumed run writes
    them again), and N's own is written from the checkpoint's weights when a shorter run ended there (its
    last step's snapshot was its final model). Leftovers of a killed save go with `remove_leftovers`."""
    remove_leftovers(Path(run_dir) / SNAPSHOTS_DIR)
    kept = set()
    for at, folder in snapshots(run_dir):
        if at > step:
            shutil.rmtree(folder)
        else:
            kept.add(at)
    if snapshot_due(step, total_steps, every) and step not in kept:
        save_snapshot(run_dir, step, policy)


def check_resumable(path):
    """--resume at start-up, before any model loads: an intact checkpoint must be at `path`."""
    why = damage(path)
    check(why != "missing", f"--resume: no checkpoint at {path}; start without --resume")
    check(why is None, f"--resume: {path} is {why}: it cannot be resumed; start afresh without --resume")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(*folders):
    """Delete the temporary files and folders (`NAME.tmp-PID...`) that killed runs left in `folders`.

    Every atomic write here goes through such a name and renames it when complete, so one whose process
    no longer exists is a half-written leftover (13 MB on tiny, ~1.5 GB for a gpt2 checkpoint).
    """
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.tmp-*")):
            match = re.fullmatch(r".+\.tmp-(\d{1,9})(\.\w+)?", path.name)
            if not match or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            print(f"removed {path}: left by a run that was killed (process {match.group(1)})")


def peak_rss_mb():
    """This process's peak resident memory.

    On Linux it is read from /proc/self/status (VmHWM): `getrusage`'s ru_maxrss carries over the peak
    of the process that forked this one, so a script started by a large process (a test runner, the
    preflight) would report that process's memory as its own.
    """
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb():
    """Peak memory so far: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`, with the cost so far.

    Each record carries `time/elapsed_s`, `tokens/processed` (tokens through forward
    passes, generation included) and `mem/peak_mb`. On resume the file is cut back to
    the checkpoint's step and the counters continue from its last record. With `tracker`
    (an Accelerator holding --report_to's trackers) each record goes to them as well.
    """

    def __init__(self, path, resume_step=None, enabled=True, keep_records=None, tracker=None):
        self.path, self.enabled, self.tracker = Path(path), enabled, tracker
        self.tokens, self.elapsed_before, self.records = 0, 0.0, 0
        self.start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = []
        if resume_step is not None and self.path.exists():
            # `keep_records`: how many records the checkpoint had seen, where a step can log after its checkpoint
            records = read_metrics(self.path)[:keep_records]
            records = [r for r in records if r["step"] <= resume_step]
            if records:
                self.tokens = records[-1]["tokens/processed"]
                self.elapsed_before = records[-1]["time/elapsed_s"]
        self.records = len(records)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def add_tokens(self, n):
        self.tokens += int(n)

    def log(self, step, metrics):
        record = {
            "step": step,
            **{k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()},
            "time/elapsed_s": round(self.elapsed_before + time.time() - self.start, 3),
            "tokens/processed": self.tokens,
            "mem/peak_mb": round(peak_memory_mb(), 1),
        }
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.records += 1
            if self.tracker is not None:  # --report_to: the same keys and step, numbers only
                numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
                self.tracker.log(numbers, step=step)
        return record


def read_metrics(path):
    """The records of a `metrics.jsonl`; a torn last line (the run was killed while appending it) is dropped."""
    lines = Path(path).read_text().splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise UserError(f"{path}:{lineno}: not a JSON record; the file is damaged") from None
            print(f"{path}: dropped its incomplete last line (the run was killed while writing it)")
    return records


def plot_metrics(metrics_path, keys, png_path, title=""):
    """One small panel per metric key, x = step; keys missing from the log are skipped.

    Returns each drawn key's y range (what a reader sees: a share is drawn on its whole scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in records)]
    cols = min(3, max(1, len(keys)))
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    y_ranges = {}
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        if re.search(r"accurac|share|clipfrac", key):  # a share on its whole scale: 0.933 -> 0.929 is no plunge
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(key, fontsize=9)
        y_ranges[key] = ax.get_ylim()
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return y_ranges


# ---------------------------------------------------------------------------
# Tracking and sharing: experiment trackers, model cards, the Hub
# ---------------------------------------------------------------------------

TRACKERS = ("tensorboard", "wandb", "trackio")  # --report_to's names: each is its module and its pip package
TRACKER_PROJECT = "rlhf-gpt2"  # wandb's and trackio's project; each run is named after its runs/ folder
TENSORBOARD_DIR = "tensorboard"  # runs/<run>/tensorboard/: `tensorboard --logdir WORK_DIR/runs` shows them all
TRACKER_RUN_FILE = "tracker_run.json"  # {"id": ...}: a resumed run continues the same wandb / trackio run


def trackers(args):
    """--report_to as a list of names ([] for none); a tracker that is not installed is one line naming its package."""
    names = [name.strip() for name in args.report_to.split(",") if name.strip() not in ("", "none")]
    for name in names:
        check(name in TRACKERS, f"--report_to {name!r}: expected none or a comma list of {', '.join(TRACKERS)}")
        installed = importlib.util.find_spec(name) or (
            name == "tensorboard" and importlib.util.find_spec("tensorboardX")
        )
        check(installed, f"--report_to {name}: {name} is not installed (pip install {name})")
    return names


def tracker_config(args):
    """The run's settings as trackers take them: numbers, strings and booleans; anything else as its text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in vars(args).items()}


def tracker_run_id(run_dir, resume):
    """A fresh run's new id (written to run_dir), or on --resume the id of the run it continues."""
    path = Path(run_dir) / TRACKER_RUN_FILE
    if resume and path.exists():
        return json.loads(path.read_text())["id"]
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    atomic_write_json(path, {"id": run_id})
    tensorboard = Path(run_dir) / TENSORBOARD_DIR
    if not resume and tensorboard.exists():  # a fresh run's curves must not be drawn over an older run's
        shutil.rmtree(tensorboard)
    return run_id


def start_tracking(accelerator, args, run_dir, run_name, resume_step):
    """Open the Accelerator's trackers (main process only), the run's settings as their config.

    A resumed run (`resume_step`: its checkpoint's step) logs again from the step after it: TensorBoard's writer
    purges what the killed run logged from there on, wandb and trackio continue the same run id."""
    from accelerate.tracking import TensorBoardTracker

    if not accelerator.log_with:
        return
    kwargs = {}
    if accelerator.is_main_process:
        run_id = tracker_run_id(run_dir, resume_step is not None)
        kwargs = {
            "tensorboard": {"purge_step": None if resume_step is None else resume_step + 1},
            "wandb": {"name": f"{run_name}-{run_id}", "dir": str(run_dir), "id": run_id, "resume": "allow"},
            "trackio": {"name": f"{run_name}-{run_id}", "resume": "allow"},
        }
    for tracker in accelerator.log_with:  # make_accelerator's TensorBoard tracker: its writer is made just below
        if isinstance(tracker, TensorBoardTracker):
            tracker.init_kwargs |= kwargs.pop("tensorboard", {})
    config = tracker_config(args) if resume_step is None else None  # a resumed run has its config already
    try:
        accelerator.init_trackers(TRACKER_PROJECT, config=config, init_kwargs=kwargs)
    except Exception as e:  # no login, no network
        raise tracker_failure(args, e) from None


def end_run(accelerator, args, folder):
    """The loops' last lines: every process done, the trackers' last records written (under accelerate launch
    this also ends the process group, so no barrier may follow), then the main process uploads `folder`."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process and args.push_to_hub:
        push_folder(folder, args.push_to_hub)


def tracker_failure(args, error):
    """A tracker that did not start, as one line: its own words and how to run without its server."""
    return UserError(
        f"--report_to {args.report_to}: a tracker did not start ({first_line(error)}); WANDB_MODE=offline keeps "
        "a wandb run on disk (`wandb sync` uploads it later)"
    )


def tracker_errors(args):
    """What a tracker raises when it cannot start (wandb: no login, no network), for an `except` around
    Trainer's training, which starts them: a one-line error, not a traceback."""
    if "wandb" not in trackers(args):
        return ()
    import wandb

    return (wandb.errors.Error,)


def trainer_tracking(args, run_dir, run_name, resume_step, is_main):
    """--report_to for the reward model's Trainer, through its own integrations: the same folders, project, run
    name and run id as `start_tracking`. Returns (report_to, callbacks, run name): TensorBoard's callback comes
    with a writer that purges what a killed run logged past `resume_step`, its checkpoint's step."""
    names = trackers(args)
    callbacks = []
    if names and is_main:  # Trainer's trackers log from the main process only
        run_id = tracker_run_id(run_dir, resume_step is not None)
        run_name = f"{run_name}-{run_id}"  # Trainer names the wandb and the trackio run after it
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(run_dir) / TENSORBOARD_DIR)
        os.environ.update(WANDB_PROJECT=TRACKER_PROJECT, WANDB_DIR=str(run_dir), WANDB_RUN_ID=run_id)
        os.environ["WANDB_RESUME"] = "allow"
        os.environ.setdefault("WANDB_LOG_MODEL", "false")  # the model goes to the Hub with --push_to_hub, not wandb
        if "tensorboard" in names:
            from transformers.integrations import TensorBoardCallback

            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            purge = None if resume_step is None else resume_step + 1
            writer = SummaryWriter(os.environ["TENSORBOARD_LOGGING_DIR"], purge_step=purge)
            callbacks = [TensorBoardCallback(writer)]
    return [name for name in names if name != "tensorboard"] or "none", callbacks, run_name


BASE_LICENSES = {"gpt2": "mit", "gpt2-medium": "mit", "gpt2-large": "mit", "gpt2-xl": "mit", "distilgpt2": "apache-2.0"}
BASE_LICENSES |= {f"openai-community/{name}": license for name, license in BASE_LICENSES.items()}
BASE_LICENSES["tiny_gpt2"] = "mit"  # assets/tiny_gpt2: GPT-2's architecture and tokenizer, randomly initialised

PAPERS = {
    "hh-rlhf": "[Bai et al. (2022), Training a Helpful and Harmless Assistant with RLHF](https://arxiv.org/abs/2204.05862)",
    "reward_model": "[Stiennon et al. (2020), Learning to summarize from human feedback](https://arxiv.org/abs/2009.01325)",
    "ppo": "[Ziegler et al. (2019), Fine-Tuning Language Models from Human Preferences](https://arxiv.org/abs/1909.08593)"
    " and [Schulman et al. (2017), Proximal Policy Optimization](https://arxiv.org/abs/1707.06347)",
    "grpo": "[Shao et al. (2024), DeepSeekMath](https://arxiv.org/abs/2402.03300)",
    "dpo": "[Rafailov et al. (2023), Direct Preference Optimization](https://arxiv.org/abs/2305.18290)",
}
# method: (name, task, tags, what the model is, headline figures of its eval_results.json: (path, metric type, name))
CARDS = {
    "reward_model": (
        "reward model",
        "text-classification",
        ["reward-model", "rlhf"],
        "A reward model: the base with a linear score head, trained on preference pairs with the Bradley-Terry loss "
        "(the chosen reply must score above the rejected one). It scores a whole conversation; higher is better.",
        [("accuracy", "accuracy", "test pairs ranked right"), ("loss", "loss", "test Bradley-Terry loss")],
    ),
    "ppo": (
        "PPO policy",
        "text-generation",
        ["ppo", "rlhf"],
        "A policy trained with PPO against the reward model, with a KL penalty to the base model; "
        "`value_head.safetensors` holds the value head it was trained with.",
        [("ppo/score", "reward", "reward-model score of its replies"), ("ppo/kl", "kl", "KL to base (nats)")],
    ),
    "grpo": (
        "GRPO policy",
        "text-generation",
        ["grpo", "rlhf"],
        "A policy trained with GRPO: several replies per prompt, each scored by the reward model against its "
        "group's mean, with a KL penalty to the base model; no value head.",
        [("eval/reward", "reward", "reward-model score of its replies")],
    ),
    "dpo": (
        "DPO policy",
        "text-generation",
        ["dpo", "rlhf"],
        "A policy trained with DPO straight on the preference pairs: no reward model and no sampling, the base "
        "model as its reference.",
        [
            ("eval/rewards/accuracies", "accuracy", "pairs its implicit reward ranks right"),
            ("eval/loss", "loss", "DPO loss"),
        ],
    ),
}
EVALUATION_HEADING = "## Beside base and the other methods (evaluate_models.py)"


def flatten(results, prefix=""):
    """eval_results.json's numbers as {"ppo/score": ...}, in file order."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def shown(value):
    """A setting as a card shows it: an absolute path by its name only (a card is published; a path is this
    machine's)."""
    return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value


def command_line(script, args, tiny=None):
    """The command that remakes `args`: the preset, the work dir, and every flag that is not the preset's default
    (--resume aside: the remade run starts afresh)."""
    defaults = parse_args(type(args), tiny, ["--preset", args.preset])
    words = ["python", script, "--preset", args.preset, "--work_dir", str(shown(args.work_dir))]
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name not in ("preset", "work_dir", "resume") and value != getattr(defaults, f.name):
            words += [f"--{f.name}"] if value is True else [f"--{f.name}", str(shown(value))]
    return shlex.join(words)


def model_card(method, args, results, script, tiny=None, curves=None, title=None, note=""):
    """The model folder's README.md, a Hugging Face model card (`huggingface_hub.ModelCard`): metadata, what the
    model is, its method and paper, the command and settings that made it, its eval_results.json, its curves."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, task, tags, what, headline = CARDS[method]
    base = resolve_model_name(args.model)
    base_on_hub = not Path(base).exists()
    base_name = base if base_on_hub else Path(base).name  # a local folder: its name, never the path
    is_tiny = args.preset == "tiny" or base_name == TINY_MODEL_DIR.name
    stats_path = Path(args.work_dir) / PROCESSED_DIR / "stats.json"
    dataset = json.loads(stats_path.read_text())["dataset"] if stats_path.exists() else PRESETS[args.preset]["dataset"]
    on_hub = not Path(dataset).exists()
    dataset_name = dataset if on_hub else Path(dataset).name
    title = title or f"{name} from {base_name}"
    flat = flatten(results)
    data = ModelCardData(
        model_name=title,
        base_model=base_name if base_on_hub else None,  # the Hub refuses a card whose base or data is no hub id:
        datasets=[dataset] if on_hub else None,  # a local folder is named in the text instead
        library_name="transformers",
        license=BASE_LICENSES.get(base_name, "other"),
        pipeline_tag=task,
        tags=[*tags, "gpt2", "hh-rlhf", *(["tiny-preset"] if is_tiny else [])],
        eval_results=[
            EvalResult(
                task_type=task,
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=results.get("split", "test"),  # PPO's evaluation: test prompts
                metric_type=kind,
                metric_name=name,
                metric_value=flat[key],
            )
            for key, kind, name in headline
            if key in flat
        ]
        or None,
    )
    settings = [f"| `{k}` | `{shown(v)}` |" for k, v in tracker_config(args).items()]
    figures = [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in flat.items()]
    body = [f"# {title}", "", what + (f" {note}" if note else ""), ""]
    if is_tiny:
        body += [
            "> **Tiny preset.** A CPU-sized model (GPT-2's architecture, a few layers, randomly initialised) trained "
            "in minutes on synthetic hh-format data, to test the pipeline end to end. Its replies are not meant to "
            "be read as a real assistant's.",
            "",
        ]
    source = (
        f"[{dataset}](https://huggingface.co/datasets/{dataset})" if on_hub else f"the local data set `{dataset_name}`"
    )
    base_text = (
        f"[{base_name}](https://huggingface.co/{base_name})" if base_on_hub else f"the local model `{base_name}`"
    )
    body += [
        "## Method",
        "",
        f"Base model: {base_text}; data: {source} (format of {PAPERS['hh-rlhf']}). Method: {PAPERS[method]}.",
        "",
        "## How it was made",
        "",
        "```bash",
        command_line(script, args, tiny),
        "```",
        "",
        "<details><summary>Every setting (args.json)</summary>",
        "",
        "| setting | value |",
        "|---|---|",
        *settings,
        "",
        "</details>",
        "",
        "## Evaluation (eval_results.json)",
        "",
        "| figure | value |",
        "|---|---|",
        *(figures or ["| (none) | |"]),
        "",
    ]
    if curves:
        body += ["## Training curves", "", f"![training curves]({curves})", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body="\n".join(body))


def card_writer(*card_args, **card_kwargs):
    """For save_pretrained_atomic's `extra`: writes the model card into the folder being saved."""
    return lambda path: model_card(*card_args, **card_kwargs).save(path)


def add_evaluation_to_card(folder, table, command):
    """evaluate_models.py's summary rows for this model, as the card's last section (replacing an earlier one)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.exists():
        print(f"{folder} has no model card (saved before cards were written): its summary row is not added")
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        card = ModelCard.load(path)
        text = card.text.split(f"\n{EVALUATION_HEADING}\n")[0].rstrip()
        section = f"{EVALUATION_HEADING}\n\nOn the same held-out prompts as base, from `{command}`:\n\n{table}\n"
        ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}\n\n{section}").save(tmp)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # a read-only folder, a card edited by hand into bad YAML
        tmp.unlink(missing_ok=True)
        print(f"{path}: its summary row is not added ({first_line(e)})")


def check_push(args):
    """At start-up, before hours of training: --push_to_hub names a valid repo id, the Hub is online, and it
    accepts the token."""
    if not args.push_to_hub:
        return
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.push_to_hub)
    except HFValidationError as e:
        raise UserError(f"--push_to_hub {args.push_to_hub!r}: {first_line(e)}") from None
    check(not offline(), "--push_to_hub: the Hub is offline here (HF_HUB_OFFLINE=1, or it cannot be reached)")
    check(
        huggingface_hub.get_token(),
        "--push_to_hub: no Hugging Face token: set HF_TOKEN or run `hf auth login` (the upload follows the training)",
    )
    try:  # a wrong token fails now, not after the training
        user = HfApi().whoami()["name"]  # the endpoint of now (HF_ENDPOINT), not of import time
    except Exception as e:
        raise UserError(f"--push_to_hub: the Hub did not accept the token ({first_line(e)})") from None
    print(f"--push_to_hub {args.push_to_hub}: logged in to the Hub as {user}; the upload follows the training")


def push_folder(folder, repo_id):
    """Upload a finished model folder (card included) to the Hub; a failure is one line, the folder stays."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=f"{Path(folder).name} from rlhf-gpt2",
            ignore_patterns=["*.tmp-*"],  # a killed card update's leftover is not the model's
        )
    except Exception as e:  # network, authentication, permission: the saved folder is intact either way
        reason = first_line(e) + (f" {e.server_message}" if getattr(e, "server_message", None) else "")
        raise UserError(
            f"--push_to_hub {repo_id}: the upload failed ({reason}); the model is saved in {folder}: "
            f"upload it later with `hf upload {repo_id} {folder}`"
        ) from None
    print(f"uploaded {folder} to {url}")
