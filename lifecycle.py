"""The run's lifecycle, apart from the algorithms: what every script does around its training loop.

* flags and presets: `CommonArgs`, `TrainArgs`, `PolicyArgs`, `parse_args`, and `run`, the `__main__` entry that
  turns a user's mistake (`UserError`) or Ctrl-C into one line, after the start-up checks (work dir, Hub,
  `--report_to`, `--push_to_hub`);
* the project's paths, presets and output-folder names, which every script and the evaluation share;
* files that are complete or absent: atomic writes, `replace_folder`, `damage` (is a saved file whole?);
* checkpoints and `--resume` (with the random generators), policy snapshots, and the leftovers of killed runs.

Every script imports it, directly or through `common.py` and `reporting.py`; it imports no module of this
project, so the three never import each other in a circle (tests/test_layout.py checks it).
"""

import argparse
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

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


# Output folders, as every script and the evaluation name them.
PROCESSED_DIR = "processed_data"
GOLD_SPLIT = "gold_train"  # processed_data/'s pairs for the gold reward model alone (data_process.py --gold_share)
REWARD_MODEL_DIR = "final_reward_model"
GOLD_REWARD_MODEL_DIR = "final_gold_reward_model"
PPO_DIR = "ppo_rlhf_model"
PPO_BEST_DIR = "ppo_best"  # the best held-out checkpoint by --select_by (live_eval.py); DPO's likewise
DPO_BEST_DIR = "dpo_best"
GRPO_BEST_DIR = "grpo_best"
GRPO_FINAL_DIR = "grpo_rlhf_model"
GRPO_ORACLE = "grpo_oracle"  # GRPO against the tiny world's oracle (--reward_funcs oracle --run_name grpo_oracle)
DPO_DIR = "dpo_rlhf_model"
SFT_DIR = "sft_model"
START_FILE = "start.json"  # runs/<name>/start.json: {"init_from": "sft" | "base"}, what a --resume starts from
RUN_ID_FILE = "run.json"  # {"run_id": ...} in both GRPO folders: evaluation tells a pair from two runs
SNAPSHOTS_DIR = "snapshots"  # runs/<name>/snapshots/step-N/: policy-only snapshots for the evaluation's frontier
TENSORBOARD_DIR = "tensorboard"  # runs/<run>/tensorboard/: `tensorboard --logdir WORK_DIR/runs` shows them all


def grpo_dirs(run_name):
    """GRPO's two output folders for `--run_name`: the best by held-out reward and the final policy."""
    return GRPO_BEST_DIR.replace("grpo", run_name, 1), GRPO_FINAL_DIR.replace("grpo", run_name, 1)


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
    """Flags every training script takes besides CommonArgs: trackers, the Hub and --resume."""

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
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in runs/<name>/"})


@dataclass
class PolicyArgs(TrainArgs):
    """Flags the hand-written policy loops (PPO, GRPO, DPO) share, with one meaning in each: checkpoints and
    snapshots in runs/<name>/ (ppo, grpo, dpo)."""

    save_every: int = field(default=100, metadata={"help": "write runs/<name>/checkpoint.pt every N steps"})
    snapshot_every: int = field(
        default=0,
        metadata={
            "help": "keep a policy-only snapshot every N steps in runs/<name>/snapshots/ for evaluate_models.py's "
            "frontier (0 = off; about 500 MB each for gpt2)"
        },
    )
    init_from: str = field(
        default="auto",
        metadata={
            "help": "the model the policy starts from and stays near (its reference): sft = sft_model/, base = "
            "--model; auto = sft_model/ when the work dir has one, else base",
            "choices": ["auto", "sft", "base"],
        },
    )


@dataclass
class GenerationArgs:
    """The sampling scripts' (PPO, GRPO, evaluate_models.py) switch for compiled generation."""

    compile_generation: bool = field(
        default=False,
        metadata={
            "help": "compile the decode step (torch.compile, CUDA graphs on a GPU) with prompts padded to a multiple "
            "of 64 tokens: the eager path's samples, faster on a GPU after a warm-up per width (docs/benchmarks.md)"
        },
    )


REWARD_FLAGS = ("reward_funcs", "reward_weights", "missing_eos_penalty")  # RewardArgs', recorded in checkpoints


@dataclass
class RewardArgs:
    """What the online policies (PPO, GRPO) maximise: a weighted sum of reward functions (common.RewardMix)."""

    reward_funcs: str = field(
        default="model",
        metadata={
            "help": "comma list of: model (final_reward_model/), gold (final_gold_reward_model/), oracle (the tiny "
            "world's truth: 1 for a real answer; tiny data only), length (minus the reply's tokens), "
            "module:function (your own, (prompts, replies) -> a float per reply)"
        },
    )
    reward_weights: str = field(
        default="", metadata={"help": "comma list of weights, one per --reward_funcs (default: 1 each)"}
    )
    missing_eos_penalty: float = field(
        default=0.0, metadata={"help": "taken off the reward of a reply that hit --max_new_tokens without ending"}
    )


SELECT_KEYS = {"proxy": "eval/reward", "gold": "eval/gold", "oracle": "eval/oracle"}  # --select_by: the score


@dataclass
class LiveEvalArgs:
    """Held-out scores while PPO, GRPO and DPO train (live_eval.py): what they sample, how often, what picks the
    best checkpoint and what the over-optimisation alarm does. The sampling flags are DPO's own; PPO and GRPO
    sample held-out replies as they sample in training (their own --max_new_tokens, --temperature, ...)."""

    eval_every: int = field(
        default=100, metadata={"help": "steps between held-out evaluations on the --eval_prompts (0 = none)"}
    )
    eval_prompts: int = field(
        default=128, metadata={"help": "the first N validation prompts, the same for PPO, GRPO and DPO"}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per generation batch when evaluating"})
    select_by: str = field(
        default="proxy",
        metadata={
            "help": "the held-out score that picks the best checkpoint (NAME_best/): proxy (the run's own reward: "
            "the proxy reward model unless --reward_funcs says otherwise), gold (final_gold_reward_model/), oracle "
            "(tiny data)",
            "choices": list(SELECT_KEYS),
        },
    )
    alarm_window: int = field(
        default=2,
        metadata={
            "help": "the over-optimisation alarm compares each evaluation with the one this many evaluations back: "
            "it fires where the proxy rose and the gold score or the oracle share fell, each beyond its noise"
        },
    )
    stop_on_overoptimization: bool = field(
        default=False,
        metadata={"help": "end the run where the alarm fires (its checkpoint and final save as at the end)"},
    )
    # sampling (DPO's; PPO and GRPO have their own)
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (left-truncated)"})
    max_new_tokens: int = field(default=64, metadata={"help": "reply tokens sampled at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling's p (1 = off)"})
    reward_max_length: int = field(default=512, metadata={"help": "tokens the reward models read (left-truncated)"})


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
    for flag in (word.split("=")[0] for word in rest):
        if flag in getattr(args_cls, "GONE_FLAGS", {}):
            parser.error(f"{flag} is gone: {args_cls.GONE_FLAGS[flag]}")
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


def save_args(args, path):
    atomic_write_json(path, vars(args))


def resolve_model_name(name):
    """What `from_pretrained` takes: an absolute path for a local folder, else the hub id."""
    return str(Path(name).resolve()) if Path(name).exists() else name


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


TRACKERS = ("tensorboard", "wandb", "trackio")  # --report_to's names: each is its module and its pip package


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


# ---------------------------------------------------------------------------
# Files that are complete or absent
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Checkpoints, --resume, snapshots and leftovers
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
    # CUDA's generators, one a device: restore those this run can see. A checkpoint written on more GPUs, on fewer
    # or on a CPU leaves the others in their seeded state, and says so: the run goes on, not bit for bit.
    saved = state.get("cuda", [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, generator in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(generator, device)
    if len(saved) != visible:
        print(
            f"--resume: the checkpoint holds the CUDA random state of {len(saved)} device(s) and this run sees "
            f"{visible}: {min(len(saved), visible)} restored, the others seeded afresh (not bit for bit the run that "
            "wrote it)"
        )


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


def snapshots(run_dir):
    """The complete snapshots in `run_dir`: [(step, folder)], in step order."""
    found = [(re.fullmatch(r"step-(\d+)", p.name), p) for p in (Path(run_dir) / SNAPSHOTS_DIR).glob("step-*")]
    # not a killed save's step-N.tmp-PID/, nor a folder without its config
    return sorted((int(m.group(1)), p) for m, p in found if m and (p / "config.json").is_file())


def snapshot_due(step, total_steps, every):
    """A snapshot is kept every `every` steps (0: never), but not at the last: the final model is that point."""
    return bool(every) and 0 < step < total_steps and step % every == 0


def save_snapshot(run_dir, step, policy):
    """A policy-only snapshot (safetensors + config, no optimizer state) at runs/<name>/snapshots/step-N/;
    `policy` is the bare model (unwrapped from DDP).

    Written before the step's checkpoint, so a checkpoint at step N always has the snapshots up to N."""
    folder = Path(run_dir) / SNAPSHOTS_DIR / f"step-{step}"
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
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


def objective(args, flags):
    """What a run optimises, as its checkpoint records it: {flag: value} (PPO's and GRPO's `OBJECTIVE_FLAGS`)."""
    return {flag: getattr(args, flag) for flag in flags}


def check_same_objective(state, args, flags):
    """--resume: the run must go on optimising what its checkpoint was trained on; a changed flag among `flags` is
    one line (a checkpoint older than this record passes)."""
    for flag, value in state.get("objective", {}).items():
        if flag in flags and value != getattr(args, flag):
            raise UserError(
                f"--resume: the checkpoint was trained with --{flag} {value}, not {getattr(args, flag)}: resume with "
                f"the same --{flag}, or start afresh without --resume"
            )


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
