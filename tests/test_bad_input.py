"""Bad input ends in one line naming the file or flag and what was expected, a non-zero exit and nothing
half-written: broken data files, a damaged processed_data/ or reward model, impossible sizes, a --work_dir
that is a file."""

import gzip
import shutil

import pytest
from conftest import run_script

import PPO_training as ppo
from common import load_processed_data, load_reward_model
from lifecycle import PROCESSED_DIR, REWARD_MODEL_DIR, UserError, parse_args


def one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "error: " in lines[0], proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("pairs.jsonl", b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: \xff\xfe", "rejected": "x"}\n', "not UTF-8 text"),
        ("pairs.jsonl.gz", b'{"chosen": "a", "rejected": "b"}\n', "not a complete gzip file"),
        (
            "cut.jsonl.gz",
            gzip.compress(b'{"chosen": "a", "rejected": "b"}\n' * 100, mtime=0)[:-30],
            "not a complete gzip file",
        ),
    ],
    ids=["not-utf8", "not-gzip", "cut-gzip"],  # ids every pytest-xdist worker collects alike (no bytes, no time)
)
def test_a_broken_dataset_file_is_one_line_naming_it(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    work = tmp_path / "work"
    proc = run_script(
        "data_process.py", "--preset", "tiny", "--dataset", tmp_path / name, "--work_dir", work, check=False
    )
    assert f"{tmp_path / name}: {expected}" in one_line_error(proc)
    assert not (work / PROCESSED_DIR).exists()


def test_a_work_dir_that_is_a_file_fails_before_any_processing(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    proc = run_script("data_process.py", "--preset", "tiny", "--work_dir", tmp_path / "file", check=False)
    assert one_line_error(proc) == f"error: --work_dir {tmp_path / 'file'} is a file, not a folder"
    assert "filter" not in proc.stderr  # no progress bar: nothing was read


def damage_stats(folder):
    (folder / "stats.json").write_text("{not json")


def remove_index(folder):
    (folder / "dataset_dict.json").unlink()


def remove_train(folder):
    shutil.rmtree(folder / "train")


def truncate_arrow(folder):
    arrow = next((folder / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])


def garbage_state(folder):
    (folder / "train" / "state.json").write_text("garbage")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (damage_stats, "stats.json is damaged (no base_model in it)"),
        (remove_index, "is damaged (FileNotFoundError"),
        (remove_train, "is damaged (FileNotFoundError"),
        (truncate_arrow, "is damaged (OSError"),
        (garbage_state, "is damaged (JSONDecodeError"),
    ],
)
def test_a_damaged_processed_data_folder_is_one_line_with_the_rebuild_command(
    tiny_data_dir, tmp_path, damage, expected
):
    shutil.copytree(tiny_data_dir / PROCESSED_DIR, tmp_path / PROCESSED_DIR)
    damage(tmp_path / PROCESSED_DIR)
    args = parse_args(ppo.Args, ppo.TINY, ["--preset", "tiny", "--work_dir", str(tmp_path)])
    with pytest.raises(UserError) as caught:
        load_processed_data(args)
    message = str(caught.value)
    assert expected in message and f"python data_process.py --preset tiny --work_dir {tmp_path}" in message


def test_a_damaged_processed_data_folder_stops_a_script_in_one_line(tiny_data_dir, tmp_path):
    shutil.copytree(tiny_data_dir / PROCESSED_DIR, tmp_path / PROCESSED_DIR)
    truncate_arrow(tmp_path / PROCESSED_DIR)
    proc = run_script("reward_model_training.py", "--preset", "tiny", "--work_dir", tmp_path, check=False)
    assert f"{tmp_path / PROCESSED_DIR} is damaged (OSError" in one_line_error(proc)


def reward_model_copy(tiny_reward_dir, tmp_path, cut):
    (tmp_path / PROCESSED_DIR).symlink_to(tiny_reward_dir / PROCESSED_DIR)
    shutil.copytree(tiny_reward_dir / REWARD_MODEL_DIR, tmp_path / REWARD_MODEL_DIR)
    weights = tmp_path / REWARD_MODEL_DIR / "model.safetensors"
    if cut:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    return weights


@pytest.mark.parametrize("cut, expected", [(True, "is unreadable"), (False, "is missing")])
def test_a_damaged_reward_model_is_one_line(tiny_reward_dir, tmp_path, cut, expected):
    weights = reward_model_copy(tiny_reward_dir, tmp_path, cut)
    with pytest.raises(UserError, match=f"{weights} {expected}.*retrain it with `python reward_model_training.py"):
        load_reward_model(tmp_path, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["PPO_training.py", "GRPO_training.py", "evaluate_models.py"])
def test_a_truncated_reward_model_stops_each_of_its_users_in_one_line(tiny_reward_dir, tmp_path, script):
    weights = reward_model_copy(tiny_reward_dir, tmp_path, cut=True)
    proc = run_script(script, "--preset", "tiny", "--work_dir", tmp_path, check=False)
    line = one_line_error(proc)
    # the hint repeats the run's preset: pasting it retrains this run's reward model, not gpt2's
    assert f"{weights} is unreadable" in line
    assert line.endswith(f"retrain it with `python reward_model_training.py --preset tiny --work_dir {tmp_path}`")


@pytest.mark.parametrize("size", [0, -8])
def test_ppo_rollout_batch_size_must_be_positive(work, size):
    args = parse_args(
        ppo.Args, ppo.TINY, ["--preset", "tiny", "--work_dir", str(work), "--rollout_batch_size", str(size)]
    )
    with pytest.raises(UserError, match=rf"--rollout_batch_size \({size}\) must be a positive multiple"):
        ppo.main(args)


def test_a_read_only_work_dir_fails_at_start_up():
    """/sys is read-only even to root (permissions alone would not say so): a real write is tried first."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pytest.skip("/sys is writable here")
    except OSError:
        pass
    proc = run_script("data_process.py", "--preset", "tiny", "--work_dir", "/sys/rlhf_work", check=False)
    assert one_line_error(proc).startswith("error: --work_dir /sys/rlhf_work: cannot write in /sys (")
    assert "filter" not in proc.stderr
