"""The evaluation across seeds: what holds beyond one seed's luck.

`run_pipeline.sh --seeds 1,2,3` trains every stage once per seed into WORK_DIR/seed-N/ and evaluates each on the
same test prompts with the same sampling (one data split, the evaluation's --seed kept), so the seeds differ by
their training alone. This reads each seed's evaluation and writes into --work_dir:

* `rlhf_eval_seeds.csv`: per method and figure (reward, KL, gold, oracle share, distinct share, length, the share
  of prompts where it beats base), the mean over the seeds, the 95% interval across them (Student's t on the
  seeds' values: mean +- t(0.975, n-1) * sd / sqrt(n)), and beside it the mean of the seeds' own 95% bootstrap
  intervals over the test prompts (the sampling noise of one evaluation);
* `rlhf_eval_seeds_differences.csv`: for each pair of methods and figure, the mean over the seeds of the
  per-seed difference with its interval across seeds: a difference "holds across seeds" where it excludes 0;
* `rlhf_eval_seeds_frontier.png` (and `.csv`): each method's path against sqrt(KL to base), one thin line per
  seed and their mean, from the seeds' frontiers (where they have one).

    python aggregate_seeds.py --work_dir runs/seeds
"""

import argparse
import itertools
import re
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from evaluate_models import FRONTIER_CSV, RESULTS_XLSX, replace_file  # noqa: E402
from lifecycle import UserError, check  # noqa: E402

SEEDS_CSV = "rlhf_eval_seeds.csv"
DIFFERENCES_CSV = "rlhf_eval_seeds_differences.csv"
SEEDS_FRONTIER_CSV = "rlhf_eval_seeds_frontier.csv"
SEEDS_FRONTIER_PNG = "rlhf_eval_seeds_frontier.png"
# summary column -> its bootstrap interval's columns in one seed's evaluation (None: no interval there)
FIGURES = {
    "reward_mean": ("reward_ci_low", "reward_ci_high"),
    "kl_mean": ("kl_ci_low", "kl_ci_high"),
    "gold_mean": ("gold_ci_low", "gold_ci_high"),
    "oracle_good": ("oracle_good_ci_low", "oracle_good_ci_high"),
    "beats_base_share": None,
    "distinct_share": None,
    "length_mean": None,
}
FRONTIER_FIGURES = [("proxy_mean", "proxy reward"), ("gold_mean", "gold reward"), ("oracle_good", "oracle share")]


def seed_dirs(work_dir):
    """{seed: folder} of every seed-N/ holding an evaluation, in seed order; a one-line error when fewer than 2."""
    found = {int(m[1]): p for p in Path(work_dir).glob("seed-*") if (m := re.fullmatch(r"seed-(\d+)", p.name))}
    done = {s: p for s, p in sorted(found.items()) if (p / RESULTS_XLSX).is_file()}
    missing = sorted(set(found) - set(done))
    check(
        len(done) >= 2,
        f"{work_dir}: {len(done)} seed folder(s) with {RESULTS_XLSX} (seed-N/ from run_pipeline.sh --seeds); "
        f"an interval across seeds needs at least 2{f' (no evaluation yet in seed {missing})' if missing else ''}",
    )
    if missing:
        print(f"seeds {missing} have no evaluation yet: left out")
    return done


def across(values, level=0.95):
    """Mean and the Student-t interval across seeds of `values` (one per seed): (mean, low, high)."""
    values = np.asarray(values, dtype=float)
    mean = values.mean()
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def seeds_table(summaries):
    """One row per method and figure: the mean over seeds, the interval across seeds, the mean bootstrap interval."""
    rows = []
    methods = list(dict.fromkeys(m for s in summaries.values() for m in s.model))
    for method in methods:
        per_seed = {seed: s.set_index("model").loc[method] for seed, s in summaries.items() if method in set(s.model)}
        for figure, interval in FIGURES.items():
            values = [row[figure] for row in per_seed.values() if figure in row and pd.notna(row[figure])]
            if len(values) < 2:
                continue
            mean, low, high = across(values)
            row = {"method": method, "figure": figure, "seeds": len(values), "mean": mean}
            row |= {"seeds_ci_low": low, "seeds_ci_high": high, "seed_sd": float(np.std(values, ddof=1))}
            if interval and all(interval[0] in r for r in per_seed.values()):
                row["within_ci_low"] = float(np.mean([r[interval[0]] for r in per_seed.values()]))
                row["within_ci_high"] = float(np.mean([r[interval[1]] for r in per_seed.values()]))
            rows.append(row | {f"seed_{seed}": r[figure] for seed, r in per_seed.items()})
    return pd.DataFrame(rows)


def differences(summaries):
    """Per pair of methods (policies, and each against base) and figure: the mean per-seed difference and its
    interval across seeds; `holds` where that interval excludes 0."""
    rows = []
    methods = [m for m in dict.fromkeys(m for s in summaries.values() for m in s.model)]
    for a, b in itertools.combinations(methods, 2):
        for figure in ("reward_mean", "gold_mean", "oracle_good", "kl_mean"):
            diffs = []
            for s in summaries.values():
                t = s.set_index("model")
                if a in t.index and b in t.index and figure in t and pd.notna(t.at[a, figure]):
                    diffs.append(t.at[b, figure] - t.at[a, figure])
            if len(diffs) >= 2:
                mean, low, high = across(diffs)
                rows.append({"a": a, "b": b, "figure": figure, "b_minus_a": mean, "ci_low": low, "ci_high": high,
                             "holds": bool(low > 0 or high < 0), "seeds": len(diffs)})  # fmt: skip
    return pd.DataFrame(rows)


def plot_frontiers(frontiers, path):
    """Each method's path per figure against sqrt(KL to base): thin lines per seed, a thick one for their mean."""
    figures = [(c, label) for c, label in FRONTIER_FIGURES if all(c in f for f in frontiers.values())]
    table = pd.concat([f.assign(seed=seed) for seed, f in frontiers.items()])
    table = table[table.method != "best_of_n"]  # base's own best-of-N is the same in every seed (its seed is kept)
    mean = table.groupby(["method", "step"], sort=False, dropna=False).mean(numeric_only=True).reset_index()
    fig, axes = plt.subplots(1, len(figures), figsize=(5 * len(figures), 4), squeeze=False)
    colors = dict(zip(mean.method.unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for ax, (column, label) in zip(axes[0], figures):
        for method, color in colors.items():
            for _, seed_rows in table[table.method == method].groupby("seed"):
                ax.plot(seed_rows.sqrt_kl, seed_rows[column], color=color, alpha=0.3, lw=1, marker=".")
            rows = mean[mean.method == method]
            ax.plot(rows.sqrt_kl, rows[column], color=color, lw=2.5, marker="o", label=method)
        ax.set(xlabel="sqrt(KL to base)", ylabel=label, title=f"{label}: {len(frontiers)} seeds and their mean")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return mean.drop(columns="seed")


def write_csv(table, path):
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    replace_file(tmp, path)


def main(args):
    work_dir = Path(args.work_dir)
    check(work_dir.is_dir(), f"--work_dir {work_dir}: no such folder")
    dirs = seed_dirs(work_dir)
    summaries = {seed: pd.read_excel(d / RESULTS_XLSX, sheet_name="summary") for seed, d in dirs.items()}
    table = seeds_table(summaries)
    write_csv(table, work_dir / SEEDS_CSV)
    diffs = differences(summaries)
    write_csv(diffs, work_dir / DIFFERENCES_CSV)
    written = [SEEDS_CSV, DIFFERENCES_CSV]
    frontiers = {seed: pd.read_csv(d / FRONTIER_CSV) for seed, d in dirs.items() if (d / FRONTIER_CSV).is_file()}
    if len(frontiers) == len(dirs):
        write_csv(plot_frontiers(frontiers, work_dir / SEEDS_FRONTIER_PNG), work_dir / SEEDS_FRONTIER_CSV)
        written += [SEEDS_FRONTIER_CSV, SEEDS_FRONTIER_PNG]
    shown = table.assign(
        seeds_interval=[f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(table.seeds_ci_low, table.seeds_ci_high)]
    )
    print(f"{len(dirs)} seeds ({', '.join(map(str, dirs))}): mean over seeds, 95% interval across seeds")
    print(shown.pivot(index="method", columns="figure", values="mean").round(3).to_string())
    held = diffs[diffs.holds]
    print(f"differences whose interval across seeds excludes 0: {len(held)} of {len(diffs)}")
    if len(held):
        print(
            held[["a", "b", "figure", "b_minus_a", "ci_low", "ci_high"]].to_string(
                index=False, float_format="{:+.3f}".format
            )
        )
    for name in written:
        print(f"wrote {work_dir / name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--work_dir", default=".", help="the folder run_pipeline.sh --seeds wrote seed-N/ into")
    try:
        main(parser.parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
