"""The Dockerfile, parsed with the official parser (no container engine is reachable here)."""

import fnmatch

import pytest
from conftest import REPO

import lifecycle

dockerfile = pytest.importorskip("dockerfile", reason="dev dependency from requirements-dev.txt")


def commands():
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def test_image_is_an_official_pytorch_cuda_runtime_running_the_pipeline_as_non_root():
    cmds = commands()
    base = [c.value[0] for c in cmds if c.cmd == "FROM"]
    assert (
        len(base) == 1 and base[0].startswith("pytorch/pytorch:") and "cuda" in base[0] and base[0].endswith("-runtime")
    )
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [c for c in cmds if c.cmd == "ENTRYPOINT"][-1]
    assert entry.json and list(entry.value) == ["bash", "run_pipeline.sh"]
    volumes = [v for c in cmds if c.cmd == "VOLUME" for v in c.value]
    hf_home = [v.split("=", 1)[1] for c in cmds if c.cmd == "ENV" for v in c.value if v.startswith("HF_HOME=")]
    assert not hf_home or hf_home[0] in volumes  # ENV values come as key, value pairs in some versions
    assert any("huggingface" in v for v in volumes)


def test_image_installs_the_same_requirements_file():
    cmds = commands()
    copies = [c.value for c in cmds if c.cmd == "COPY" and c.value[0] == "requirements.txt"]
    assert copies, "requirements.txt is copied into the image"
    target = copies[0][-1]
    assert any(c.cmd == "RUN" and f"pip install -r {target}" in c.value[0] for c in cmds)


def test_dockerignore_covers_every_output_the_scripts_write():
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    outputs = [
        lifecycle.PROCESSED_DIR,
        lifecycle.SFT_DIR,
        lifecycle.REWARD_MODEL_DIR,
        lifecycle.GOLD_REWARD_MODEL_DIR,
        lifecycle.PPO_DIR,
        lifecycle.GRPO_BEST_DIR,
        lifecycle.GRPO_FINAL_DIR,
        lifecycle.DPO_DIR,
        "runs",
        "logs",
        "rlhf_eval_results_with_base.xlsx",
        "rlhf_eval_frontier.csv",
        "rlhf_eval_responses.jsonl",
        "rlhf_eval_rewards_boxplot.png",
        "gpt4_judgements.json",
        f"{lifecycle.PPO_DIR}.prev",
        f"{lifecycle.PPO_DIR}.tmp-123",
        ".venv",
        ".git",
    ]
    for out in outputs:
        assert any(fnmatch.fnmatch(out, p) for p in patterns), f".dockerignore misses {out}"
