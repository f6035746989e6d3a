"""Step 6 of the pipeline: sample, score and compare base, PPO, GRPO and DPO on test prompts.

For a seeded sample of test prompts from `processed_data/` (150 by default), the base
model and every trained policy that exists (`ppo_rlhf_model/`, `grpo_best/`,
`dpo_rlhf_model/`) each sample one reply with the same decoding settings (batched,
KV-cached, `top_k=0`, stopped at EOS or at a new turn). Then, per model:

1. score every (prompt, reply) with `final_reward_model/` (`common.get_reward`, exactly
   as the reward model was trained and as PPO/GRPO scored their rollouts);
2. KL to the base model on the policy's own samples: per sample the sum over reply
   tokens of log pi(a_t) - log pi_base(a_t), both at the sampling temperature (the same
   unit as PPO's `objective/kl`); the mean over samples estimates KL(pi || pi_base);
3. a summary per model: mean reward with a 95% bootstrap interval, the share of prompts
   where it beats base, mean KL, the share of distinct replies and the mean reply length
   (a collapsed policy shows up in these two), and its training cost from the last
   record of its `metrics.jsonl` (wall time, tokens processed, peak memory);
4. on the tiny preset's own data, the truth beside the proxy: `assets/tiny_oracle.py`
   (the data generator's grammar, no learning) labels every reply `good` (a real answer)
   or by what it is instead (off_topic, courtesy_only, refusal, rude, harmful,
   incoherent, empty); the summary gives each model's `oracle_good` share with a 95%
   bootstrap interval, the interval of its gain over base (paired by prompt) and the
   share of every other label. A reward model that scores word salad like an answer
   shows up here as a high reward and a low `oracle_good`;
5. where `final_gold_reward_model/` exists (a reward model trained on pairs no policy saw:
   `data_process.py --gold_share`, `reward_model_training.py --train_split gold_train`),
   its score of every reply too (`gold_mean` with its interval);
6. the frontier (Gao et al. 2022; Stiennon et al. 2020), unless `--no_frontier`: the
   same measures for every policy snapshot the trainers kept (`runs/<method>/snapshots/`,
   `--snapshot_every`) and each method's final policy (GRPO's path ends in
   `grpo_rlhf_model/`), and for best-of-N sampling from base, N = 1, 2, 4, ... up to
   `--best_of_n` (the proxy picks one of N base replies; the first of the N is base's own
   reply, so N = 1 is base; its KL to base is the analytic log N - (N - 1)/N). A model of
   the table is not sampled twice: its replies are reused.

Writes into `--work_dir`: `rlhf_eval_results_with_base.xlsx` (sheet `results`: one row
per prompt; sheet `summary`), `rlhf_eval_responses.jsonl` (the raw text, lossless),
`rlhf_eval_rewards_boxplot.png`, `rlhf_eval_reward_vs_kl.png`, `rlhf_eval_cost.png`
(mean reward against training time and tokens), and the frontier's
`rlhf_eval_frontier.csv` (method, step or N, proxy and gold reward and the oracle's good
share with 95% intervals, KL, distinct share, length) and `rlhf_eval_frontier.png` (each
judge against sqrt(KL), one line per method, best-of-N as the reference curve). A policy
folder that is missing is reported and its columns left out.

    python evaluate_models.py                                   # after the gpt2 pipeline
    python evaluate_models.py --preset tiny --work_dir runs/demo

Deliberate choices:
* the random state is reset to `--seed` before each model samples, so a rerun gives the
  same table and a policy identical to base gives base's replies (KL exactly 0);
* worksheet cells cannot hold most control characters: in the xlsx they are shown
  escaped (`\\x07`); the JSONL keeps the text exactly as generated (and is what the
  notebook's judge reads); a reply starting with "=" is stored as text, not a formula;
* on a CPU the models are evaluated side by side in forked processes of one thread each
  (`--workers`, by default one per thread torch may use): each evaluation seeds itself, so
  the table is the same as one process makes; a GPU evaluates one model at a time;
* with `--top_p` below 1 the samples come from the truncated distribution while the KL
  uses the full tempered distributions, so it is then only an approximation.
"""

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common import (
    PROMPT_AND_REPLY,
    check_positions,
    freeze,
    generate_responses,
    get_reward,
    load_causal_lm,
    load_oracle,
    load_processed_data,
    load_reward_model,
    load_tokenizer,
    sequence_kl,
    set_seed,
    test_prompt_sample,
)
from lifecycle import (
    DPO_DIR,
    GOLD_REWARD_MODEL_DIR,
    GOLD_SPLIT,
    GRPO_BEST_DIR,
    GRPO_FINAL_DIR,
    GRPO_ORACLE,
    PPO_DIR,
    RUN_ID_FILE,
    SFT_DIR,
    CommonArgs,
    GenerationArgs,
    check,
    command,
    damage,
    grpo_dirs,
    remove_leftovers,
    resolve_model_name,
    run,
    snapshots,
)
from reporting import add_evaluation_to_card, command_line, read_metrics


@dataclass
class Args(CommonArgs, GenerationArgs):
    # data
    num_prompts: int = field(default=150, metadata={"help": "test prompts sampled (seeded) from processed_data/"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept, truncated from the left"})
    # decoding (the same for every model)
    max_new_tokens: int = field(
        default=64, metadata={"help": "reply tokens sampled at most (stops at EOS or where a new turn begins)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the KL uses the same one)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (1.0 = the full distribution)"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call and per scoring pass"})
    # scoring
    reward_max_length: int = field(default=512, metadata={"help": "tokens per text for the reward model"})
    # analysis
    bootstrap_samples: int = field(
        default=10_000, metadata={"help": "bootstrap resamples for the 95 percent intervals"}
    )
    frontier: bool = field(
        default=True,
        metadata={"help": "score every snapshot and best-of-N too: rlhf_eval_frontier.csv and .png (slower)"},
    )
    best_of_n: int = field(
        default=16,
        metadata={"help": "the frontier's best-of-N from base: N = 1, 2, 4, ... up to this (a power of 2; 0 = none)"},
    )
    workers: int = field(
        default=0,
        metadata={
            "help": "CPU only: processes that evaluate models side by side, one thread each (0 = one per thread "
            "torch may use; 1 = one process). The same replies and figures either way"
        },
    )


TINY = dict(batch_size=50, reward_max_length=256, bootstrap_samples=2000)

# Column prefix -> output folder of the script that trains it, in the order of the table.
# grpo_oracle, GRPO trained against the tiny world's oracle (`run_pipeline.sh --only grpo_oracle`), only when asked
# for: the upper bound of what the RL machinery buys there; left out in silence when its folder is absent.
POLICY_DIRS = {
    "sft": SFT_DIR,
    "ppo": PPO_DIR,
    "grpo": GRPO_BEST_DIR,
    "dpo": DPO_DIR,
    GRPO_ORACLE: grpo_dirs(GRPO_ORACLE)[0],
}
OPTIONAL = {GRPO_ORACLE}
RESULTS_XLSX = "rlhf_eval_results_with_base.xlsx"
RESPONSES_JSONL = "rlhf_eval_responses.jsonl"
BOXPLOT_PNG = "rlhf_eval_rewards_boxplot.png"
REWARD_VS_KL_PNG = "rlhf_eval_reward_vs_kl.png"
COST_PNG = "rlhf_eval_cost.png"
FRONTIER_CSV = "rlhf_eval_frontier.csv"
FRONTIER_PNG = "rlhf_eval_frontier.png"
# The frontier's methods: (run folder under runs/ holding the snapshots, folder of the final policy).
# GRPO's path ends in its final policy (grpo_rlhf_model/), not in the best-by-validation one.
# SFT keeps no snapshots: its model is one point on the frontier, the start of the policies that began from it.
FRONTIER_RUNS = {
    "sft": ("sft", SFT_DIR),
    "ppo": ("ppo", PPO_DIR),
    "grpo": ("grpo", GRPO_FINAL_DIR),
    "dpo": ("dpo", DPO_DIR),
    GRPO_ORACLE: (GRPO_ORACLE, grpo_dirs(GRPO_ORACLE)[1]),
}


def check_grpo_pair(work_dir, args, run_name="grpo"):
    """`grpo_best/` and `grpo_rlhf_model/` (of `run_name`) must come from one run: a kill between their two saves
    leaves a new one beside an older run's other, both complete; the run id GRPO writes into both tells them apart."""
    best_dir, final_dir = grpo_dirs(run_name)
    rerun = command("GRPO_training.py", args) + (
        "" if run_name == "grpo" else f" --reward_funcs oracle --run_name {run_name}"
    )
    ids = {}
    for folder in (best_dir, final_dir):
        path = work_dir / folder / RUN_ID_FILE
        ids[folder] = None
        if path.is_file():
            check(damage(path) is None, f"{path} is {damage(path)}: rerun `{rerun}`")
            ids[folder] = json.loads(path.read_text()).get("run_id")
    check(
        not (work_dir / final_dir).is_dir() or ids[best_dir] == ids[final_dir],
        f"{work_dir / best_dir} and {work_dir / final_dir} come from two GRPO runs (run ids "
        f"{ids[best_dir]} and {ids[final_dir]}): the last one was killed while saving; finish it with "
        f"`{rerun} --resume` (and the run's other flags)",
    )


@torch.no_grad()
def selected_by(folder):
    """What picked a NAME_best/ checkpoint: its best.json's --select_by (proxy, gold or oracle; "proxy" for one saved
    before the choice existed), or "" for a final policy."""
    path = Path(folder) / "best.json"
    if not path.is_file() or damage(path) is not None:
        return ""
    return json.loads(path.read_text()).get("select_by", "proxy")


def started_from(folder):
    """The model a policy started from and kept as its reference: "sft" or "base" (its args.json's init_from; a
    policy trained before SFT existed here, or the SFT model itself, started from base)."""
    path = Path(folder) / "args.json"
    saved = json.loads(path.read_text()) if path.is_file() and damage(path) is None else {}
    return "sft" if saved.get("init_from") == "sft" else "base"


@dataclass
class Scorers:
    """What judges a reply: the proxy reward model (the one the policies were trained against), the held-out
    gold reward model when it exists, and on the tiny data the generator's oracle."""

    proxy: tuple  # (model, tokenizer)
    gold: tuple | None = None
    oracle: object = None

    def score(self, prompts, replies, args):
        """{"reward": [...], "gold": [...], "oracle": [...]}: an empty list where that judge is absent."""

        def reward(judge):
            return get_reward(*judge, prompts, replies, args.reward_max_length).tolist() if judge else []

        oracle = [self.oracle.judge(p, r) for p, r in zip(prompts, replies)] if self.oracle else []
        return {"reward": reward(self.proxy), "gold": reward(self.gold), "oracle": oracle}


def reply_lengths(samples, tokenizer):
    """Reply length without its final EOS: the mask covers the reply up to and including the first EOS."""
    not_eos = samples.response_ids != tokenizer.eos_token_id  # (B, R)
    return (samples.response_mask * not_eos).sum(-1).tolist()


def evaluate_model(name, model, base, tokenizer, prompts, scorers, args, progress=True, reference=None):
    """Sample one reply per prompt, score it, (for a policy) its KL to base and to its own `reference` (the SFT model
    it started from; None: base is its reference), and (tiny data) the oracle's label."""
    set_seed(args.seed)  # every model draws from the same random stream
    out = {"response": [], "reward": [], "gold": [], "kl": [], "kl_ref": [], "length": [], "oracle": []}
    for i in tqdm(range(0, len(prompts), args.batch_size), desc=f"evaluate {name}", disable=not progress):
        batch = prompts[i : i + args.batch_size]
        samples = generate_responses(
            model, tokenizer, batch, args.max_prompt_length, args.max_new_tokens, args.temperature, args.top_p,
            compile=args.compile_generation,
        )  # fmt: skip
        out["response"] += samples.responses
        for key, values in scorers.score(batch, samples.responses, args).items():
            out[key] += values
        out["length"] += reply_lengths(samples, tokenizer)
        if base is not None:
            kl = sequence_kl(model, base, samples, args.temperature).tolist()
            out["kl"] += kl
            out["kl_ref"] += sequence_kl(model, reference, samples, args.temperature).tolist() if reference else kl
    return out


def best_of_n_draws(base, tokenizer, prompts, scorers, args, progress=True):
    """The N - 1 more base replies per prompt that best-of-N picks among (besides base's own evaluated one), from
    one seeded stream: {"response": [[...] per prompt], "reward": ..., "gold": ..., "oracle": ..., "length": ...}."""
    extra = args.best_of_n - 1
    draws = {key: [[] for _ in prompts] for key in ("response", "reward", "gold", "oracle", "length")}
    set_seed(args.seed + 1)
    per_call = max(1, args.batch_size // max(extra, 1))  # prompts per generate call: about --batch_size rows
    calls = range(0, len(prompts) if extra else 0, per_call)
    for i in tqdm(calls, desc=f"best-of-{args.best_of_n} from base", disable=not progress):
        batch = prompts[i : i + per_call]
        samples = generate_responses(
            base, tokenizer, batch, args.max_prompt_length, args.max_new_tokens, args.temperature, args.top_p,
            num_return_sequences=extra, compile=args.compile_generation,
        )  # fmt: skip
        new = scorers.score(samples.prompts, samples.responses, args)
        new |= {"response": samples.responses, "length": reply_lengths(samples, tokenizer)}
        for key, values in new.items():
            for j, value in enumerate(values):  # rows are prompt-major: `extra` replies of one prompt in a row
                draws[key][i + j // extra].append(value)
    return draws


def best_of_n(base_out, draws, args):
    """Best-of-N from base (Stiennon et al. 2020; Gao et al. 2022): per prompt the proxy picks the highest-scoring
    of N base replies. The first of each prompt's N is base's own evaluated reply (`base_out`), so N = 1 is base;
    the other N - 1 are `best_of_n_draws`. Returns {N: out} for N = 1, 2, 4, ... up to --best_of_n, each a
    best-of-N reply per prompt with its scores and length (its KL is analytic: `best_of_n_kl`)."""
    replies = {key: [[own, *more] for own, more in zip(base_out[key], draws[key])] for key in draws}
    results = {}
    for n in (2**k for k in range(args.best_of_n.bit_length())):
        picks = [int(np.argmax(rewards[:n])) for rewards in replies["reward"]]  # the first of equal scores
        results[n] = {key: [d[p] for d, p in zip(values, picks)] if values else [] for key, values in replies.items()}
    return results


def best_of_n_kl(n):
    """KL(best-of-N || base) = log N - (N - 1) / N nats (Stiennon et al. 2020, appendix G.3)."""
    return float(np.log(n) - (n - 1) / n)


def bootstrap_ci(values, num_samples, seed, level=0.95):
    """Percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(num_samples)]
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def last_record(folder):
    """The last record of a model folder's metrics.jsonl (None without one)."""
    path = Path(folder) / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    return records[-1] if records else None


def training_cost(folder):
    """Wall time, tokens and peak memory from the last record of a model folder's metrics.jsonl."""
    last = last_record(folder)
    if last is None:
        print(f"{Path(folder) / 'metrics.jsonl'} not found or empty: no training cost for this model")
        return {}
    return {
        "train_time_s": last.get("time/elapsed_s"),
        "train_tokens": last.get("tokens/processed"),
        "train_peak_mb": last.get("mem/peak_mb"),
    }


def oracle_gain_ci(labels, other_labels, args):
    """The 95% bootstrap interval of the gain in real answers ("good") of one model over another, paired by prompt."""
    gain = (np.asarray(labels) == "good").astype(float) - (np.asarray(other_labels) == "good")
    return bootstrap_ci(gain, args.bootstrap_samples, args.seed)


def oracle_summary(labels, base_labels, labels_order, args, sft_labels=None):
    """The oracle's columns of one model: good share (95% CI), its gain over base (paired CI) and, for a policy that
    started from the SFT model (`sft_labels`: its labels), over SFT (paired CI), every label's share."""
    good = np.asarray(labels) == "good"
    low, high = bootstrap_ci(good, args.bootstrap_samples, args.seed)
    gain_low, gain_high = oracle_gain_ci(labels, base_labels, args)
    row = {
        "oracle_good": good.mean(),
        "oracle_good_ci_low": low,
        "oracle_good_ci_high": high,
        "oracle_gain_ci_low": gain_low,
        "oracle_gain_ci_high": gain_high,
        "oracle_gain_over_sft_ci_low": np.nan,
        "oracle_gain_over_sft_ci_high": np.nan,
    }
    if sft_labels is not None:
        low, high = oracle_gain_ci(labels, sft_labels, args)
        row |= {"oracle_gain_over_sft_ci_low": low, "oracle_gain_over_sft_ci_high": high}
    return row | {f"oracle_{label}": float(np.mean(np.asarray(labels) == label)) for label in labels_order[1:]}


def gold_columns(out, args):
    """The gold reward model's mean score with its 95% interval, when the replies carry gold scores."""
    if not out.get("gold"):
        return {}
    low, high = bootstrap_ci(out["gold"], args.bootstrap_samples, args.seed)
    return {"gold_mean": float(np.mean(out["gold"])), "gold_ci_low": low, "gold_ci_high": high}


def summarize(results, costs, args, oracle_labels=None, starts=None):
    """One row per model: reward (95% bootstrap CI), share beating base, KL to base, the model it started from
    (`starts`: {name: "sft" | "base"}) and the KL to it, diversity, length, cost, and, where the replies carry oracle
    labels (`oracle_labels`: every label, "good" first), the oracle's columns."""
    starts = starts or {}
    base_rewards = np.asarray(results["base"]["reward"])
    rows = []
    for name, out in results.items():
        rewards = np.asarray(out["reward"])
        from_sft = starts.get(name) == "sft" and "sft" in results  # a policy that started from the SFT model
        ci = (args.bootstrap_samples, args.seed)
        low, high = bootstrap_ci(rewards, *ci)
        row = {
            "model": name,
            "reward_mean": rewards.mean(),
            "reward_ci_low": low,
            "reward_ci_high": high,
            "beats_base_share": np.nan if name == "base" else float(np.mean(rewards > base_rewards)),
            "beats_sft_share": float(np.mean(rewards > np.asarray(results["sft"]["reward"]))) if from_sft else np.nan,
            "kl_mean": 0.0 if name == "base" else float(np.mean(out["kl"])),
            **dict(zip(("kl_ci_low", "kl_ci_high"), (0.0, 0.0) if name == "base" else bootstrap_ci(out["kl"], *ci))),
            "reference": starts.get(name, "") if name != "base" else "",
            "kl_ref_mean": 0.0 if name == "base" else float(np.mean(out.get("kl_ref") or out["kl"])),
            **gold_columns(out, args),
            "distinct_share": len(set(out["response"])) / len(out["response"]),
            "length_mean": float(np.mean(out["length"])),
            **{k: costs.get(name, {}).get(k, np.nan) for k in ("train_time_s", "train_tokens", "train_peak_mb")},
        }
        if oracle_labels:
            sft_labels = results["sft"]["oracle"] if from_sft else None
            row |= oracle_summary(out["oracle"], results["base"]["oracle"], oracle_labels, args, sft_labels)
        if oracle_labels and name == GRPO_ORACLE and "grpo" in results:  # what the proxy's blind spots cost GRPO
            low, high = oracle_gain_ci(out["oracle"], results["grpo"]["oracle"], args)
            row |= {"oracle_gain_over_grpo_ci_low": low, "oracle_gain_over_grpo_ci_high": high}
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["train_tokens"] = summary["train_tokens"].astype("Int64")  # a count, shown without decimals
    return summary


CARD_COLUMNS = [  # the summary's columns a model card shows (those this evaluation has)
    "reward_mean", "reward_ci_low", "reward_ci_high", "beats_base_share", "beats_sft_share", "kl_mean", "kl_ref_mean",
    "gold_mean", "gold_ci_low", "gold_ci_high", "oracle_good", "oracle_gain_ci_low", "oracle_gain_ci_high",
    "oracle_gain_over_sft_ci_low", "oracle_gain_over_sft_ci_high", "distinct_share", "length_mean",
]  # fmt: skip


def card_table(summary, name):
    """The summary's rows for base, the SFT model (where evaluated) and `name`: a markdown table, a figure a line."""
    names = list(dict.fromkeys(["base", *(["sft"] if "sft" in set(summary.model) else []), name]))
    rows = summary.set_index("model").loc[names]
    lines = [f"| figure | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for column in [c for c in CARD_COLUMNS if c in rows]:
        cells = ["" if pd.isna(v) else f"{v:.3f}" for v in rows[column]]
        lines.append(f"| `{column}` | {' | '.join(cells)} |")
    return "\n".join(lines)


def frontier_row(method, step, n, out, kl, args):
    """One point of the frontier: proxy reward, gold reward, oracle share (each with a 95% interval where it
    exists), KL to base, distinct share and length of one set of replies."""
    low, high = bootstrap_ci(out["reward"], args.bootstrap_samples, args.seed)
    row = {"method": method, "step": step, "n": n, "kl": kl, "sqrt_kl": float(np.sqrt(max(kl, 0.0)))}
    row |= {"proxy_mean": float(np.mean(out["reward"])), "proxy_ci_low": low, "proxy_ci_high": high}
    row |= gold_columns(out, args)
    if out.get("oracle"):
        good = np.asarray(out["oracle"]) == "good"
        low, high = bootstrap_ci(good, args.bootstrap_samples, args.seed)
        row |= {"oracle_good": float(good.mean()), "oracle_good_ci_low": low, "oracle_good_ci_high": high}
    distinct = len(set(out["response"])) / len(out["response"])
    return row | {"distinct_share": distinct, "length_mean": float(np.mean(out["length"]))}


def frontier_paths(work_dir):
    """Each method's path on the frontier, {method: [(step, folder), ...]}: the snapshots its trainer kept, then its
    final policy (at its last logged step). GRPO's path ends in its final policy, not in the best-by-validation one."""
    paths = {}
    for method, (run_name, final_dir) in FRONTIER_RUNS.items():
        final = work_dir / final_dir
        if not (final / "config.json").is_file():
            if method not in OPTIONAL:
                print(f"{final} not found: {method} has no path on the frontier")
            continue
        last = last_record(final)
        final_step, saved_at = (last["step"] if last else None), (final / "config.json").stat().st_mtime
        paths[method] = []
        for step, folder in snapshots(work_dir / "runs" / run_name):
            # a run writes its snapshots before its final folder: one at or past its last step, or written
            # after it, is another run's
            if (final_step is not None and step >= final_step) or (folder / "config.json").stat().st_mtime > saved_at:
                print(f"{folder} is not from the run that wrote {final} (its last step {final_step}): left out")
                continue
            paths[method].append((step, folder))
        paths[method].append((final_step, final))
    return paths


def frontier(paths, outs, bon, args, starts=None):
    """The reward-KL frontier: base; every point of each method's path, with the model it started from (`starts`:
    {method: "sft" | "base"}); best-of-N from base. `outs` holds every model's evaluation by folder (None: base), all
    on the same prompts, decoding settings and seed as the table; every KL is to base, so all share one origin."""
    rows = [frontier_row("base", 0, None, outs[None], 0.0, args)]
    for method, path in paths.items():
        rows += [
            frontier_row(method, step, None, outs[folder], float(np.mean(outs[folder]["kl"])), args)
            | {"start": (starts or {}).get(method, "base")}
            for step, folder in path
        ]
    rows += [frontier_row("best_of_n", None, n, out, best_of_n_kl(n), args) for n, out in bon.items()]
    table = pd.DataFrame(rows)
    table[["step", "n"]] = table[["step", "n"]].astype("Int64")
    return table


# Every evaluation is a job: ("model", label, folder), folder None for base, or ("best_of_n",). `main` puts what the
# jobs need here; forked workers inherit it (nothing is pickled but a job and its result).
JOB_CONTEXT = {}


def run_job(job):
    """One job, in this process or a worker: a model's evaluation, or best-of-N's extra draws from base."""
    c = JOB_CONTEXT
    progress = c["workers"] == 1  # side by side, one bar counts the jobs instead
    if job[0] == "best_of_n":
        return best_of_n_draws(c["base"], c["tokenizer"], c["prompts"], c["scorers"], c["args"], progress)
    _, label, folder = job
    model, base = (c["base"], None) if folder is None else (c["load_policy"](folder), c["base"])
    reference = c["references"].get(folder)  # the SFT model, for a policy that started from it
    return evaluate_model(
        label, model, base, c["tokenizer"], c["prompts"], c["scorers"], c["args"], progress, reference
    )


def init_worker():
    """A forked evaluation process: one thread; Ctrl-C and SIGTERM are the parent's (it ends the pool quietly)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not lifecycle.run's interrupt: the pool's end is no interruption


def run_jobs(jobs, workers):
    """Every job's result, in order: one after another, or on `workers` forked processes of one thread each (CPU),
    which inherit the loaded models. Each job seeds itself, so the results are the same either way."""
    JOB_CONTEXT["workers"] = workers
    if workers == 1:
        return [run_job(job) for job in jobs]
    import multiprocessing

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers' tokenizers are forked: no threads in them
    with multiprocessing.get_context("fork").Pool(workers, initializer=init_worker) as pool:
        return list(tqdm(pool.imap(run_job, jobs), total=len(jobs), desc=f"evaluate ({workers} processes)"))


def plot_frontier(path, table):
    """Proxy reward, gold reward and the oracle's share of real answers against sqrt(KL to base): one line per
    method from base through its snapshots to its final policy, best-of-N from base as the reference curve.
    Returns each panel's y range, by column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("proxy_mean", "proxy", "proxy reward (the policies' own)")]
    panels += [("gold_mean", "gold", "gold reward (held out)")] if "gold_mean" in table else []
    panels += [("oracle_good", "oracle_good", "oracle: share of real answers")] if "oracle_good" in table else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    base = table[table.method == "base"]
    for ax, (key, ci, label) in zip(axes[0], panels):
        for i, method in enumerate(FRONTIER_RUNS):
            points = table[table.method == method]
            via_sft = method != "sft" and "start" in points and (points["start"] == "sft").any()  # base, SFT, path
            path_points = pd.concat([base, *([table[table.method == "sft"]] if via_sft else []), points])
            if len(path_points) > 1:
                ax.errorbar(
                    path_points.sqrt_kl, path_points[key],
                    yerr=[path_points[key] - path_points[f"{ci}_ci_low"], path_points[f"{ci}_ci_high"] - path_points[key]],
                    marker="o", ms=4, capsize=2, color=f"C{i + 1}", label=method,
                )  # fmt: skip
        sft = table[table.method == "sft"]
        if len(sft):  # the policies' start, on top of the lines that pass through it
            ax.scatter(sft.sqrt_kl, sft[key], marker="*", s=160, color="C1", edgecolor="black", zorder=4)
        bon = table[table.method == "best_of_n"]
        if len(bon):
            ax.plot(bon.sqrt_kl, bon[key], "k--", marker="s", ms=4, label="best-of-N from base")
            for _, row in bon.iterrows():
                ax.annotate(
                    f"N={row.n}", (row.sqrt_kl, row[key]), fontsize=7, xytext=(3, -9), textcoords="offset points"
                )
        ax.scatter(base.sqrt_kl, base[key], color="C0", zorder=3, label="base")
        ax.set_xlabel("sqrt(KL to base), nats^0.5")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "oracle_good":  # a share on its whole scale: 0.58 -> 0.69 is no cliff
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("what the policies bought: reward against drift from base")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {key: ax.get_ylim() for ax, (key, _, _) in zip(axes[0], panels)}


def results_table(prompts, results):
    """Sheet 1: prompt, then per model its response, reward and (policies) KL, in pipeline order."""
    columns = {"prompt": prompts}
    for name, out in results.items():
        columns[f"{name}_response"] = out["response"]
        columns[f"{name}_reward"] = out["reward"]
        if out.get("gold"):
            columns[f"{name}_gold"] = out["gold"]
        if name != "base":
            columns[f"{name}_kl"] = out["kl"]
            columns[f"{name}_kl_ref"] = out.get("kl_ref") or out["kl"]
        if out.get("oracle"):
            columns[f"{name}_oracle"] = out["oracle"]
    return pd.DataFrame(columns)


def excel_safe(value):
    """Control characters a worksheet cannot store, shown escaped (`\\x07`); other values unchanged."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    if isinstance(value, str):
        return ILLEGAL_CHARACTERS_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return value


def replace_file(tmp, final):
    """Rename a finished `tmp` file to `final`; an earlier `final` is kept as `<stem>.prev<suffix>`."""
    final = Path(final)
    if final.exists():
        prev = final.with_name(f"{final.stem}.prev{final.suffix}")
        os.replace(final, prev)
        print(f"kept the previous {final.name} as {prev}")
    os.replace(tmp, final)


def keep_as_text(worksheet):
    """Cells openpyxl took for formulas (a reply starting with "=") stored as the text they are: a formula cell
    reads back empty, since no spreadsheet program has computed it. No column of ours holds a formula."""
    for row in worksheet.iter_rows():
        for cell in row:
            if cell.data_type == "f":
                cell.data_type = "s"


def write_xlsx(path, table, summary):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
        for name, sheet in (("results", table), ("summary", summary)):
            sheet.map(excel_safe).to_excel(writer, sheet_name=name, index=False)
            keep_as_text(writer.sheets[name])
    replace_file(tmp, path)


def write_jsonl(path, test_indices, prompts, results):
    """One JSON object per prompt with every model's raw reply, reward, KL and length (lossless)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (index, prompt) in enumerate(zip(test_indices, prompts)):
            record = {"test_index": index, "prompt": prompt}
            for name, out in results.items():
                record |= {f"{name}_{key}": values[i] for key, values in out.items() if values}
            f.write(json.dumps(record) + "\n")
    replace_file(tmp, path)


def plot_results(work_dir, results, summary):
    """Reward box plot, reward-vs-KL scatter, and mean reward against training cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = {n: f"C{i}" for i, n in enumerate(names)}  # one colour per model in every figure (and the notebook)
    stats = summary.set_index("model")

    def mean_with_ci(ax, x, name, **kwargs):
        mean, low, high = stats.loc[name, ["reward_mean", "reward_ci_low", "reward_ci_high"]]
        ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color=colors[name], **kwargs)

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.boxplot([results[n]["reward"] for n in names], tick_labels=names, showmeans=True)
    ax.set_ylabel("reward-model score")
    ax.set_title(f"rewards on {len(results['base']['reward'])} test prompts (triangle = mean)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(Path(work_dir) / BOXPLOT_PNG, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.axhline(stats.loc["base", "reward_mean"], color=colors["base"], linestyle="--", label="base mean reward")
    for n in names[1:]:
        ax.scatter(results[n]["kl"], results[n]["reward"], s=10, alpha=0.3, color=colors[n])
        mean_with_ci(ax, stats.loc[n, "kl_mean"], n, ms=9, label=f"{n} (mean, 95% CI)")
    ax.set_xlabel("KL to base per sample (nats, sum over reply tokens)")
    ax.set_ylabel("reward-model score")
    ax.set_title("reward vs KL to base")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(work_dir) / REWARD_VS_KL_PNG, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in zip(
        axes, ("train_time_s", "train_tokens"), ("training wall time (s)", "tokens processed in training")
    ):
        ax.axhline(stats.loc["base", "reward_mean"], color=colors["base"], linestyle="--", label="base")
        for n in names[1:]:
            if pd.notna(stats.loc[n, key]):  # a policy without metrics.jsonl has no cost to plot
                mean_with_ci(ax, stats.loc[n, key], n, label=n)
        ax.set_xlim(left=0)  # base sits at zero training cost
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean reward (95% CI)")
    fig.suptitle("alignment quality against training cost")
    fig.tight_layout()
    fig.savefig(Path(work_dir) / COST_PNG, dpi=100)
    plt.close(fig)


def main(args):
    check(args.num_prompts > 0, f"--num_prompts must be positive, got {args.num_prompts}")
    check(args.batch_size > 0, f"--batch_size must be positive, got {args.batch_size}")
    check(
        args.max_prompt_length > 0 and args.max_new_tokens > 0,
        "--max_prompt_length and --max_new_tokens must be positive",
    )
    check(args.temperature > 0, f"--temperature must be positive, got {args.temperature}")
    check(0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")
    check(args.bootstrap_samples > 0, f"--bootstrap_samples must be positive, got {args.bootstrap_samples}")
    check(args.workers >= 0, f"--workers must be 0 (one per thread) or a number of processes, got {args.workers}")
    check(
        args.best_of_n >= 0 and args.best_of_n & (args.best_of_n - 1) == 0,
        f"--best_of_n must be 0 or a power of 2 (1, 2, 4, ...), got {args.best_of_n}",
    )
    work_dir = Path(args.work_dir)
    for run_name in ("grpo", GRPO_ORACLE):
        check_grpo_pair(work_dir, args, run_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(args.seed)

    # data: a seeded sample of the test split, kept in split order
    data = load_processed_data(args)
    test = data["test"]
    if len(test) < args.num_prompts:
        print(
            f"the test split holds only {len(test)} prompts: evaluating all of them (--num_prompts {args.num_prompts})"
        )
    test_indices, prompts = test_prompt_sample(test, args.num_prompts, args.seed)

    # models: the reward model, base, and whichever policies have been trained
    reward_model, rm_tokenizer = load_reward_model(work_dir, device, args)
    tokenizer = load_tokenizer(args.model)
    base = freeze(load_causal_lm(resolve_model_name(args.model), tokenizer).to(device))
    check_positions(base.config, args.max_prompt_length + args.max_new_tokens, PROMPT_AND_REPLY)
    check_positions(reward_model.config, args.reward_max_length, "--reward_max_length")
    policies = {}
    for name, folder in POLICY_DIRS.items():
        if (work_dir / folder / "config.json").is_file():
            policies[name] = work_dir / folder
        elif name not in OPTIONAL:
            print(f"{work_dir / folder} not found: {name} is left out of the evaluation")
    remove_leftovers(work_dir, *policies.values())  # a killed evaluation's half-written tables and cards

    gold, has_gold = None, (work_dir / GOLD_REWARD_MODEL_DIR / "config.json").is_file()
    if has_gold and GOLD_SPLIT not in data:
        print(
            f"{work_dir / GOLD_REWARD_MODEL_DIR} is left out: processed_data/ has no {GOLD_SPLIT} split any more "
            "(rebuilt without --gold_share), so the pairs it was trained on may be the policies' own"
        )
    elif has_gold:
        gold = load_reward_model(work_dir, device, args, gold=True)
        print(f"{work_dir / GOLD_REWARD_MODEL_DIR}: the held-out gold reward model scores every reply too")
    oracle = load_oracle(work_dir)
    if oracle:
        print("tiny data: the generator's oracle (assets/tiny_oracle.py) labels every reply beside the reward model")
    scorers = Scorers((reward_model, rm_tokenizer), gold, oracle)

    def load_policy(folder):
        policy = freeze(load_causal_lm(folder, tokenizer).to(device))
        check(
            policy.config.vocab_size == base.config.vocab_size,
            f"{folder} has a vocabulary of {policy.config.vocab_size}, base {args.model} of "
            f"{base.config.vocab_size}: was it trained from another --model?",
        )
        return policy

    # each policy's reference is the model it started from (its args.json's init_from): base or the SFT model
    starts = {name: started_from(folder) for name, folder in policies.items()}
    for name, start in starts.items():
        if start == "sft" and "sft" not in policies:
            print(
                f"{policies[name]} started from {work_dir / SFT_DIR}, which is gone: its KL to its reference is to base"
            )
            starts[name] = "base"
    sft = load_policy(policies["sft"]) if "sft" in starts.values() else None
    references = {policies[name]: sft for name, start in starts.items() if start == "sft"}

    # every model samples, is scored and measured (KL to base): base, the policies, the frontier's snapshots (a
    # model of the table is not sampled twice), and best-of-N draws more base replies; the longest job first
    paths = frontier_paths(work_dir) if args.frontier else {}
    folders = [None, *policies.values()]
    folders += [folder for path in paths.values() for _, folder in path if folder not in folders]
    labels = {folder: f"{method} step {step}" for method, path in paths.items() for step, folder in path}
    labels |= {None: "base", **{folder: name for name, folder in policies.items()}}
    jobs = [("best_of_n",)] if args.frontier and args.best_of_n else []
    jobs += [("model", labels[folder], folder) for folder in folders]
    workers = 1 if device.type == "cuda" else min(args.workers or torch.get_num_threads(), len(jobs))
    JOB_CONTEXT.update(
        base=base,
        tokenizer=tokenizer,
        prompts=prompts,
        scorers=scorers,
        args=args,
        load_policy=load_policy,
        references=references,
    )
    print(f"evaluating base and {', '.join(policies) or 'no policy'} on {len(prompts)} test prompts")
    done = run_jobs(jobs, workers)
    draws = done.pop(0) if jobs[0] == ("best_of_n",) else None
    outs = dict(zip(folders, done))
    results = {"base": outs[None], **{name: outs[folder] for name, folder in policies.items()}}
    costs = {name: training_cost(folder) for name, folder in policies.items()}
    points = None
    if args.frontier:
        bon = best_of_n(results["base"], draws, args) if draws is not None else {}
        points = frontier(paths, outs, bon, args, starts)

    # save: the table and summary, the raw text, the plots
    summary = summarize(results, costs, args, oracle.LABELS if oracle else None, starts)
    picked = {name: selected_by(folder) for name, folder in policies.items()}
    summary["selected_by"] = [picked.get(name) or "" for name in summary.model]  # which held-out score chose it
    for name in (name for name, by in picked.items() if by == "gold"):
        print(
            f"{name}: its checkpoint was picked by the gold reward model (--select_by gold): its gold figures are "
            "selection-biased, no independent check"
        )
    write_xlsx(work_dir / RESULTS_XLSX, results_table(prompts, results), summary)
    write_jsonl(work_dir / RESPONSES_JSONL, test_indices, prompts, results)
    plot_results(work_dir, results, summary)
    written = [RESULTS_XLSX, RESPONSES_JSONL, BOXPLOT_PNG, REWARD_VS_KL_PNG, COST_PNG]
    if points is not None:
        tmp = work_dir / f".{FRONTIER_CSV}.tmp-{os.getpid()}"
        points.to_csv(tmp, index=False)
        replace_file(tmp, work_dir / FRONTIER_CSV)
        plot_frontier(work_dir / FRONTIER_PNG, points)
        written += [FRONTIER_CSV, FRONTIER_PNG]
    for name, folder in policies.items():  # each policy's card gains its row beside base's
        add_evaluation_to_card(folder, card_table(summary, name), command_line("evaluate_models.py", args, TINY))
    oracle_columns = [c for c in summary.columns if c.startswith("oracle_")]
    for columns in ([c for c in summary.columns if c not in oracle_columns], ["model", *oracle_columns]):
        if len(columns) > 1:
            print(summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if points is not None:
        shown = ["method", "step", "n", "kl", "proxy_mean", "gold_mean", "oracle_good", "distinct_share", "length_mean"]
        table = points[[c for c in shown if c in points]].to_string(
            index=False, float_format="{:.3f}".format, na_rep=""
        )
        print(f"the frontier (proxy and gold reward, oracle share against KL to base):\n{table}")
    for name in written:
        print(f"wrote {work_dir / name}")


if __name__ == "__main__":
    run(main, Args, TINY)
