"""Crash anywhere, resume, lose nothing: real SIGKILLs of real training runs, at the moments that used to lose
work (after the last checkpoint, between GRPO's two saves, during an append), and damaged checkpoints.

Each kill is a subprocess killed with SIGKILL as soon as a file shows the moment has come (`kill_when`), not
after a fixed sleep; each resumed run is compared with an uninterrupted one: weights bit for bit, metrics.jsonl
record for record (times and memory aside)."""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import LOG_FILE_ENV, bar_counts, dead_pid, kill_when, run_script, same_records
from safetensors.torch import load_file

import evaluate_models
from lifecycle import (
    DPO_DIR,
    GRPO_BEST_DIR,
    GRPO_FINAL_DIR,
    PPO_DIR,
    PROCESSED_DIR,
    REWARD_MODEL_DIR,
    RUN_ID_FILE,
    UserError,
    parse_args,
)
from reporting import read_metrics


def linked(path, source, names=(PROCESSED_DIR, REWARD_MODEL_DIR)):
    """A fresh work dir reading `source`'s processed data (and reward model)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).symlink_to(source / name)
    return path


def same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_ppo_killed_after_its_last_checkpoint_finishes_on_resume(work, tmp_path):
    """Killed in the final evaluation, with half a record appended and a killed save's leftovers beside it:
    --resume skips to the evaluation and the save, and the run ends as the uninterrupted one did."""
    argv = ["--preset", "tiny", "--total_steps", 3, "--save_every", 100, "--rollout_batch_size", 8]
    argv += ["--num_minibatches", 2, "--max_new_tokens", 12, "--test_prompts", 48, "--eval_every", 0]
    straight = linked(tmp_path / "straight", work)
    first = run_script("PPO_training.py", *argv, "--work_dir", straight, env=LOG_FILE_ENV)
    # into a log file the bar redraws only when its interval is up, and then with the steps done (a bar that
    # iterated showed 0/3 at every step, redrawn by its postfix)
    counts = bar_counts(first.stderr, "ppo")
    assert counts == sorted(set(counts)) and counts[0] == 0 and counts[-1] == 3, counts
    assert "\x1b" not in first.stderr

    run_dir = work / "runs" / "ppo"
    kill_when(
        "PPO_training.py", *argv, "--work_dir", work, moment=(run_dir / "checkpoint.pt").exists, log=tmp_path / "log"
    )
    assert not (work / PPO_DIR).exists()  # the kill fell after the last checkpoint, before the save
    with open(run_dir / "metrics.jsonl", "a") as f:  # a kill during an append: half a record
        f.write('{"step": 4, "objective/scores": 0.1')
    pid = dead_pid()
    leftovers = [run_dir / f".checkpoint.pt.tmp-{pid}", work / f"{PPO_DIR}.tmp-{pid}"]
    leftovers[0].write_bytes(b"half a checkpoint")
    (leftovers[1] / "sub").mkdir(parents=True)
    alive = run_dir / f".checkpoint.pt.tmp-{os.getpid()}"  # a live process's file is not ours to remove
    alive.write_bytes(b"")

    resumed = run_script("PPO_training.py", *argv, "--work_dir", work, "--resume")
    assert "at step 3: its last step; finishing the final evaluation and save" in resumed.stdout
    assert "metrics.jsonl: dropped its incomplete last line" in resumed.stdout
    for path in leftovers:
        assert not path.exists() and f"removed {path}: left by a run that was killed" in resumed.stdout
    assert alive.exists()
    assert same_weights(work / PPO_DIR, straight / PPO_DIR)
    assert same_records(work / PPO_DIR / "metrics.jsonl", straight / PPO_DIR / "metrics.jsonl")
    # the evaluation samples from the generators saved with the checkpoint: the same replies, the same figures
    results, expected = (json.loads((w / PPO_DIR / "eval_results.json").read_text()) for w in (work, straight))
    assert results == expected

    # a checkpoint cut in half (a full disk) is one line naming it
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    line = one_line_error(run_script("PPO_training.py", *argv, "--work_dir", work, "--resume", check=False))
    assert f"--resume: {checkpoint} is incomplete (cut short?)" in line and "start afresh without --resume" in line


@pytest.mark.slow
def test_grpo_killed_between_its_two_saves_is_caught_by_the_evaluation_and_finished_by_resume(work, tmp_path):
    argv = ["--preset", "tiny", "--total_steps", 2, "--rollout_batch_size", 2, "--group_size", 2]
    argv += ["--eval_prompts", 4, "--eval_every", 2, "--save_every", 100]
    straight = linked(tmp_path / "straight", work)
    first = run_script("GRPO_training.py", *argv, "--work_dir", straight, env=LOG_FILE_ENV)
    # into a log file the bar is redrawn around each message, with the steps done by then (it showed 0/2)
    counts = bar_counts(first.stderr, "grpo")
    assert counts == sorted(counts) and counts[0] == 0 and 1 in counts and counts[-1] == 2, counts
    assert "\x1b" not in first.stderr
    # its progress line shows the mean held-out reward, not one reply's
    final_eval = [r for r in read_metrics(straight / "runs" / "grpo" / "metrics.jsonl") if "eval/reward" in r][-1]
    assert f"step 2 | held out (4 prompts): proxy {final_eval['eval/proxy']:+.3f}" in first.stdout
    run_script("GRPO_training.py", *argv, "--work_dir", work, "--seed", 7)  # an earlier run's pair of folders

    def run_id(folder):
        path = work / folder / RUN_ID_FILE
        return json.loads(path.read_text())["run_id"] if path.is_file() else None

    old = run_id(GRPO_BEST_DIR)
    assert old is not None and run_id(GRPO_FINAL_DIR) == old
    kill_when(
        "GRPO_training.py", *argv, "--work_dir", work, moment=lambda: run_id(GRPO_FINAL_DIR) not in (None, old),
        log=tmp_path / "log",
    )  # fmt: skip
    assert run_id(GRPO_BEST_DIR) == old  # the new final policy beside the old run's best: both look complete

    proc = run_script("evaluate_models.py", "--preset", "tiny", "--work_dir", work, "--num_prompts", 2, check=False)
    line = one_line_error(proc)
    assert (
        "come from two GRPO runs" in line
        and f"python GRPO_training.py --preset tiny --work_dir {work} --resume" in line
    )

    resumed = run_script("GRPO_training.py", *argv, "--work_dir", work, "--resume")
    assert "at step 2: its last step; finishing" in resumed.stdout
    assert run_id(GRPO_BEST_DIR) == run_id(GRPO_FINAL_DIR) != old
    evaluate_models.check_grpo_pair(work, parse_args(evaluate_models.Args, None, ["--preset", "tiny"]))
    for folder in (GRPO_FINAL_DIR, GRPO_BEST_DIR):
        assert same_weights(work / folder, straight / folder), folder
        assert same_records(work / folder / "metrics.jsonl", straight / folder / "metrics.jsonl"), folder


@pytest.mark.slow
def test_dpo_killed_after_its_last_checkpoint_finishes_on_resume(tiny_data_dir, tmp_path):
    argv = ["--preset", "tiny", "--max_train_samples", 32, "--max_eval_samples", 8, "--eval_every", 0]
    argv += ["--per_device_train_batch_size", 4, "--max_steps", 4, "--save_every", 100, "--eval_steps", 2]
    straight = linked(tmp_path / "straight", tiny_data_dir, [PROCESSED_DIR])
    work = linked(tmp_path / "work", tiny_data_dir, [PROCESSED_DIR])
    first = run_script("DPO_training.py", *argv, "--work_dir", straight, env=LOG_FILE_ENV)
    assert "\x1b" not in first.stderr  # its evaluation bar under the training bar would move the cursor

    checkpoint = work / "runs" / "dpo" / "checkpoint.pt"
    kill_when("DPO_training.py", *argv, "--work_dir", work, moment=checkpoint.exists, log=tmp_path / "log")
    assert not (work / DPO_DIR).exists()
    resumed = run_script("DPO_training.py", *argv, "--work_dir", work, "--resume")
    assert "at step 4: its last step; finishing" in resumed.stdout
    assert same_weights(work / DPO_DIR, straight / DPO_DIR)
    assert same_records(work / DPO_DIR / "metrics.jsonl", straight / DPO_DIR / "metrics.jsonl")
    validation = next(line for line in first.stdout.splitlines() if line.startswith("validation: "))
    assert validation in resumed.stdout  # the final figures are printed from the checkpoint's evaluation


RM = ["--preset", "tiny", "--per_device_train_batch_size", 4, "--max_steps", 6, "--logging_steps", 2]
RM += ["--save_steps", 2, "--eval_steps", 3, "--max_eval_samples", 64]


@pytest.fixture(scope="module")
def reward_model_straight(tiny_data_dir, tmp_path_factory):
    """An uninterrupted 6-step reward model run: what every interrupted one must end as."""
    work = linked(tmp_path_factory.mktemp("rm_straight"), tiny_data_dir, [PROCESSED_DIR])
    run_script("reward_model_training.py", *RM, "--work_dir", work)
    return work


def checkpoint_done(run_dir, step):
    return lambda: (run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_reward_model_killed_mid_run_with_a_damaged_newest_checkpoint_resumes_from_the_older(
    reward_model_straight, tiny_data_dir, tmp_path
):
    work = linked(tmp_path / "work", tiny_data_dir, [PROCESSED_DIR])
    run_dir = work / "runs" / "reward_model"
    argv = [*RM, "--work_dir", work]
    kill_when("reward_model_training.py", *argv, moment=checkpoint_done(run_dir, 4), log=tmp_path / "log")
    weights = run_dir / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk

    resumed = run_script("reward_model_training.py", *argv, "--resume")
    assert f"{weights} is unreadable" in resumed.stdout
    assert "resuming from the older checkpoint-2 instead (removed checkpoint-4)" in resumed.stdout
    final, expected = work / REWARD_MODEL_DIR, reward_model_straight / REWARD_MODEL_DIR
    assert same_weights(final, expected)
    # every step once, with the uninterrupted run's values: the first loss after the resume averages the same steps
    assert same_records(final / "metrics.jsonl", expected / "metrics.jsonl")


@pytest.mark.slow
def test_reward_model_killed_after_its_last_checkpoint_only_tests_and_saves(
    reward_model_straight, tiny_data_dir, tmp_path
):
    work = linked(tmp_path / "work", tiny_data_dir, [PROCESSED_DIR])
    run_dir = work / "runs" / "reward_model"
    argv = [*RM, "--work_dir", work]
    kill_when("reward_model_training.py", *argv, moment=checkpoint_done(run_dir, 6), log=tmp_path / "log")
    assert not (work / REWARD_MODEL_DIR).exists()
    # the kill may fall before or after the test record: as if after, append one (a resume must drop it)
    records = read_metrics(run_dir / "metrics.jsonl")
    if "test/loss" not in records[-1]:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**records[-1], "test/loss": 0.5, "test/accuracy": 0.9}) + "\n")

    resumed = run_script("reward_model_training.py", *argv, "--resume")
    assert f"resuming from {run_dir}/checkpoint-6 (step 6): its last step; finishing" in resumed.stdout
    final, expected = work / REWARD_MODEL_DIR, reward_model_straight / REWARD_MODEL_DIR
    assert same_weights(final, expected)
    records, straight = (read_metrics(f / "metrics.jsonl") for f in (final, expected))
    assert [r["step"] for r in records] == [r["step"] for r in straight]  # no phantom step, no second test
    assert same_records(final / "metrics.jsonl", expected / "metrics.jsonl")
    results, reference = (json.loads((f / "eval_results.json").read_text()) for f in (final, expected))
    assert results == reference

    # damaged checkpoints found by a later --resume: the newest's state is garbage -> the older one, said so;
    # nothing intact -> one line
    from reward_model_training import checkpoint_to_resume

    shutil.rmtree(run_dir / "checkpoint-2", ignore_errors=True)  # the kill may have beaten Trainer's rotation
    (run_dir / "checkpoint-6" / "trainer_state.json").write_text("{garbage")
    assert checkpoint_to_resume(run_dir).name == "checkpoint-4"
    assert not (run_dir / "checkpoint-6").exists()
    (run_dir / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"optimizer.pt is incomplete .*no older checkpoint is intact"):
        checkpoint_to_resume(run_dir)


def test_save_steps_must_follow_a_log(tiny_data_dir, tmp_path):
    work = linked(tmp_path / "work", tiny_data_dir, [PROCESSED_DIR])
    proc = run_script(
        "reward_model_training.py", "--preset", "tiny", "--work_dir", work, "--save_steps", 29, check=False
    )
    assert "--save_steps (29) must be a multiple of --logging_steps (4)" in one_line_error(proc)


@pytest.mark.slow
def test_ctrl_c_or_sigterm_says_whether_there_is_a_checkpoint_to_resume(work, tmp_path):
    argv = ["--preset", "tiny", "--work_dir", work, "--total_steps", 50, "--save_every", 2, "--rollout_batch_size", 8]
    argv += ["--num_minibatches", 2, "--max_new_tokens", 12, "--eval_every", 0]
    metrics, checkpoint = work / "runs" / "ppo" / "metrics.jsonl", work / "runs" / "ppo" / "checkpoint.pt"
    out = kill_when("PPO_training.py", *argv, moment=metrics.exists, log=tmp_path / "first", sig=signal.SIGINT)
    assert not checkpoint.exists()
    assert "interrupted before the first checkpoint: rerun the same command, without --resume" in out
    # SIGTERM, as run_pipeline.sh stops the stages beside an interrupted one, says the same as Ctrl-C
    out = kill_when("PPO_training.py", *argv, moment=checkpoint.exists, log=tmp_path / "second", sig=signal.SIGTERM)
    assert f"interrupted: rerun the same command with --resume to continue from {checkpoint}" in out
