"""Step 6 of the pipeline: sample, score and compare base, PPO, GRPO and DPO on test prompts.

For a seeded sample of test prompts from `processed_data/` (150 by default), the base
model and every trained policy that exists (`ppo_rlhf_model/`, `grpo_best/`,
`dpo_rlhf_model/`) each sample one reply with the same decoding settings (batched,
KV-cached, `top_k=0`, stopped at EOS). Then, per model:

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
   shows up here as a high reward and a low `oracle_good`.

Writes into `--work_dir`: `rlhf_eval_results_with_base.xlsx` (sheet `results`: one row
per prompt; sheet `summary`), `rlhf_eval_responses.jsonl` (the raw text, lossless),
`rlhf_eval_rewards_boxplot.png`, `rlhf_eval_reward_vs_kl.png` and `rlhf_eval_cost.png`
(mean reward against training time and tokens). A policy folder that is missing is
reported and its columns left out.

    python evaluate_models.py                                   # after the gpt2 pipeline
    python evaluate_models.py --preset tiny --work_dir runs/demo

Deliberate choices:
* the random state is reset to `--seed` before each model samples, so a rerun gives the
  same table and a policy identical to base gives base's replies (KL exactly 0);
* worksheet cells cannot hold most control characters: in the xlsx they are shown
  escaped (`\\x07`); the JSONL keeps the text exactly as generated (and is what the
  notebook's judge reads); a reply starting with "=" is stored as text, not a formula;
* with `--top_p` below 1 the samples come from the truncated distribution while the KL
  uses the full tempered distributions, so it is then only an approximation.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common import (
    DPO_DIR,
    GRPO_BEST_DIR,
    GRPO_FINAL_DIR,
    PPO_DIR,
    PROCESSED_DIR,
    RUN_ID_FILE,
    TINY_DATA_DIR,
    CommonArgs,
    check,
    command,
    damage,
    gather_logprobs,
    generate_responses,
    get_reward,
    load_causal_lm,
    load_processed_data,
    load_reward_model,
    load_tokenizer,
    read_metrics,
    resolve_model_name,
    response_logits,
    run,
    set_seed,
    test_prompt_sample,
)


@dataclass
class Args(CommonArgs):
    # data
    num_prompts: int = field(default=150, metadata={"help": "test prompts sampled (seeded) from processed_data/"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept, truncated from the left"})
    # decoding (the same for every model)
    max_new_tokens: int = field(default=64, metadata={"help": "reply tokens sampled at most (stops at EOS)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the KL uses the same one)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (1.0 = the full distribution)"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call and per scoring pass"})
    # scoring
    reward_max_length: int = field(default=512, metadata={"help": "tokens per text for the reward model"})
    # analysis
    bootstrap_samples: int = field(
        default=10_000, metadata={"help": "bootstrap resamples for the 95 percent intervals"}
    )


TINY = dict(batch_size=50, reward_max_length=256, bootstrap_samples=2000)

# Column prefix -> output folder of the script that trains it, in the order of the table.
POLICY_DIRS = {"ppo": PPO_DIR, "grpo": GRPO_BEST_DIR, "dpo": DPO_DIR}
RESULTS_XLSX = "rlhf_eval_results_with_base.xlsx"
RESPONSES_JSONL = "rlhf_eval_responses.jsonl"
BOXPLOT_PNG = "rlhf_eval_rewards_boxplot.png"
REWARD_VS_KL_PNG = "rlhf_eval_reward_vs_kl.png"
COST_PNG = "rlhf_eval_cost.png"


def check_grpo_pair(work_dir, args):
    """`grpo_best/` and `grpo_rlhf_model/` must come from one run: a kill between their two saves leaves a new
    one beside an older run's other, both complete; the run id GRPO writes into both tells them apart."""
    ids = {}
    for folder in (GRPO_BEST_DIR, GRPO_FINAL_DIR):
        path = work_dir / folder / RUN_ID_FILE
        ids[folder] = None
        if path.is_file():
            check(damage(path) is None, f"{path} is {damage(path)}: rerun `{command('GRPO_training.py', args)}`")
            ids[folder] = json.loads(path.read_text()).get("run_id")
    check(
        not (work_dir / GRPO_FINAL_DIR).is_dir() or ids[GRPO_BEST_DIR] == ids[GRPO_FINAL_DIR],
        f"{work_dir / GRPO_BEST_DIR} and {work_dir / GRPO_FINAL_DIR} come from two GRPO runs (run ids "
        f"{ids[GRPO_BEST_DIR]} and {ids[GRPO_FINAL_DIR]}): the last one was killed while saving; finish it with "
        f"`{command('GRPO_training.py', args)} --resume` (and the run's other flags)",
    )


@torch.no_grad()
def sequence_kl(policy, base, samples, temperature):
    """Per-sample KL estimate: sum over reply tokens of log pi(a_t) - log pi_base(a_t): (B,)."""
    context_length = samples.query_ids.shape[1]
    logits, _ = response_logits(policy, samples.input_ids, samples.attention_mask, context_length, temperature)
    ref_logits, _ = response_logits(base, samples.input_ids, samples.attention_mask, context_length, temperature)
    logprobs = gather_logprobs(logits, samples.response_ids)  # (B, R)
    ref_logprobs = gather_logprobs(ref_logits, samples.response_ids)  # (B, R)
    return ((logprobs - ref_logprobs) * samples.response_mask).sum(-1)  # (B,)


def load_oracle(work_dir):
    """The tiny world's oracle (`assets/tiny_oracle.py`) when processed_data/ holds the bundled tiny data, else None."""
    stats = json.loads((Path(work_dir) / PROCESSED_DIR / "stats.json").read_text())
    if Path(stats["dataset"]).resolve() != TINY_DATA_DIR.resolve():
        return None
    from assets import tiny_oracle

    return tiny_oracle


def evaluate_model(name, model, base, tokenizer, prompts, reward_model, rm_tokenizer, args, oracle=None):
    """Sample one reply per prompt, score it, (for a policy) its KL to base, and (tiny data) the oracle's label."""
    set_seed(args.seed)  # every model draws from the same random stream
    out = {"response": [], "reward": [], "kl": [], "length": [], "oracle": []}
    for i in tqdm(range(0, len(prompts), args.batch_size), desc=f"evaluate {name}"):
        batch = prompts[i : i + args.batch_size]
        samples = generate_responses(
            model, tokenizer, batch, args.max_prompt_length, args.max_new_tokens, args.temperature, args.top_p
        )
        out["response"] += samples.responses
        out["reward"] += get_reward(
            reward_model, rm_tokenizer, batch, samples.responses, args.reward_max_length
        ).tolist()
        # reply length without its final EOS: the mask covers the reply up to and including the first EOS
        not_eos = samples.response_ids != tokenizer.eos_token_id  # (B, R)
        out["length"] += (samples.response_mask * not_eos).sum(-1).tolist()
        if base is not None:
            out["kl"] += sequence_kl(model, base, samples, args.temperature).tolist()
        if oracle is not None:
            out["oracle"] += [oracle.judge(p, r) for p, r in zip(batch, samples.responses)]
    return out


def bootstrap_ci(values, num_samples, seed, level=0.95):
    """Percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(num_samples)]
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def training_cost(folder):
    """Wall time, tokens and peak memory from the last record of a model folder's metrics.jsonl."""
    path = Path(folder) / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    if not records:
        print(f"{path} not found or empty: no training cost for this model")
        return {}
    last = records[-1]
    return {
        "train_time_s": last.get("time/elapsed_s"),
        "train_tokens": last.get("tokens/processed"),
        "train_peak_mb": last.get("mem/peak_mb"),
    }


def oracle_summary(labels, base_labels, labels_order, args):
    """The oracle's columns of one model: good share (95% CI), its gain over base (paired CI), every label's share."""
    good, base_good = np.asarray(labels) == "good", np.asarray(base_labels) == "good"
    low, high = bootstrap_ci(good, args.bootstrap_samples, args.seed)
    gain_low, gain_high = bootstrap_ci(good.astype(float) - base_good, args.bootstrap_samples, args.seed)
    return {
        "oracle_good": good.mean(),
        "oracle_good_ci_low": low,
        "oracle_good_ci_high": high,
        "oracle_gain_ci_low": gain_low,
        "oracle_gain_ci_high": gain_high,
        **{f"oracle_{label}": float(np.mean(np.asarray(labels) == label)) for label in labels_order[1:]},
    }


def summarize(results, costs, args, oracle_labels=None):
    """One row per model: reward (95% bootstrap CI), share beating base, KL, diversity, length, cost,
    and, where the replies carry oracle labels (`oracle_labels`: every label, "good" first), the oracle's columns."""
    base_rewards = np.asarray(results["base"]["reward"])
    rows = []
    for name, out in results.items():
        rewards = np.asarray(out["reward"])
        low, high = bootstrap_ci(rewards, args.bootstrap_samples, args.seed)
        row = {
            "model": name,
            "reward_mean": rewards.mean(),
            "reward_ci_low": low,
            "reward_ci_high": high,
            "beats_base_share": np.nan if name == "base" else float(np.mean(rewards > base_rewards)),
            "kl_mean": 0.0 if name == "base" else float(np.mean(out["kl"])),
            "distinct_share": len(set(out["response"])) / len(out["response"]),
            "length_mean": float(np.mean(out["length"])),
            **{k: costs.get(name, {}).get(k, np.nan) for k in ("train_time_s", "train_tokens", "train_peak_mb")},
        }
        if oracle_labels:
            row |= oracle_summary(out["oracle"], results["base"]["oracle"], oracle_labels, args)
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["train_tokens"] = summary["train_tokens"].astype("Int64")  # a count, shown without decimals
    return summary


def results_table(prompts, results):
    """Sheet 1: prompt, then per model its response, reward and (policies) KL, in pipeline order."""
    columns = {"prompt": prompts}
    for name, out in results.items():
        columns[f"{name}_response"] = out["response"]
        columns[f"{name}_reward"] = out["reward"]
        if name != "base":
            columns[f"{name}_kl"] = out["kl"]
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
    work_dir = Path(args.work_dir)
    check_grpo_pair(work_dir, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(args.seed)

    # data: a seeded sample of the test split, kept in split order
    test = load_processed_data(args)["test"]
    if len(test) < args.num_prompts:
        print(
            f"the test split holds only {len(test)} prompts: evaluating all of them (--num_prompts {args.num_prompts})"
        )
    test_indices, prompts = test_prompt_sample(test, args.num_prompts, args.seed)

    # models: the reward model, base, and whichever policies have been trained
    reward_model, rm_tokenizer = load_reward_model(work_dir, device, args)
    tokenizer = load_tokenizer(args.model)
    base = load_causal_lm(resolve_model_name(args.model), tokenizer).to(device).eval()
    positions = base.config.max_position_embeddings
    check(
        args.max_prompt_length + args.max_new_tokens <= positions,
        f"--max_prompt_length + --max_new_tokens must fit the base model's {positions} positions",
    )
    check(
        args.reward_max_length <= reward_model.config.max_position_embeddings,
        f"--reward_max_length must fit the reward model's {reward_model.config.max_position_embeddings} positions",
    )
    policies = {}
    for name, folder in POLICY_DIRS.items():
        if (work_dir / folder / "config.json").is_file():
            policies[name] = work_dir / folder
        else:
            print(f"{work_dir / folder} not found: {name} is left out of the evaluation")

    oracle = load_oracle(work_dir)
    if oracle:
        print("tiny data: the generator's oracle (assets/tiny_oracle.py) labels every reply beside the reward model")

    # sample, score and measure KL, one policy in memory at a time
    print(f"evaluating base and {', '.join(policies) or 'no policy'} on {len(prompts)} test prompts")
    score = dict(reward_model=reward_model, rm_tokenizer=rm_tokenizer, args=args, oracle=oracle)
    results = {"base": evaluate_model("base", base, None, tokenizer, prompts, **score)}
    costs = {}
    for name, folder in policies.items():
        policy = load_causal_lm(folder, tokenizer).to(device).eval()
        check(
            policy.config.vocab_size == base.config.vocab_size,
            f"{folder} has a vocabulary of {policy.config.vocab_size}, base {args.model} of "
            f"{base.config.vocab_size}: was it trained from another --model?",
        )
        results[name] = evaluate_model(name, policy, base, tokenizer, prompts, **score)
        costs[name] = training_cost(folder)
        del policy

    # save: the table and summary, the raw text, the plots
    summary = summarize(results, costs, args, oracle.LABELS if oracle else None)
    write_xlsx(work_dir / RESULTS_XLSX, results_table(prompts, results), summary)
    write_jsonl(work_dir / RESPONSES_JSONL, test_indices, prompts, results)
    plot_results(work_dir, results, summary)
    oracle_columns = [c for c in summary.columns if c.startswith("oracle_")]
    for columns in ([c for c in summary.columns if c not in oracle_columns], ["model", *oracle_columns]):
        if len(columns) > 1:
            print(summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for name in (RESULTS_XLSX, RESPONSES_JSONL, BOXPLOT_PNG, REWARD_VS_KL_PNG, COST_PNG):
        print(f"wrote {work_dir / name}")


if __name__ == "__main__":
    run(main, Args, TINY)
