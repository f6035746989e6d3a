"""evaluate_models.py: the KL estimate, the summary maths, the xlsx/JSONL writers, and tiny end-to-end runs."""

import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import dead_pid, run_script
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

import common
import lifecycle
import reporting
from assets import tiny_oracle as oracle
from evaluate_models import (
    TINY,
    Args,
    bootstrap_ci,
    card_table,
    load_oracle,
    main,
    plot_frontier,
    results_table,
    sequence_kl,
    summarize,
    training_cost,
    write_jsonl,
    write_xlsx,
)
from lifecycle import DPO_DIR, GRPO_BEST_DIR, PPO_DIR, PROCESSED_DIR, REWARD_MODEL_DIR, UserError, parse_args

BASE = lifecycle.TINY_MODEL_DIR
CONTROL = "\x07\x1b"  # BEL and ESC: characters a worksheet cannot store


def make_policy(folder, noise=0.0, seed=0, metrics=None):
    """A policy folder: the tiny base model (perturbed by `noise` when given) and a metrics.jsonl."""
    if noise:
        model = AutoModelForCausalLM.from_pretrained(BASE)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        model.save_pretrained(folder)
        common.load_tokenizer(BASE).save_pretrained(folder)
    else:
        shutil.copytree(BASE, folder)
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return folder


def cost_record(step, seconds, tokens, mb):
    return {"step": step, "time/elapsed_s": seconds, "tokens/processed": tokens, "mem/peak_mb": mb}


@pytest.fixture(scope="module")
def eval_work(tiny_reward_dir, tmp_path_factory):
    """A work dir with the session's reward model and its test prompts, each with control characters in it."""
    work = tmp_path_factory.mktemp("eval_work")
    (work / REWARD_MODEL_DIR).symlink_to(tiny_reward_dir / REWARD_MODEL_DIR)
    data = load_from_disk(str(tiny_reward_dir / PROCESSED_DIR))
    data["test"] = data["test"].map(lambda ex: {"prompt": ex["prompt"].replace("Human: ", f"Human: {CONTROL}", 1)})
    data.save_to_disk(str(work / PROCESSED_DIR))
    shutil.copy(tiny_reward_dir / PROCESSED_DIR / "stats.json", work / PROCESSED_DIR / "stats.json")
    return work


# --- the maths, against independent computations -------------------------------------------


def test_sequence_kl_matches_a_per_sequence_loop_without_padding():
    tokenizer = common.load_tokenizer(BASE)
    base = common.load_causal_lm(str(BASE), tokenizer).eval()
    policy = common.load_causal_lm(str(BASE), tokenizer).eval()
    with torch.no_grad():
        torch.manual_seed(1)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: How do I boil an egg, and for how long?\n\nAssistant:"]
    temperature = 0.7
    torch.manual_seed(0)
    samples = common.generate_responses(policy, tokenizer, prompts, 64, 12, temperature=temperature)
    kl = sequence_kl(policy, base, samples, temperature)

    for i in range(len(prompts)):
        # the same sequence alone: no padding, default positions, log-softmax by hand
        query = samples.query_ids[i][samples.query_mask[i].bool()]
        response = samples.response_ids[i][samples.response_mask[i].bool()]
        ids = torch.cat([query, response])[None]
        with torch.no_grad():
            logp = torch.log_softmax(policy(ids).logits[0] / temperature, -1)
            ref_logp = torch.log_softmax(base(ids).logits[0] / temperature, -1)
        expected = sum(
            (logp[len(query) + t - 1, tok] - ref_logp[len(query) + t - 1, tok]).item() for t, tok in enumerate(response)
        )
        assert kl[i].item() == pytest.approx(expected, abs=1e-4)
    itself = sequence_kl(base, base, samples, temperature)  # no forward pass: zeros, one per reply
    assert itself.shape == kl.shape and itself.abs().max().item() == 0.0


def test_best_of_n_keeps_the_proxys_first_best_among_the_first_n_replies(monkeypatch):
    """N = 1 is base's own reply; each N picks the highest proxy reward among a prompt's first N replies."""
    import evaluate_models

    proxy = {"p0": [0.5, 0.2, 0.9, 0.9], "p1": [1.0, 0.1, 0.3, 2.0], "p2": [-1.0, 3.0, 0.0, 0.0]}

    def generate(model, tokenizer, batch, *args, num_return_sequences=1, compile=False):  # reply j of prompt p is "p-j"
        replies = [f"{p}-{j}" for p in batch for j in range(1, num_return_sequences + 1)]
        ids = torch.ones(len(replies), 3, dtype=torch.long)  # 3 reply tokens, none of them EOS (0)
        return common.Samples(ids, ids, ids, ids, [p for p in batch for _ in range(num_return_sequences)], replies)

    class Judges:
        def score(self, prompts, replies, args):
            rewards = [proxy[p][int(r.split("-")[1])] for p, r in zip(prompts, replies)]
            return {
                "reward": rewards,
                "gold": [-x for x in rewards],
                "oracle": ["good" if x > 0.6 else "rude" for x in rewards],
            }

    monkeypatch.setattr(evaluate_models, "generate_responses", generate)
    base = {"response": ["p0-0", "p1-0", "p2-0"], "reward": [0.5, 1.0, -1.0], "gold": [-0.5, -1.0, 1.0]}
    base |= {"oracle": ["rude", "good", "rude"], "length": [7, 8, 9]}
    args = parse_args(Args, TINY, ["--preset", "tiny", "--best_of_n", "4", "--batch_size", "3"])  # 1 prompt a call
    draws = evaluate_models.best_of_n_draws(None, type("T", (), {"eos_token_id": 0}), list(proxy), Judges(), args)
    assert draws["response"] == [["p0-1", "p0-2", "p0-3"], ["p1-1", "p1-2", "p1-3"], ["p2-1", "p2-2", "p2-3"]]
    out = evaluate_models.best_of_n(base, draws, args)
    assert list(out) == [1, 2, 4]
    assert out[1] == {**base}
    assert out[2]["response"] == ["p0-0", "p1-0", "p2-1"]
    assert out[4]["response"] == ["p0-2", "p1-3", "p2-1"]  # p0: the first of two 0.9s
    assert out[4]["reward"] == [0.9, 2.0, 3.0] and out[4]["gold"] == [-0.9, -2.0, -3.0]
    assert out[4]["oracle"] == ["good", "good", "good"] and out[4]["length"] == [3, 3, 3]
    assert [evaluate_models.best_of_n_kl(n) for n in (1, 2, 4)] == pytest.approx(
        [0.0, math.log(2) - 0.5, math.log(4) - 0.75]
    )


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    low, high = bootstrap_ci(values, 4000, seed=0)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci([1.5] * 10, 100, seed=0) == (1.5, 1.5)


def test_summary_against_hand_values(tmp_path):
    results = {
        "base": {"response": ["a", "a", "b"], "reward": [0.0, 1.0, 2.0], "kl": [], "length": [1, 2, 3]},
        "ppo": {"response": ["x", "x", "x"], "reward": [1.0, 1.0, 1.0], "kl": [0.5, 1.5, 1.0], "length": [4, 4, 4]},
    }
    costs = {"ppo": {"train_time_s": 12.5, "train_tokens": 1000, "train_peak_mb": 300.0}}
    args = parse_args(Args, TINY, ["--preset", "tiny", "--bootstrap_samples", "50"])
    summary = summarize(results, costs, args).set_index("model")
    assert summary.loc["base", "reward_mean"] == 1.0 and summary.loc["ppo", "reward_mean"] == 1.0
    assert summary.loc["ppo", "beats_base_share"] == pytest.approx(1 / 3)  # 1 > 0 only; a tie is no win
    assert math.isnan(summary.loc["base", "beats_base_share"])
    assert summary.loc["ppo", "kl_mean"] == 1.0 and summary.loc["base", "kl_mean"] == 0.0
    assert summary.loc["base", "distinct_share"] == pytest.approx(2 / 3)
    assert summary.loc["ppo", "distinct_share"] == pytest.approx(1 / 3)
    assert summary.loc["base", "length_mean"] == 2.0
    assert summary.loc["ppo", "train_tokens"] == 1000 and pd.isna(summary.loc["base", "train_tokens"])
    table = results_table(["p1", "p2", "p3"], results)
    assert list(table.columns) == [
        "prompt", "base_response", "base_reward", "ppo_response", "ppo_reward", "ppo_kl", "ppo_kl_ref"
    ]  # fmt: skip
    assert summary.loc["ppo", "kl_ref_mean"] == 1.0 and math.isnan(summary.loc["ppo", "beats_sft_share"])
    assert not any(c.startswith("oracle") for c in summary.columns)  # no labels, no oracle columns


def test_oracle_columns_against_hand_values():
    labels = ("good", "rude", "incoherent")
    results = {
        "base": {"response": ["a", "b", "c", "d"], "reward": [0.0] * 4, "kl": [], "length": [1] * 4},
        "ppo": {"response": ["w", "x", "y", "z"], "reward": [1.0] * 4, "kl": [1.0] * 4, "length": [1] * 4},
    }
    results["base"]["oracle"] = ["good", "rude", "incoherent", "rude"]
    results["ppo"]["oracle"] = ["good", "good", "good", "incoherent"]
    args = parse_args(Args, TINY, ["--preset", "tiny", "--bootstrap_samples", "500"])
    summary = summarize(results, {}, args, oracle_labels=labels).set_index("model")
    assert summary.loc["base", "oracle_good"] == 0.25 and summary.loc["ppo", "oracle_good"] == 0.75
    assert summary.loc["base", "oracle_rude"] == 0.5 and summary.loc["base", "oracle_incoherent"] == 0.25
    assert summary.loc["ppo", "oracle_rude"] == 0.0 and summary.loc["ppo", "oracle_incoherent"] == 0.25
    # paired by prompt: gains (0, 1, 1, 0), so the interval spans [0, 1]; base against itself is exactly 0
    assert summary.loc["ppo", "oracle_gain_ci_low"] >= 0 and summary.loc["ppo", "oracle_gain_ci_high"] <= 1
    assert summary.loc["ppo", "oracle_gain_ci_high"] > summary.loc["ppo", "oracle_gain_ci_low"]
    assert summary.loc["base", ["oracle_gain_ci_low", "oracle_gain_ci_high"]].tolist() == [0.0, 0.0]
    assert summary.loc["ppo", "oracle_good_ci_low"] <= 0.75 <= summary.loc["ppo", "oracle_good_ci_high"]
    assert "oracle_empty" not in summary  # only the labels asked for
    table = results_table(["p1", "p2", "p3", "p4"], results)
    assert list(table["ppo_oracle"]) == results["ppo"]["oracle"] and "base_oracle" in table


def test_a_policy_from_the_sft_model_is_measured_against_it_too():
    """beats_sft_share, the KL to its own reference and the oracle's gain over SFT, paired by prompt, by hand."""
    labels = ("good", "rude")
    results = {
        "base": {"response": list("abcd"), "reward": [0.0] * 4, "kl": [], "oracle": ["rude"] * 4},
        "sft": {"response": list("efgh"), "reward": [1.0, 2.0, 1.0, 2.0], "kl": [0.5] * 4, "kl_ref": [0.5] * 4,
                "oracle": ["good", "good", "rude", "rude"]},
        "ppo": {"response": list("ijkl"), "reward": [1.5] * 4, "kl": [2.0] * 4, "kl_ref": [1.0, 1.0, 2.0, 2.0],
                "oracle": ["good", "good", "good", "good"]},
    }  # fmt: skip
    for out in results.values():
        out["length"] = [1] * 4
    args = parse_args(Args, TINY, ["--preset", "tiny", "--bootstrap_samples", "500"])
    starts = {"sft": "base", "ppo": "sft"}
    summary = summarize(results, {}, args, oracle_labels=labels, starts=starts).set_index("model")
    assert summary.loc["ppo", "beats_sft_share"] == 0.5 and summary.loc["ppo", "beats_base_share"] == 1.0
    assert summary.loc["ppo", "kl_mean"] == 2.0 and summary.loc["ppo", "kl_ref_mean"] == 1.5
    assert summary.loc["sft", "kl_ref_mean"] == 0.5 and math.isnan(summary.loc["sft", "beats_sft_share"])
    assert list(summary.reference) == ["", "base", "sft"]
    # PPO's gains over SFT are (0, 0, 1, 1): an interval inside [0, 1]; SFT has none over itself
    low, high = summary.loc["ppo", ["oracle_gain_over_sft_ci_low", "oracle_gain_over_sft_ci_high"]]
    assert 0 <= low < 0.5 < high <= 1
    assert summary.loc[["base", "sft"], "oracle_gain_over_sft_ci_low"].isna().all()
    card = card_table(summary.reset_index(), "ppo")
    assert (
        card.splitlines()[0] == "| figure | base | sft | ppo |" and "| `kl_ref_mean` | 0.000 | 0.500 | 1.500 |" in card
    )


def test_the_oracle_applies_to_the_bundled_tiny_data_only(tmp_path):
    (tmp_path / PROCESSED_DIR).mkdir()
    for dataset, expected in ((str(lifecycle.TINY_DATA_DIR), True), ("Anthropic/hh-rlhf", False), ("/data/hh", False)):
        (tmp_path / PROCESSED_DIR / "stats.json").write_text(json.dumps({"dataset": dataset}))
        assert (load_oracle(tmp_path) is not None) == expected, dataset


def test_training_cost_reads_the_last_record(tmp_path, capsys):
    make_policy(tmp_path / "p", metrics=[cost_record(0, 1.0, 10, 5.0), cost_record(5, 9.5, 800, 7.5)])
    assert training_cost(tmp_path / "p") == {"train_time_s": 9.5, "train_tokens": 800, "train_peak_mb": 7.5}
    assert training_cost(tmp_path / "missing") == {}
    assert "no training cost" in capsys.readouterr().out


def test_control_characters_escaped_in_the_xlsx_and_kept_in_the_jsonl(tmp_path):
    raw = "ok\x00\x07bell\x1b[31m red\ttab\nnew line"
    results = {"base": {"response": [raw], "reward": [0.25], "kl": [], "length": [7]}}
    args = parse_args(Args, TINY, ["--preset", "tiny", "--bootstrap_samples", "10"])
    write_xlsx(tmp_path / "r.xlsx", results_table([f"prompt{CONTROL}"], results), summarize(results, {}, args))
    write_jsonl(tmp_path / "r.jsonl", [3], [f"prompt{CONTROL}"], results)
    sheet = pd.read_excel(tmp_path / "r.xlsx", sheet_name="results")
    assert sheet.loc[0, "base_response"] == "ok\\x00\\x07bell\\x1b[31m red\ttab\nnew line"
    assert sheet.loc[0, "prompt"] == "prompt\\x07\\x1b"
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record == {"test_index": 3, "prompt": f"prompt{CONTROL}", "base_response": raw, "base_reward": 0.25, "base_length": 7}  # fmt: skip
    # a rerun keeps the earlier results beside the new ones, and leaves no temporary file
    write_jsonl(tmp_path / "r.jsonl", [3], ["again"], results)
    assert json.loads((tmp_path / "r.prev.jsonl").read_text())["prompt"] == f"prompt{CONTROL}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "r.prev.jsonl", "r.xlsx"]


# --- tiny end-to-end ----------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_end_to_end_tiny(eval_work):
    """PPO = a copy of base (KL 0, same replies and rewards) with two snapshots on its path, GRPO and DPO =
    perturbed copies; the gold reward model is a copy of the proxy (so gold scores equal proxy scores)."""
    make_policy(eval_work / PPO_DIR, metrics=[cost_record(10, 30.0, 5000, 400.0)])
    snapshots = eval_work / "runs" / "ppo" / lifecycle.SNAPSHOTS_DIR
    # steps 3 and 7 come from the run of the final folder (written before it); step 12 is past its last step
    # 10 and step 9 was written after it: both another run's; a killed save's step-5.tmp-1 is no snapshot
    for step, noise in ((3, 0.01), (7, 0.02), (12, 0.03), (9, 0.04)):
        make_policy(snapshots / f"step-{step}", noise=noise, seed=step)
    (snapshots / "step-5.tmp-1").mkdir()
    final_saved = (eval_work / PPO_DIR / "config.json").stat().st_mtime
    for step, age in ((3, -20), (7, -10), (12, -5), (9, 10)):
        os.utime(snapshots / f"step-{step}" / "config.json", (final_saved + age, final_saved + age))
    make_policy(eval_work / GRPO_BEST_DIR, noise=0.02, seed=1, metrics=[cost_record(10, 60.0, 9000, 450.0)])
    make_policy(eval_work / DPO_DIR, noise=0.03, seed=2)  # no metrics.jsonl: cost left empty, said so
    (eval_work / lifecycle.GOLD_REWARD_MODEL_DIR).symlink_to((eval_work / REWARD_MODEL_DIR).resolve())
    argv = ["--preset", "tiny", "--work_dir", eval_work, "--num_prompts", 40, "--best_of_n", 4]
    # what an evaluation killed while it wrote its sheet and a card leaves: removed at the start of the next one
    pid = dead_pid()
    leftovers = [
        eval_work / f".rlhf_eval_results_with_base.tmp-{pid}.xlsx",
        eval_work / DPO_DIR / f".README.md.tmp-{pid}",
    ]
    for path in leftovers:
        path.write_text("half written")
    try:
        proc = run_script("evaluate_models.py", *argv, "--workers", 1)
        # the same evaluation on two forked processes: the same table, byte for byte (the first run's files are
        # kept as .prev)
        parallel = run_script("evaluate_models.py", *argv, "--workers", 2)
    finally:
        (eval_work / lifecycle.GOLD_REWARD_MODEL_DIR).unlink()
    assert "evaluate (2 processes)" in parallel.stderr and "evaluate (2 processes)" not in proc.stderr
    for name in ("rlhf_eval_responses.jsonl", "rlhf_eval_frontier.csv"):
        kept = (eval_work / name).with_name(name.replace(".", ".prev.", 1))
        assert (eval_work / name).read_bytes() == kept.read_bytes(), name
    assert "evaluating base and ppo, grpo, dpo on 40 test prompts" in proc.stdout
    for path in leftovers:
        assert not path.exists() and f"removed {path}: left by a run that was killed (process {pid})" in proc.stdout
    assert "no training cost" in proc.stdout
    assert "reward_mean" in proc.stdout  # the summary table is printed

    sheets = pd.read_excel(eval_work / "rlhf_eval_results_with_base.xlsx", sheet_name=None, keep_default_na=False)
    assert list(sheets) == ["results", "summary"]
    table = sheets["results"]
    assert list(table.columns) == [
        "prompt", "base_response", "base_reward", "base_gold", "base_oracle",
        "ppo_response", "ppo_reward", "ppo_gold", "ppo_kl", "ppo_kl_ref", "ppo_oracle",
        "grpo_response", "grpo_reward", "grpo_gold", "grpo_kl", "grpo_kl_ref", "grpo_oracle",
        "dpo_response", "dpo_reward", "dpo_gold", "dpo_kl", "dpo_kl_ref", "dpo_oracle",
    ]  # fmt: skip
    assert len(table) == 40
    assert list(sheets["summary"].columns) == [
        "model", "reward_mean", "reward_ci_low", "reward_ci_high", "beats_base_share", "beats_sft_share", "kl_mean",
        "kl_ci_low", "kl_ci_high", "reference", "kl_ref_mean", "gold_mean", "gold_ci_low", "gold_ci_high",
        "distinct_share", "length_mean", "train_time_s", "train_tokens", "train_peak_mb",
        "oracle_good", "oracle_good_ci_low", "oracle_good_ci_high", "oracle_gain_ci_low", "oracle_gain_ci_high",
        "oracle_gain_over_sft_ci_low", "oracle_gain_over_sft_ci_high", "oracle_off_topic", "oracle_courtesy_only", "oracle_refusal", "oracle_rude", "oracle_harmful",
        "oracle_incoherent", "oracle_empty", "selected_by",
    ]  # fmt: skip
    assert "the generator's oracle" in proc.stdout and "oracle_good" in proc.stdout
    summary = pd.read_excel(eval_work / "rlhf_eval_results_with_base.xlsx", sheet_name="summary").set_index("model")
    assert list(summary.index) == ["base", "ppo", "grpo", "dpo"]
    assert summary.loc["grpo", "train_tokens"] == 9000 and math.isnan(summary.loc["dpo", "train_time_s"])
    for name in ("rewards_boxplot", "reward_vs_kl", "cost"):
        assert (eval_work / f"rlhf_eval_{name}.png").stat().st_size > 5000

    # a copy of base, sampled under the same seed, is base: same replies, same rewards, KL 0
    assert (table["ppo_response"] == table["base_response"]).all()
    assert (table["ppo_oracle"] == table["base_oracle"]).all()
    assert set(table["base_oracle"]) <= set(oracle.LABELS)
    oracle_shares = summary.loc[:, [c for c in summary.columns if c.startswith("oracle_") and "_ci_" not in c]]
    np.testing.assert_allclose(oracle_shares.sum(axis=1), 1.0)  # good + every other label: all replies
    np.testing.assert_allclose(table["ppo_reward"], table["base_reward"], atol=1e-6)
    assert table["ppo_kl"].abs().max() < 1e-4
    # no args.json says init_from sft here: each policy's reference is base, its KL to it the KL to base
    assert list(summary.reference.fillna("")) == ["", "base", "base", "base"]
    np.testing.assert_array_equal(table["dpo_kl_ref"], table["dpo_kl"])
    # a perturbed copy drifts: a positive mean KL (the per-sample estimate may dip below 0)
    assert summary.loc["dpo", "kl_mean"] > summary.loc["grpo", "kl_mean"] > 0.1

    # the JSONL is lossless: the prompts exactly as in the test split, control characters included
    records = [json.loads(line) for line in (eval_work / "rlhf_eval_responses.jsonl").read_text().splitlines()]
    test = load_from_disk(str(eval_work / PROCESSED_DIR))["test"]
    assert [r["prompt"] for r in records] == [test[r["test_index"]]["prompt"] for r in records]
    assert all(CONTROL in r["prompt"] for r in records)
    assert all("\\x07\\x1b" in p and CONTROL not in p for p in table["prompt"])
    assert [r["grpo_response"] for r in records] == list(table["grpo_response"])
    assert [r["dpo_oracle"] for r in records] == list(table["dpo_oracle"])
    assert all(r["dpo_oracle"] == oracle.judge(r["prompt"], r["dpo_response"]) for r in records)
    np.testing.assert_allclose([r["dpo_kl"] for r in records], table["dpo_kl"], rtol=1e-6)
    # the gold model is the proxy here: the same score for every reply
    np.testing.assert_allclose(table["dpo_gold"], table["dpo_reward"], atol=1e-6)
    np.testing.assert_allclose(summary["gold_mean"], summary["reward_mean"], atol=1e-6)

    # the frontier: base, PPO's path (its 2 snapshots before its final step, then the final policy), DPO's final
    # policy (no metrics.jsonl: no step), best-of-N for N = 1, 2, 4; GRPO has no final folder
    frontier = pd.read_csv(eval_work / "rlhf_eval_frontier.csv")
    assert list(frontier.columns) == [
        "method", "step", "n", "kl", "sqrt_kl", "proxy_mean", "proxy_ci_low", "proxy_ci_high", "gold_mean",
        "gold_ci_low", "gold_ci_high", "oracle_good", "oracle_good_ci_low", "oracle_good_ci_high",
        "distinct_share", "length_mean", "start",
    ]  # fmt: skip
    assert list(frontier.method) == ["base", "ppo", "ppo", "ppo", "dpo", *["best_of_n"] * 3]
    assert list(frontier.step.fillna(-1)) == [0, 3, 7, 10, -1, -1, -1, -1]
    assert list(frontier.n.fillna(-1)) == [-1] * 5 + [1, 2, 4]
    for step in (9, 12):
        assert (
            f"{snapshots / f'step-{step}'} is not from the run that wrote {eval_work / PPO_DIR} (its last step 10)"
            in proc.stdout
        )
    assert f"{eval_work / lifecycle.GRPO_FINAL_DIR} not found: grpo has no path on the frontier" in proc.stdout
    # the table's own replies are reused: PPO's and DPO's final points are their summary rows; base's and
    # best-of-1's are base's
    for position, model in ((3, "ppo"), (4, "dpo"), (0, "base"), (5, "base")):
        row = frontier.iloc[position]
        assert row.proxy_mean == pytest.approx(summary.loc[model, "reward_mean"]), position
        assert row.oracle_good == pytest.approx(summary.loc[model, "oracle_good"]), position
        assert row.length_mean == pytest.approx(summary.loc[model, "length_mean"]), position
    bon = frontier[frontier.method == "best_of_n"]
    assert list(bon.kl) == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert bon.proxy_mean.is_monotonic_increasing  # the best of more replies (nested draws) never scores lower
    np.testing.assert_allclose(frontier.gold_mean, frontier.proxy_mean, atol=1e-6)
    snapshot_kl = frontier[frontier.method == "ppo"].kl.tolist()
    assert snapshot_kl[0] > 0.01 and snapshot_kl[1] > snapshot_kl[0] and abs(snapshot_kl[2]) < 1e-4  # final = base
    assert (eval_work / "rlhf_eval_frontier.png").stat().st_size > 5000


@pytest.mark.slow
def test_missing_policies_are_reported_and_left_out(eval_work, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    for name in (PROCESSED_DIR, REWARD_MODEL_DIR):
        (work / name).symlink_to(eval_work / name)
    make_policy(work / GRPO_BEST_DIR)
    argv = ["--preset", "tiny", "--work_dir", str(work), "--num_prompts", "8", "--bootstrap_samples", "100"]
    main(parse_args(Args, TINY, argv))
    out = capsys.readouterr().out
    assert f"{work / PPO_DIR} not found: ppo is left out of the evaluation" in out
    assert f"{work / DPO_DIR} not found: dpo is left out of the evaluation" in out
    table = pd.read_excel(work / "rlhf_eval_results_with_base.xlsx", sheet_name="results")
    assert list(table.columns) == [
        "prompt", "base_response", "base_reward", "base_oracle", "grpo_response", "grpo_reward", "grpo_kl", "grpo_kl_ref",
        "grpo_oracle",
    ]  # fmt: skip
    # a rerun gives the same table (and keeps the first one as .prev)
    main(parse_args(Args, TINY, argv))
    again = pd.read_excel(work / "rlhf_eval_results_with_base.xlsx", sheet_name="results")
    pd.testing.assert_frame_equal(table, again)
    assert (work / "rlhf_eval_results_with_base.prev.xlsx").is_file()


def test_more_prompts_than_the_test_split_says_so(eval_work, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    for name in (PROCESSED_DIR, REWARD_MODEL_DIR):
        (work / name).symlink_to(eval_work / name)
    n = len(load_from_disk(str(work / PROCESSED_DIR))["test"])
    argv = [
        "--preset",
        "tiny",
        "--work_dir",
        str(work),
        "--num_prompts",
        str(n + 5),
        "--max_new_tokens",
        "4",
        "--batch_size",
        "300",
        "--no_frontier",
    ]
    main(parse_args(Args, TINY, [*argv, "--bootstrap_samples", "10"]))
    assert f"the test split holds only {n} prompts: evaluating all of them" in capsys.readouterr().out
    assert len(pd.read_excel(work / "rlhf_eval_results_with_base.xlsx")) == n


def test_help_lists_every_field_with_its_default():
    out = run_script("evaluate_models.py", "--help").stdout
    for name in Args.__dataclass_fields__:
        assert f"--{name}" in out
    assert "(default: 150)" in out and "(default: 10000)" in out


def test_missing_reward_model_is_a_one_line_error(eval_work, tmp_path):
    (tmp_path / PROCESSED_DIR).symlink_to(eval_work / PROCESSED_DIR)
    proc = run_script("evaluate_models.py", "--preset", "tiny", "--work_dir", tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / REWARD_MODEL_DIR} not found: train it first with "
        f"`python reward_model_training.py --preset tiny --work_dir {tmp_path}`"  # the run's preset: pasting it works
    ]
    # a model other than the preset's is named too
    proc = run_script(
        "evaluate_models.py", "--preset", "tiny", "--work_dir", tmp_path, "--model", tmp_path / "other", check=False
    )
    assert f"--preset tiny --work_dir {tmp_path} --model {tmp_path / 'other'}`" in proc.stderr


def test_missing_data_and_bad_flags_fail_at_start(eval_work, tmp_path):
    with pytest.raises(UserError, match="processed_data not found: build it first with `python data_process.py"):
        main(parse_args(Args, TINY, ["--preset", "tiny", "--work_dir", str(tmp_path)]))
    with pytest.raises(UserError, match="--top_p must be in"):
        main(parse_args(Args, TINY, ["--preset", "tiny", "--work_dir", str(tmp_path), "--top_p", "0"]))
    with pytest.raises(UserError, match="--workers must be 0 \\(one per thread\\) or a number of processes, got -1"):
        main(parse_args(Args, TINY, ["--preset", "tiny", "--work_dir", str(tmp_path), "--workers", "-1"]))
    with pytest.raises(
        UserError, match=r"--max_prompt_length \+ --max_new_tokens \(1256 tokens\) exceeds the model's 512"
    ):
        argv = ["--preset", "tiny", "--work_dir", str(eval_work), "--max_new_tokens", "1000"]
        main(parse_args(Args, TINY, argv))


@pytest.mark.slow
def test_the_tiny_pipeline_leaves_a_frontier_of_every_method_and_best_of_n(tiny_pipeline):
    """`bash run_pipeline.sh --preset tiny`: the gold reward model, and a frontier with every method's path (its
    snapshots, then its final policy) and best-of-N for N = 1 ... 16, all scored by proxy, gold and oracle."""
    gold = json.loads((tiny_pipeline / lifecycle.GOLD_REWARD_MODEL_DIR / "eval_results.json").read_text())
    assert gold["train_split"] == lifecycle.GOLD_SPLIT and gold["accuracy"] >= 0.9, gold
    frontier = pd.read_csv(tiny_pipeline / "rlhf_eval_frontier.csv")
    for method, folder in (("ppo", PPO_DIR), ("grpo", lifecycle.GRPO_FINAL_DIR), ("dpo", DPO_DIR)):
        steps = frontier[frontier.method == method].step.tolist()
        last = reporting.read_metrics(tiny_pipeline / folder / "metrics.jsonl")[-1]["step"]
        assert len(steps) >= 4 and steps == sorted(steps) and steps[-1] == last, (method, steps)
    bon = frontier[frontier.method == "best_of_n"]
    assert bon.n.tolist() == [1, 2, 4, 8, 16] and bon.proxy_mean.is_monotonic_increasing
    assert frontier[["proxy_mean", "gold_mean", "oracle_good"]].notna().all().all()
    base, best_of_1 = frontier.iloc[0], bon.iloc[0]  # the same replies: every point is on the same prompts
    for key in ("proxy_mean", "gold_mean", "oracle_good", "length_mean"):
        assert base[key] == best_of_1[key], key
    summary = pd.read_excel(tiny_pipeline / "rlhf_eval_results_with_base.xlsx", sheet_name="summary")
    assert summary.gold_mean.notna().all()
    assert (tiny_pipeline / "rlhf_eval_frontier.png").stat().st_size > 10_000


def test_the_frontier_draws_the_oracle_share_on_its_whole_scale(tmp_path):
    columns = ["method", "step", "n", "sqrt_kl", "proxy_mean", "proxy_ci_low", "proxy_ci_high", "oracle_good",
               "oracle_good_ci_low", "oracle_good_ci_high"]  # fmt: skip
    rows = [
        ("base", 0, None, 0.0, 0.9, 0.6, 1.2, 0.58, 0.50, 0.66),
        ("ppo", 10, None, 1.2, 1.9, 1.8, 2.0, 0.69, 0.62, 0.76),
        ("best_of_n", None, 2, 0.4, 1.3, 1.1, 1.5, 0.62, 0.55, 0.69),
    ]
    ranges = plot_frontier(tmp_path / "frontier.png", pd.DataFrame(rows, columns=columns))
    assert ranges["oracle_good"] == (-0.02, 1.02)
    assert 0.5 < ranges["proxy_mean"][0] < 0.7 and 2.0 < ranges["proxy_mean"][1] < 2.2  # a reward keeps its own
    assert (tmp_path / "frontier.png").stat().st_size > 5000
