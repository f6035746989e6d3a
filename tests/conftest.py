"""Shared fixtures: one tiny processed data set (and reward model) per test session.

Tests call the scripts the way a user does (`main(parse_args(Args, TINY, argv))` or a
subprocess), into temporary work folders; nothing touches the network.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = REPO.parent / "shared" / "hh-rlhf-sample" / "harmless-base-test-first500.jsonl.gz"


def run_script(script, *argv, check=True, timeout=900):
    """Run a pipeline script in a subprocess, as a user would; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        # one BLAS thread, as run_pipeline.sh runs the tiny preset: the tests then train what the pipeline trains
        env={
            **__import__("os").environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        },
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A work dir holding `processed_data/` built by `data_process.py --preset tiny`."""
    work = tmp_path_factory.mktemp("tiny_work")
    run_script("data_process.py", "--preset", "tiny", "--work_dir", work)
    return work


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_data_dir):
    """The same work dir after `reward_model_training.py --preset tiny` (trained once per session)."""
    if not (tiny_data_dir / "final_reward_model" / "config.json").exists():
        run_script("reward_model_training.py", "--preset", "tiny", "--work_dir", tiny_data_dir)
    return tiny_data_dir


@pytest.fixture
def work(tiny_reward_dir, tmp_path):
    """A fresh work dir sharing the session's processed data and reward model (links, not copies)."""
    for name in ("processed_data", "final_reward_model"):
        (tmp_path / name).symlink_to(tiny_reward_dir / name)
    return tmp_path


def evaluate_against_base(work):
    """`evaluate_models.py --preset tiny` on a work dir, as a user runs it: its summary sheet, one row per model.

    On the tiny data the summary carries the oracle's columns (`oracle_good`, `oracle_gain_ci_low`, ...),
    the truth about the replies that a learning test checks beside the reward model's score."""
    import pandas as pd

    run_script("evaluate_models.py", "--preset", "tiny", "--work_dir", work)
    return pd.read_excel(work / "rlhf_eval_results_with_base.xlsx", sheet_name="summary").set_index("model")
