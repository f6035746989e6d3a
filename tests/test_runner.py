"""run_pipeline.sh (per-stage flags, --from/--only, its own --help) and what every script's command line
refuses: abbreviated flags, and a hub model with no way to reach the Hub (a few seconds, one line)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import LOG_FILE_ENV, REPO, SCRIPT_ENV, run_script

from lifecycle import parse_args


def pipeline(*argv):
    """run_pipeline.sh with `echo` for python: what each stage would be given, in order, nothing run."""
    return subprocess.run(
        ["bash", str(REPO / "run_pipeline.sh"), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": "echo"},
    )


def stage_lines(proc):
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if not line.startswith("==")]


def test_flags_go_to_every_stage_and_dotted_ones_to_one(tmp_path):
    proc = pipeline(
        "--preset", "tiny", "--work_dir", tmp_path, "--ppo.total_steps", 5, "--dpo.max_steps=3", "--seed", 1,
        "--jobs", 1, "--gold.max_steps", 7,
    )  # fmt: skip
    common = f"--preset tiny --work_dir {tmp_path}"
    assert stage_lines(proc) == [
        f"data_process.py {common} --seed 1",
        f"reward_model_training.py {common} --seed 1",
        f"SFT_training.py {common} --seed 1",
        f"reward_model_training.py {common} --seed 1 --train_split gold_train --max_steps 7",
        f"PPO_training.py {common} --seed 1 --total_steps 5",
        f"GRPO_training.py {common} --seed 1",
        f"DPO_training.py {common} --seed 1 --max_steps=3",
        f"evaluate_models.py {common} --seed 1",
    ]
    assert tmp_path.is_dir()


def test_the_real_preset_is_smollm2_at_cpu_sizes_in_bf16_before_the_callers_own_flags(tmp_path):
    """--preset real: the gpt2 preset's scripts with run_pipeline.sh's REAL flags first, so a flag the caller gives
    comes later on the command line and wins; one stage at a time on every core, bf16 autocast asked for."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "bf16=$RLHF_CPU_BF16 threads=${OMP_NUM_THREADS:-all} $*"\n')
    fake.chmod(0o755)
    (tmp_path / "processed_data" / "gold_train").mkdir(parents=True)  # the gold stage runs where the data has one
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RLHF_CPU_BF16")}
    proc = subprocess.run(
        ["bash", str(REPO / "run_pipeline.sh"), "--preset", "real", "--work_dir", tmp_path, "--ppo.total_steps", "3"],
        capture_output=True, text=True, env={**env, "PYTHON": str(fake)},
    )  # fmt: skip
    lines = stage_lines(proc)
    scripts = ["data_process.py", "reward_model_training.py", "SFT_training.py", "reward_model_training.py"]
    scripts += ["PPO_training.py", "GRPO_training.py", "DPO_training.py", "evaluate_models.py"]
    assert [line.split()[2] for line in lines] == scripts
    for line in lines:
        words = line.split()
        assert words[:2] == ["bf16=1", "threads=all"] and "--preset" not in words
        assert words[3:7] == ["--model", "models/SmolLM2-135M-Instruct", "--work_dir", str(tmp_path)]
    assert lines[0].endswith("--test_share 0.25 --gold_share 0.2 --max_length 256")
    ppo = lines[4].split()
    assert ppo[ppo.index("--total_steps") + 1] == "20" and ppo[-2:] == ["--total_steps", "3"]
    import PPO_training

    assert parse_args(PPO_training.Args, argv=ppo[3:]).total_steps == 3  # the later flag wins


def test_seeds_train_and_evaluate_once_per_seed_on_one_data_split_then_aggregate(tmp_path):
    proc = pipeline("--preset", "tiny", "--work_dir", tmp_path, "--seeds", "1,2", "--jobs", 1, "--ppo.total_steps", 3)
    lines = stage_lines(proc)
    common = f"--preset tiny --work_dir {tmp_path}"
    assert lines[0] == f"data_process.py {common}"  # once, with the run's seed: every seed's split
    assert lines[-1] == f"aggregate_seeds.py --work_dir {tmp_path}"
    for n, seed in enumerate((1, 2)):
        run = lines[1 + 7 * n : 8 + 7 * n]
        own = f"{common} --work_dir {tmp_path}/seed-{seed} --seed {seed}"
        assert [line.split()[0] for line in run] == [
            "reward_model_training.py", "SFT_training.py", "reward_model_training.py", "PPO_training.py",
            "GRPO_training.py", "DPO_training.py", "evaluate_models.py",
        ]  # fmt: skip
        assert all(line.split(" ", 1)[1].startswith(own) for line in run)
        assert run[3].endswith("--total_steps 3")
        assert run[-1] == f"evaluate_models.py {own} --seed 42"  # one set of test prompts and sampling for all
        link = tmp_path / f"seed-{seed}" / "processed_data"
        assert link.is_symlink() and link.resolve() == (tmp_path / "processed_data").resolve()
    assert [
        line.split()[0] for line in stage_lines(pipeline("--work_dir", tmp_path, "--seeds=3", "--only", "dpo"))
    ] == ["DPO_training.py"]  # a stage range per seed; no data stage, no aggregation without the evaluation
    proc = pipeline("--work_dir", tmp_path, "--seeds", "1,x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "run_pipeline.sh: error: --seeds needs a comma list of seeds (1,2,3), got '1,x'"


def test_from_and_only_pick_the_stages(tmp_path):
    scripts = [line.split()[0] for line in stage_lines(pipeline("--work_dir", tmp_path, "--from", "grpo"))]
    assert scripts == ["GRPO_training.py", "DPO_training.py", "evaluate_models.py"]
    proc = pipeline("--work_dir", tmp_path, "--only", "reward", "--reward.max_steps", 2)
    assert stage_lines(proc) == [f"reward_model_training.py --work_dir {tmp_path} --max_steps 2"]
    # the notebook runs only when named, by nbconvert, into the work dir; a dotted flag goes to nbconvert
    for argv in (["--only", "notebook"], ["--from", "notebook"]):
        proc = pipeline("--preset", "tiny", "--work_dir", tmp_path, *argv, "--notebook.ExecutePreprocessor.timeout=60")
        assert stage_lines(proc) == [
            "-m jupyter nbconvert --to notebook --execute --KernelManager.transport=ipc analysis_notebook.ipynb "
            f"--output-dir {tmp_path} --ExecutePreprocessor.timeout=60"
        ]


def test_skip_sft_runs_the_seeds_pipeline_with_the_policies_from_base(tmp_path):
    proc = pipeline("--preset", "tiny", "--work_dir", tmp_path, "--jobs", 1, "--skip", "sft", "--dpo.max_steps", 3)
    common = f"--preset tiny --work_dir {tmp_path}"
    assert stage_lines(proc) == [
        f"data_process.py {common}",
        f"reward_model_training.py {common}",
        f"reward_model_training.py {common} --train_split gold_train",
        f"PPO_training.py {common} --init_from base",
        f"GRPO_training.py {common} --init_from base",
        f"DPO_training.py {common} --init_from base --max_steps 3",
        f"evaluate_models.py {common}",
    ]
    proc = pipeline("--work_dir", tmp_path, "--skip=gold", "--skip", "eval", "--from", "ppo")
    assert [line.split()[0] for line in stage_lines(proc)] == ["PPO_training.py", "GRPO_training.py", "DPO_training.py"]
    proc = pipeline("--skip", "sfft")
    assert proc.returncode == 2 and "--skip: unknown stage 'sfft' (stages: data reward sft" in proc.stderr


def test_grpo_against_the_oracle_runs_only_when_asked_for(tmp_path):
    """The opt-in stage: never by default (the demo's time stays), with --with beside the others, before the
    evaluation that shows it, and alone with --only."""
    common = f"--preset tiny --work_dir {tmp_path}"
    oracle = f"GRPO_training.py {common} --reward_funcs oracle --run_name grpo_oracle"
    default = stage_lines(pipeline("--preset", "tiny", "--work_dir", tmp_path, "--jobs", 1))
    assert not any("grpo_oracle" in line for line in default) and len(default) == 8
    asked = stage_lines(pipeline("--preset", "tiny", "--work_dir", tmp_path, "--jobs", 1, "--with", "grpo_oracle"))
    assert asked == [*default[:6], oracle, *default[6:]]  # after grpo, before dpo and the evaluation
    assert stage_lines(pipeline("--preset", "tiny", "--work_dir", tmp_path, "--only", "grpo_oracle")) == [oracle]
    skipped = stage_lines(
        pipeline("--preset", "tiny", "--work_dir", tmp_path, "--skip", "sft", "--only", "grpo_oracle")
    )
    assert skipped == [f"{oracle} --init_from base"]


def test_the_notebook_without_an_evaluation_is_one_line_and_runs_nothing(tmp_path):
    fake = fake_python(tmp_path, f"touch {tmp_path}/ran")
    proc = run_pipeline("--preset", "tiny", "--work_dir", tmp_path / "w", "--only", "notebook", python=fake)
    xlsx = tmp_path / "w" / "rlhf_eval_results_with_base.xlsx"
    assert proc.returncode == 2 and not (tmp_path / "ran").exists()
    assert proc.stderr.strip() == (
        f"run_pipeline.sh: error: notebook: {xlsx} not found: make it first with "
        f"`bash run_pipeline.sh --preset tiny --work_dir {tmp_path / 'w'} --only eval`"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--only", "rlhf"],
            "--only: unknown stage 'rlhf' (stages: data reward sft gold ppo grpo grpo_oracle dpo eval notebook)",
        ),
        (["--with", "ppo"], "--with: 'ppo' is no opt-in stage (grpo_oracle)"),
        (["--jobs", "0"], "--jobs needs a positive number of stages, got '0'"),
        (["--from"], "--from needs a stage"),
        (["--rm.max_steps", "2"], "--rm.max_steps: unknown stage 'rm'"),
    ],
)
def test_a_bad_stage_is_one_line(argv, message):
    proc = pipeline(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"run_pipeline.sh: error: {message}" or message in proc.stderr.strip()
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_is_the_runners_own_and_runs_nothing():
    proc = pipeline("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: bash run_pipeline.sh")
    assert "--STAGE.FLAG VALUE" in proc.stdout and "==" not in proc.stdout


def test_abbreviated_flags_are_refused(capsys):
    import PPO_training as ppo

    with pytest.raises(SystemExit) as caught:
        parse_args(ppo.Args, ppo.TINY, ["--preset", "tiny", "--total_step", "5"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --total_step 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(ppo.Args, ppo.TINY, ["--pre", "tiny"])


@pytest.mark.parametrize("script", ["assets/make_tiny_data.py", "assets/make_tiny_model.py"])
def test_the_asset_builders_refuse_abbreviated_flags_too(script, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / script), "--out", tmp_path], capture_output=True, text=True)
    assert proc.returncode == 2 and "error: unrecognized arguments: --out" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written to a folder it guessed


def test_a_negated_flag_says_what_it_does(capsys):
    import PPO_training as ppo

    with pytest.raises(SystemExit):
        parse_args(ppo.Args, ppo.TINY, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no_adapt_kl, --no-adapt-kl turn off --adapt_kl --target_kl" in out  # no "(default: False)"


def test_an_unreachable_hub_fails_in_one_line_without_retrying(tmp_path):
    """A closed local port stands for the Hub (no network in CI, and no download where there is one)."""
    env = {**SCRIPT_ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE")
    proc = subprocess.run(
        [sys.executable, str(REPO / "data_process.py"), "--work_dir", tmp_path, "--dataset", REPO / "assets/tiny_hh"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: --model gpt2: cannot load a tokenizer") and "pass --preset tiny" in lines[0]
    assert "127.0.0.1:9 cannot be reached" in proc.stdout and "Retrying" not in proc.stderr


def test_a_missing_local_dataset_is_said_before_the_model_loads(tmp_path):
    proc = run_script("data_process.py", "--work_dir", tmp_path, "--dataset", tmp_path / "none.jsonl", check=False)
    assert proc.stderr.strip() == f"error: --dataset {tmp_path / 'none.jsonl'}: no such file or folder"


def test_a_reward_model_run_prints_what_a_person_needs_not_library_noise(tiny_data_dir, tmp_path):
    (tmp_path / "processed_data").symlink_to(tiny_data_dir / "processed_data")
    argv = ["--preset", "tiny", "--work_dir", tmp_path, "--max_steps", 2, "--logging_steps", 1, "--eval_steps", 2]
    # into a log file, as run_pipeline.sh runs a stage beside another
    proc = run_script("reward_model_training.py", *argv, "--save_steps", 2, "--max_eval_samples", 16, env=LOG_FILE_ENV)
    output = proc.stdout + proc.stderr
    noises = [
        "LOAD REPORT",
        "score.weight | MISSING",
        "Consider training on your downstream task",
        "Loading weights",
        "Writing model shards",
    ]
    for noise in [*noises, "{'loss'", "\x1b"]:  # Trainer's dicts; the evaluation bar under the training bar
        assert noise not in output, noise
    assert "with a new score head" in proc.stdout and "step 2: validation accuracy" in output


def fake_python(tmp_path, body):
    """A `python` for run_pipeline.sh that runs the shell `body` instead of the script ($1) it is given."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    return fake


def run_pipeline(*argv, python):
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_MININTERVAL", "OMP_NUM_THREADS")}
    return subprocess.run(
        ["bash", str(REPO / "run_pipeline.sh"), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**env, "PYTHON": str(python)},  # stdout and stderr are pipes here, as in a log file
        timeout=120,
    )


def test_into_a_log_file_bars_redraw_every_30_s_and_tiny_runs_one_thread_per_stage(tmp_path):
    fake = fake_python(tmp_path, 'echo "$1 TQDM_MININTERVAL=$TQDM_MININTERVAL OMP_NUM_THREADS=$OMP_NUM_THREADS"')
    argv = ["--preset", "tiny", "--work_dir", tmp_path / "w", "--only"]
    # a stage alone has the second core too; a stage beside another one thread
    proc = run_pipeline(*argv, "data", "--jobs", 2, python=fake)
    assert stage_lines(proc) == ["data_process.py TQDM_MININTERVAL=30 OMP_NUM_THREADS=2"]
    proc = run_pipeline(*argv, "data", "--jobs", 1, python=fake)
    assert stage_lines(proc) == ["data_process.py TQDM_MININTERVAL=30 OMP_NUM_THREADS=1"]


def test_with_two_jobs_stages_run_beside_each_other_once_what_they_read_is_done(tmp_path):
    work = tmp_path / "w"
    (work / "processed_data" / "gold_train").mkdir(parents=True)
    events = tmp_path / "events"
    body = f'echo "start $1 $*" >> {events}; sleep 0.5; echo "$1 says OMP_NUM_THREADS=$OMP_NUM_THREADS"; echo "end $1 $*" >> {events}'
    proc = run_pipeline("--preset", "tiny", "--work_dir", work, "--jobs", 2, python=fake_python(tmp_path, body))
    assert proc.returncode == 0, proc.stderr
    order = [
        " ".join(line.split()[:2]) + (" gold" if "gold_train" in line else "")
        for line in events.read_text().splitlines()
    ]
    position = {event: i for i, event in enumerate(order)}
    # SFT, reward and gold (all need only the data) overlap; PPO and GRPO start after the reward and SFT models end,
    # DPO after the SFT model
    assert position["start SFT_training.py"] < position["end reward_model_training.py"]
    assert position["start DPO_training.py"] > position["end SFT_training.py"]
    assert position["start reward_model_training.py"] < position["end SFT_training.py"]
    assert position["start reward_model_training.py gold"] < position["end DPO_training.py"]
    for script in ("PPO_training.py", "GRPO_training.py"):
        assert position[f"start {script}"] > max(
            position["end reward_model_training.py"], position["end SFT_training.py"]
        )
    assert position["start evaluate_models.py"] == len(order) - 2  # last, after everything else has ended
    for stage in ("sft", "reward", "gold", "ppo", "grpo", "dpo"):  # side by side: each into its log, one thread each
        assert "says OMP_NUM_THREADS=1" in (work / "logs" / f"{stage}.log").read_text()
    assert "evaluate_models.py says OMP_NUM_THREADS=2" in proc.stdout  # alone, in the foreground
    assert "== pipeline done in" in proc.stdout


def test_a_stage_failing_beside_another_stops_the_pipeline_with_its_log(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    body = 'case "$1" in PPO_training.py) echo "error: the PPO run broke"; exit 3;; *) sleep 0.3;; esac'
    proc = run_pipeline("--preset", "tiny", "--work_dir", work, "--jobs", 2, python=fake_python(tmp_path, body))
    assert proc.returncode == 3
    assert "error: the PPO run broke" in proc.stderr
    assert f"run_pipeline.sh: ppo (PPO_training.py) failed with status 3: its log is {work}/logs/ppo.log" in proc.stderr
    assert "evaluate_models.py" not in proc.stdout and "pipeline done" not in proc.stdout
    assert "gold: skipped" in proc.stdout  # no gold_train split in processed_data


def test_ctrl_c_stops_the_stages_running_beside_each_other(tmp_path):
    """A script's background jobs ignore SIGINT: the runner stops them itself, so none writes on behind a rerun."""
    events = tmp_path / "events"
    # each stage stopped says what it can do, as the scripts do on SIGTERM; the runner repeats its last line
    body = f'echo "$$" >> {events}; trap \'kill $!; echo "interrupted: $1 can --resume"; exit 1\' TERM; sleep 60 & wait'
    fake = fake_python(tmp_path, body)
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_MININTERVAL", "OMP_NUM_THREADS")}
    argv = ["--preset", "tiny", "--work_dir", tmp_path / "w", "--jobs=2", "--from", "reward"]
    runner = subprocess.Popen(
        ["bash", str(REPO / "run_pipeline.sh"), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHON": str(fake)},
    )
    deadline = time.time() + 30
    while not (events.is_file() and len(events.read_text().split()) == 2):  # reward and sft (no gold split)
        assert time.time() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.05)
    runner.send_signal(signal.SIGINT)
    out, err = runner.communicate(timeout=30)
    assert runner.returncode == 130, err
    assert "run_pipeline.sh: interrupted; stopped reward sft" in err
    assert "  reward: interrupted: reward_model_training.py can --resume" in err
    assert "  sft: interrupted: SFT_training.py can --resume" in err
    for pid in map(int, events.read_text().split()):
        with pytest.raises(ProcessLookupError):  # the stage is gone, not orphaned
            os.kill(pid, 0)


@pytest.mark.parametrize("visible", ["", "0", "3,5"])
def test_on_cuda_a_gpt2_run_puts_two_stages_side_by_side_only_on_named_devices(tmp_path, monkeypatch, visible):
    """--jobs 2 on one GPU would put two gpt2 models on one card: one stage at a time, in one line, unless
    CUDA_VISIBLE_DEVICES names two devices, each stage beside another then on one of them."""
    work = tmp_path / "w"
    (work / "processed_data" / "gold_train").mkdir(parents=True)
    body = 'if [ "$1" = -c ]; then echo 2; exit 0; fi; sleep 0.3; echo "$1 on [$CUDA_VISIBLE_DEVICES]"'
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    proc = run_pipeline("--work_dir", work, "--jobs", 2, "--from", "reward", python=fake_python(tmp_path, body))
    assert proc.returncode == 0, proc.stderr
    if visible == "3,5":
        assert "== --jobs 2 on CUDA: each stage beside another on a device of its own" in proc.stdout
        beside = re.findall(r"== (\S+)\.py .*beside another stage on CUDA device (\d)", proc.stdout)
        assert len(beside) >= 2 and {device for _, device in beside} == {"3", "5"}, proc.stdout
        assert "reward_model_training.py on [3]" in proc.stdout + (work / "logs" / "reward.log").read_text()
    else:
        line = "== --jobs 2 on CUDA: one stage at a time (two would share one GPU); name devices to run stages side"
        assert line in proc.stdout and "beside another stage" not in proc.stdout, proc.stdout
