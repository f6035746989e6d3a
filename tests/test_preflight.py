"""benchmarks/preflight.py end to end on a 2-layer GPT-2 with GPT-2's real tokenizer and the real sample;
its step timing and projection arithmetic; its one-line errors; and the real tokenizer's prompt/reply split."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE

from common import drop_reason, load_preference_data, split_conversation

PREFLIGHT = REPO / "benchmarks" / "preflight.py"
TOKENIZER = REPO.parent / "shared" / "gpt2-tokenizer"
needs_shared = pytest.mark.skipif(
    not (TOKENIZER.exists() and SAMPLE.exists()), reason="../shared/gpt2-tokenizer or hh-rlhf-sample is absent"
)
TRAINING = ("sft", "reward_model", "ppo", "grpo", "dpo")


@pytest.fixture(scope="module")
def preflight():
    spec = importlib.util.spec_from_file_location("preflight", PREFLIGHT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_preflight(*argv, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(PREFLIGHT), *map(str, argv)], capture_output=True, text=True, timeout=timeout, env=env
    )


# --- the real tokenizer on the real conversations -----------------------------------------------


@needs_shared
def test_real_tokenizer_keeps_each_reply_a_suffix_of_its_conversation():
    """DPO reads a reply's tokens as what follows the prompt's own tokens in join_conversation(prompt, reply)."""
    from transformers import AutoTokenizer

    import DPO_training

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    rows = [r for r in load_preference_data(str(SAMPLE))["train"] if drop_reason(r) is None]
    assert len(rows) > 400
    split = {"prompt": [], "chosen_response": [], "rejected_response": []}
    for row in rows:
        prompt, chosen = split_conversation(row["chosen"])
        split["prompt"].append(prompt)
        split["chosen_response"].append(chosen)
        split["rejected_response"].append(split_conversation(row["rejected"])[1])
    pairs = DPO_training.tokenize_pairs(split, tokenizer)  # raises a UserError on the first pair that breaks it
    for pair, prompt, chosen in zip(pairs, split["prompt"], split["chosen_response"]):
        assert pair["chosen"] and pair["rejected"]
        assert pair["prompt"] + pair["chosen"] == tokenizer(prompt + " " + chosen)["input_ids"]
        assert tokenizer.decode(pair["chosen"]) == " " + chosen


# --- step timing and projection arithmetic, without running anything ----------------------------


def test_step_timing_puts_the_first_step_apart_and_takes_evaluations_off(preflight):
    records = [
        {"step": 0, "time/elapsed_s": 4.0, "tokens/processed": 100, "eval/reward": 0.1},  # an evaluation: 4 s
        {"step": 1, "time/elapsed_s": 14.0, "tokens/processed": 1100, "objective/scores": 0.0},
        {"step": 2, "time/elapsed_s": 16.0, "tokens/processed": 2100, "objective/scores": 0.0},
        {"step": 3, "time/elapsed_s": 22.0, "tokens/processed": 3200, "objective/scores": 0.0, "eval/reward": 0.2},
    ]
    timing = preflight.step_timing(records, "objective/scores", eval_steps=[3], eval_s=4.0)
    assert timing["first_step_s"] == 10.0
    assert timing["steady_steps"] == [2, 3] and timing["steady_s"] == 2.0  # step 3: 6 s less the 4 s evaluation
    assert timing["tokens_per_s"] == pytest.approx((1000 + 1100) / 4.0)
    # without the evaluation's time, a step that holds one is left out
    assert preflight.step_timing(records, "objective/scores", eval_steps=[3])["steady_steps"] == [2]
    projection = preflight.training_projection(timing, wall=30.0, loop_s=22.0, full_steps=100, scale=4.0, evals=50.0)
    assert projection["overhead_s"] == 8.0 and projection["warmup_s"] == 8.0 and projection["s_per_step"] == 8.0
    assert projection["total_s"] == 8.0 + 8.0 + 100 * 8.0 + 50.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    """getrusage's ru_maxrss carries a forking parent's peak into the child; reporting.peak_rss_mb does not."""
    ballast = bytearray(1024 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 1 GiB resident in this process
    del ballast
    code = "import resource, reporting; print(reporting.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    own, inherited = map(float, out.split())
    assert inherited > 1024 and own < inherited - 500


# --- end to end -------------------------------------------------------------------------------


@needs_shared
def test_preflight_runs_every_phase_and_projects_from_what_it_measured(tmp_path):
    work = tmp_path / "preflight"
    proc = run_preflight(
        "--random_init", TOKENIZER, "--n_layer", 2, "--n_embd", 64, "--n_head", 2, "--dataset", SAMPLE,
        "--steps", 2, "--eval_prompts", 2, "--max_accumulation", 1, "--project_to", "hh-rlhf", "--work_dir", work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "preflight.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["data", "sft", "reward_model", "ppo", "grpo", "dpo", "evaluation"]
    for name in phases:
        assert f"| {name} |" in proc.stdout  # the table
    assert report["machine"]["cuda"] is False and report["machine"]["omp_num_threads"] == "1"
    assert report["model_parameters"] < 5e6 and report["settings"]["steps"] == 2

    # data: all 500 real rows, GPT-2's tokens, the 512 limit
    data = phases["data"]
    assert data["rows_read"] == 500 and 400 < data["pairs_kept"] < 500
    assert 0 < data["truncated_pair_share"] < 0.1 and data["train_token_lengths"]["max"] == 512
    p = data["projection"]
    assert p["rows"] == 50_000 + 8_552
    assert p["total_s"] == pytest.approx(p["startup_s"] + p["rows"] * p["s_per_1000_rows"] / 1000, abs=0.5)

    # the full run's sizes: hh-rlhf's published rows, the seed's subset, filtered at the measured share
    sizes = report["full_run_data"]
    assert sizes["basis"] == "hh-rlhf" and "160,800" in sizes["source"]
    assert 40_000 < sizes["train"] + sizes["validation"] <= 50_000 and 0 < sizes["test"] <= 8_552

    for name in TRAINING:
        r = phases[name]
        assert r["steps_run"] == 2, name
        assert r["first_step_s"] > 0 and r["s_per_step"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 100, name
        assert r["s_per_step"] == pytest.approx(r["measured_s_per_step"] * r["accumulation_scale"], rel=1e-3), name
        p = r["projection"]
        assert p["s_per_step"] == r["s_per_step"]
        total = p["overhead_s"] + p["warmup_s"] + p["steps"] * p["s_per_step"] + p["eval_s"]
        assert p["total_s"] == pytest.approx(total, abs=0.2), name
    # the seed's step counts at the full run's sizes (and what --max_accumulation 1 scaled by)
    assert phases["reward_model"]["accumulation_scale"] == 2 and phases["dpo"]["accumulation_scale"] == 8
    assert phases["reward_model"]["projection"]["steps"] == math.ceil(3 * (math.ceil(sizes["train"] / 8) // 2))
    assert phases["ppo"]["projection"]["steps"] == 1500 and phases["grpo"]["projection"]["steps"] == 1500
    assert phases["dpo"]["projection"]["steps"] == math.ceil(math.ceil(sizes["train"] / 4) / 8)
    sft = phases["sft"]["projection"]  # one epoch of batches of 8; validation at step 0, every 500 steps, the end
    assert sft["steps"] == math.ceil(sizes["train"] / 8) and phases["sft"]["accumulation_scale"] == 1
    assert sft["evals"] == 1 + math.ceil(sft["steps"] / 500)
    assert sft["eval_s"] == pytest.approx(
        sft["evals"] * sizes["validation"] * sft["eval_s_per_reply"], rel=0.01, abs=0.2
    )
    rm = phases["reward_model"]["projection"]
    assert rm["eval_pairs"] == math.ceil(rm["steps"] / 500) * sizes["validation"] + sizes["test"]
    assert rm["eval_s"] == pytest.approx(rm["eval_pairs"] * rm["eval_s_per_pair"], rel=0.01, abs=0.2)

    ev = phases["evaluation"]
    assert ev["prompts"] == 2 and ev["models"] == ["base", "sft", "ppo", "grpo", "dpo"]
    p = ev["projection"]
    assert p["total_s"] == pytest.approx(p["overhead_s"] + 150 * 5 * p["s_per_prompt_and_model"], abs=0.5)
    assert report["projected_total_s"] == pytest.approx(sum(r["projection"]["total_s"] for r in phases.values()))


# --- one-line errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such/model_folder/"], "--model no/such/model_folder/: no such folder"),
        (["--random_init", "/nonexistent/tokenizer"], "--random_init /nonexistent/tokenizer: no such folder"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_bad_settings_fail_in_one_line(tmp_path, argv, message):
    proc = run_preflight(*argv, "--work_dir", tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"error: {message}"


@pytest.mark.parametrize("flag", ["--random_init", "--model"])
def test_a_folder_without_a_tokenizer_fails_in_one_line(tmp_path, flag):
    """Before the preflight, `--model EMPTY_FOLDER` gave every script a traceback (transformers raises ValueError)."""
    (tmp_path / "empty").mkdir()
    proc = run_preflight(flag, tmp_path / "empty", "--work_dir", tmp_path / "w", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(f"error: {flag} {tmp_path / 'empty'}: cannot load a tokenizer from it (")
    assert len(proc.stderr.strip().splitlines()) == 1
