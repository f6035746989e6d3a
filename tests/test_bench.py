"""benchmarks/bench.py: what it counts and times, its flags, and a one-step run of a few phases (ours, and TRL's)."""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

BENCH = REPO / "benchmarks" / "bench.py"
KEYS = {"phase", "impl", "samples_per_s", "tokens_per_s", "peak_mem_mb"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=600, env=env, cwd=REPO
    )


def check_records(stdout, phases, impls):
    records = [json.loads(line) for line in stdout.splitlines()]
    rows = [r for r in records if "phase" in r]
    assert [(r["phase"], r["impl"]) for r in rows] == [(p, i) for p in phases for i in impls]
    for r in rows:
        rollout = r["phase"] in ("ppo", "grpo", "generate")
        assert set(r) == KEYS | ({"gen_share"} if rollout else set()), r
        assert all(r[k] > 0 for k in ("samples_per_s", "tokens_per_s", "peak_mem_mb")), r
        if rollout:
            assert 0 < r["gen_share"] <= 1, r
    return records


# --- what is counted and timed ------------------------------------------------------------------


def test_batch_flag_overrides_only_the_phases_it_names(bench):
    assert bench.batch_sizes("") == {"reward": 8, "dpo": 4, "ppo": 8, "grpo": 2, "generate": 8}
    assert bench.batch_sizes("dpo=2,reward=4") == {"reward": 4, "dpo": 2, "ppo": 8, "grpo": 2, "generate": 8}
    for bad in ("dpo", "dpo=0", "sft=2", "ppo=x"):
        with pytest.raises(bench.UserError, match="--batch"):
            bench.batch_sizes(bad)


def test_generate_is_timed_and_counts_reply_tokens_up_to_the_first_eos(bench):
    """Sequences = rows generated; tokens = reply tokens up to and including the first EOS (id 0), pad after it."""
    prompt = torch.tensor([[5, 6], [0, 7]])  # (B, P) left padded
    replies = torch.tensor([[3, 4, 0, 0], [3, 3, 3, 3]])  # row 0: 3 tokens (EOS included), row 1: 4
    model = SimpleNamespace(generate=lambda input_ids, **kwargs: torch.cat([input_ids, replies], 1))
    meter = bench.Meter()
    meter.watch_generate(model, eos_token_id=0)
    model.generate(input_ids=prompt)  # before start(): not counted
    meter.start()
    model.generate(input_ids=prompt)
    model.generate(input_ids=prompt)
    meter.stop()
    assert (meter.samples, int(meter.tokens)) == (4, 14)
    assert 0 < meter.gen_s <= meter.elapsed
    record = meter.result("grpo", "ours")
    assert record["samples_per_s"] == round(4 / meter.elapsed, 3) and 0 < record["gen_share"] <= 1


def test_pairs_are_counted_on_training_forwards_only(bench):
    """Pairs = half the rows of a forward with grad on; tokens = its real (attention-mask) tokens."""

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids

    model = Model()
    meter = bench.Meter()
    meter.watch_pairs(model)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]])  # (2B, T): 2 pairs, 2 + 3 + 1 + 2 = 8 real tokens
    meter.start()
    model(input_ids=mask, attention_mask=mask)
    with torch.no_grad():  # a reference or evaluation forward
        model(input_ids=mask, attention_mask=mask)
    meter.stop()
    assert (meter.samples, int(meter.tokens)) == (2, 8)
    assert "gen_share" not in meter.result("dpo", "ours")


def test_trainer_steps_are_timed_after_the_warm_up(bench):
    """global_step counts finished optimizer steps: with 2 warm-up steps of 5, steps 3-5 are timed."""
    meter = bench.Meter()
    callback = bench.TimingCallback(meter, begin=2, end=5)
    starts = []
    for step in range(5):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        starts.append(meter.running)
        callback.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert starts == [False, False, True, True, True] and not meter.running and meter.elapsed > 0
    no_warmup = bench.Meter()
    callback = bench.TimingCallback(no_warmup, begin=0, end=1)
    callback.on_step_begin(None, SimpleNamespace(global_step=0), None)
    assert no_warmup.running


def test_bad_flags_fail_with_one_line():
    proc = run_bench("--phases", "generate,sft")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "error: --phases: unknown phase 'sft' (choose from reward, dpo, ppo, grpo, generate)"
    )


# --- a short run ----------------------------------------------------------------------------------


def test_one_step_of_generate_dpo_ppo_and_grpo_prints_one_json_line_each():
    phases = ["generate", "dpo", "ppo", "grpo"]
    proc = run_bench("--preset", "tiny", "--steps", "1", "--warmup", "0", "--phases", ",".join(phases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_records(proc.stdout, phases, ["ours"])


@pytest.mark.slow
def test_trl_comparison_adds_trl_lines_and_the_ratios():
    pytest.importorskip("trl")
    proc = run_bench("--steps", "1", "--warmup", "0", "--phases", "generate", "--compare", "trl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = check_records(proc.stdout, ["generate"], ["ours", "trl"])
    ours, trl = records[0]["samples_per_s"], records[1]["samples_per_s"]
    assert records[-1] == {"ratios": {"generate": round(ours / trl, 3)}}


def test_padding_counts_less_padding_when_batches_are_grouped_by_length():
    """benchmarks/padding.py on the tiny data: one epoch of the reward model's and DPO's batches, shuffled and
    grouped by length, as each script draws them."""
    script = REPO / "benchmarks" / "padding.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = ["--dataset", REPO / "assets/tiny_hh", "--model", REPO / "assets/tiny_gpt2", "--train_subset", 400]
    proc = subprocess.run(
        [sys.executable, script, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in proc.stdout.splitlines() if line[:3] == "| r"}
    rows |= {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in proc.stdout.splitlines() if line[:3] == "| D"}
    share = {name: float(cells[0].rstrip("%")) for name, cells in rows.items()}
    assert list(share) == [
        "reward model, 8 pairs, shuffled",
        "reward model, 8 pairs, grouped by length",
        "DPO, 4 pairs, shuffled",
        "DPO, 4 pairs, grouped by length",
    ]
    assert share["reward model, 8 pairs, grouped by length"] < share["reward model, 8 pairs, shuffled"]
    assert share["DPO, 4 pairs, grouped by length"] < share["DPO, 4 pairs, shuffled"]
    assert all(0 <= s < 100 for s in share.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path: on a GPU the script runs its parts")
def test_the_gpu_check_skips_its_cuda_parts_on_a_cpu_and_says_so(tmp_path):
    """benchmarks/gpu_check.sh on a machine without CUDA: exit 0, each of its four parts named as skipped in
    gpu_check.md under the versions it found; without torch it stops in one line instead."""
    script = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")]
    done = subprocess.run(
        script, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable}
    )
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert f"torch {torch.__version__}" in summary and "GPU: none" in summary
    for part in ("tests", "tiny_pipeline", "preflight", "generation"):
        assert f"| {part} | skipped: no CUDA on this machine | |" in summary
    assert "the four GPU parts were skipped" in done.stdout
    broken = subprocess.run(script, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": "false"})
    assert broken.returncode == 1
    assert (
        broken.stderr.strip()
        == "error: false cannot import torch and transformers: activate the environment or set PYTHON="
    )
