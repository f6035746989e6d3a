"""The run's reporting, apart from the algorithms: what a training run leaves for people to read and share.

* `MetricsLogger` (`metrics.jsonl`, one record per logged step with the cost so far), `read_metrics`,
  `plot_metrics` (the PNG of the curves) and peak memory;
* the experiment trackers of `--report_to` (TensorBoard, wandb, trackio), for the hand-written loops
  (`start_tracking`, `end_run`) and the reward model's `Trainer` (`trainer_tracking`);
* model cards (`model_card`, `card_writer`, `add_evaluation_to_card`) and `--push_to_hub` (`push_folder`).

Used by the training scripts, the evaluation and the benchmarks. It imports `lifecycle.py`, never the other way.
"""

import json
import os
import re
import resource
import shlex
import shutil
import time
import uuid
from dataclasses import fields
from pathlib import Path

import torch

from lifecycle import (
    PRESETS,
    PROCESSED_DIR,
    TENSORBOARD_DIR,
    TINY_MODEL_DIR,
    UserError,
    atomic_write_json,
    first_line,
    parse_args,
    resolve_model_name,
    trackers,
)

# ---------------------------------------------------------------------------
# Metrics, their log and their plot
# ---------------------------------------------------------------------------


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
    alarms = [r["step"] for r in records if r.get("alarm/overoptimization")]  # live_eval.py's over-optimisation alarm
    if alarms:
        title += f" (over-optimisation alarm at step {', '.join(map(str, alarms))}: dashed)"
    y_ranges = {}
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        if re.search(r"accurac|share|clipfrac", key):  # a share on its whole scale: 0.933 -> 0.929 is no plunge
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(key, fontsize=9)
        for step in alarms:
            ax.axvline(step, color="tab:red", ls="--", lw=1)
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

TRACKER_PROJECT = "rlhf-gpt2"  # wandb's and trackio's project; each run is named after its runs/ folder
TRACKER_RUN_FILE = "tracker_run.json"  # {"id": ...}: a resumed run continues the same wandb / trackio run


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
# model families by hub id prefix (each model card on the Hub says so)
FAMILY_LICENSES = {
    "HuggingFaceTB/SmolLM2-": "apache-2.0",
    "EleutherAI/pythia-": "apache-2.0",
    "Qwen/Qwen2.5-0.5B": "apache-2.0",
    "Qwen/Qwen2.5-1.5B": "apache-2.0",
    "Qwen/Qwen2-0.5B": "apache-2.0",
}


def base_model_card(base):
    """What a model card says about its base: (hub id or None, licence). A hub id's licence comes from the known
    ones above; a local folder's from its own README.md's metadata (assets/get_smollm2.py writes one with the hub
    model it holds), "other" when nothing says."""
    from huggingface_hub import ModelCard

    if not Path(base).exists():
        family = next((lic for prefix, lic in FAMILY_LICENSES.items() if base.startswith(prefix)), "other")
        return base, BASE_LICENSES.get(base, family)
    readme = Path(base) / "README.md"
    try:
        data = ModelCard.load(readme).data if readme.is_file() else None
    except (OSError, ValueError):  # a README without metadata or with bad YAML says nothing
        data = None
    hub_id = getattr(data, "base_model", None) if data else None
    license = getattr(data, "license", None) if data else None
    return hub_id if isinstance(hub_id, str) else None, license or BASE_LICENSES.get(Path(base).name, "other")


def model_type(folder):
    """The architecture of a saved model folder (config.json's model_type: gpt2, llama, qwen2...), or None."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        return None


PAPERS = {
    "hh-rlhf": "[Bai et al. (2022), Training a Helpful and Harmless Assistant with RLHF](https://arxiv.org/abs/2204.05862)",
    "reward_model": "[Stiennon et al. (2020), Learning to summarize from human feedback](https://arxiv.org/abs/2009.01325)",
    "ppo": "[Ziegler et al. (2019), Fine-Tuning Language Models from Human Preferences](https://arxiv.org/abs/1909.08593)"
    " and [Schulman et al. (2017), Proximal Policy Optimization](https://arxiv.org/abs/1707.06347)",
    "grpo": "[Shao et al. (2024), DeepSeekMath](https://arxiv.org/abs/2402.03300)",
    "dpo": "[Rafailov et al. (2023), Direct Preference Optimization](https://arxiv.org/abs/2305.18290)",
    "sft": "[Ouyang et al. (2022), Training language models to follow instructions with human feedback]"
    "(https://arxiv.org/abs/2203.02155), step 1",
}
# method: (name, task, tags, what the model is, headline figures of its eval_results.json: (path, metric type, name))
CARDS = {
    "sft": (
        "SFT model",
        "text-generation",
        ["sft", "rlhf"],
        "The base model fine-tuned on the chosen replies of the preference pairs (the negative log-likelihood of the "
        "reply tokens): the start and the reference model of the RL policies.",
        [("eval/loss", "loss", "validation NLL per reply token"), ("eval/perplexity", "perplexity", "perplexity")],
    ),
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
        "A policy trained with PPO against the reward model, with a KL penalty to the model it started from (the SFT "
        "model or the base: `init_from` below); "
        "`value_head.safetensors` holds the value head it was trained with.",
        [("ppo/score", "reward", "reward-model score of its replies"), ("ppo/kl", "kl", "KL to base (nats)")],
    ),
    "grpo": (
        "GRPO policy",
        "text-generation",
        ["grpo", "rlhf"],
        "A policy trained with GRPO: several replies per prompt, each scored by the reward model against its "
        "group's mean, with a KL penalty to the model it started from (the SFT model or the base: `init_from` "
        "below); no value head.",
        [("eval/reward", "reward", "reward-model score of its replies")],
    ),
    "dpo": (
        "DPO policy",
        "text-generation",
        ["dpo", "rlhf"],
        "A policy trained with DPO straight on the preference pairs: no reward model and no sampling, the model "
        "it started from (the SFT model or the base: `init_from` below) as its reference.",
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


def model_card(method, args, results, script, tiny=None, curves=None, title=None, note="", architecture=None):
    """The model folder's README.md, a Hugging Face model card (`huggingface_hub.ModelCard`): metadata, what the
    model is, its method and paper, the command and settings that made it, its eval_results.json, its curves.
    `architecture` (the model's model_type) is a tag."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, task, tags, what, headline = CARDS[method]
    base = resolve_model_name(args.model)
    base_on_hub = not Path(base).exists()
    base_name = base if base_on_hub else Path(base).name  # a local folder: its name, never the path
    base_hub_id, license = base_model_card(base)
    is_tiny = args.preset == "tiny" or base_name == TINY_MODEL_DIR.name
    stats_path = Path(args.work_dir) / PROCESSED_DIR / "stats.json"
    dataset = json.loads(stats_path.read_text())["dataset"] if stats_path.exists() else PRESETS[args.preset]["dataset"]
    on_hub = not Path(dataset).exists()
    dataset_name = dataset if on_hub else Path(dataset).name
    title = title or f"{name} from {base_name}"
    flat = flatten(results)
    data = ModelCardData(
        model_name=title,
        base_model=base_hub_id,  # the Hub refuses a card whose base or data is no hub id:
        datasets=[dataset] if on_hub else None,  # a local folder is named in the text instead
        library_name="transformers",
        license=license,
        pipeline_tag=task,
        tags=[*tags, *([architecture] if architecture else []), "hh-rlhf", *(["tiny-preset"] if is_tiny else [])],
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
    if base_hub_id and not base_on_hub:
        base_text += f" (a copy of [{base_hub_id}](https://huggingface.co/{base_hub_id}))"
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
    """For save_pretrained_atomic's `extra`: writes the model card into the folder being saved (its config.json, saved
    first, names the architecture)."""
    return lambda path: model_card(*card_args, architecture=model_type(path.parent), **card_kwargs).save(path)


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
