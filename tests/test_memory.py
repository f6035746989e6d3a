"""`common.release_cpu_memory`: glibc's malloc_trim after every optimizer step of every training loop on a CPU (a
CPU run's heap otherwise grows step after step) once the process holds more than a GiB, and nothing on a GPU, in a
small process or where the C library has no malloc_trim."""

import ctypes
import sys

import pytest
import torch

import common
import DPO_training as dpo
import GRPO_training as grpo
import lifecycle
import PPO_training as ppo
import reporting
import reward_model_training as rm
import SFT_training as sft
from lifecycle import parse_args


def test_it_trims_on_a_cpu_and_nowhere_else(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "_malloc_trim", lambda: lambda pad: calls.append(pad))
    monkeypatch.setattr(common, "_resident_bytes", lambda: 3 * 2**30)
    assert common.release_cpu_memory("cpu") is True and common.release_cpu_memory(torch.device("cpu")) is True
    assert calls == [0, 0]  # malloc_trim(0): keep no free padding at the heap's top
    assert common.release_cpu_memory("meta") is False and common.release_cpu_memory("cuda:0") is False
    assert calls == [0, 0]  # a GPU's memory is not the C heap's
    monkeypatch.setattr(common, "_malloc_trim", lambda: None)  # macOS, musl, Windows
    assert common.release_cpu_memory("cpu") is False


def test_a_process_under_a_gib_is_not_trimmed(monkeypatch):
    """The tiny runs' processes (0.6 GB): a trim there hands back little and makes every step fault its pages in."""
    calls = []
    monkeypatch.setattr(common, "_malloc_trim", lambda: lambda pad: calls.append(pad))
    for resident, trimmed in ((2**30 - 4096, False), (2**30, True), (5 * 2**30, True), (None, True)):  # None: no /proc
        monkeypatch.setattr(common, "_resident_bytes", lambda resident=resident: resident)
        assert common.release_cpu_memory("cpu") is trimmed, resident
    assert calls == [0, 0, 0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, Linux's /proc")
def test_the_real_malloc_trim_and_resident_size(monkeypatch):
    trim = common._malloc_trim()
    assert trim is not None and trim.__name__ == "malloc_trim"
    assert ctypes.CDLL(None).malloc_trim(0) in (0, 1)  # 1: memory was released, 0: there was none to release
    # the resident size now: more than torch's libraries take, at most the process's peak (/proc's VmHWM, in MiB)
    assert 100 * 2**20 < common._resident_bytes() <= reporting.peak_rss_mb() * 2**20
    monkeypatch.setattr(common, "TRIM_ABOVE_BYTES", 0)
    assert common.release_cpu_memory("cpu") is True


def stage(script, work, *argv):
    args = parse_args(script.Args, script.TINY, ["--preset", "tiny", "--work_dir", str(work), *map(str, argv)])
    return args, script.main(args)


def test_every_training_loop_trims_once_per_optimizer_step(tmp_path, tiny_data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(common, "_malloc_trim", lambda: lambda pad: calls.append(pad))
    monkeypatch.setattr(common, "TRIM_ABOVE_BYTES", 0)  # the tiny model's processes are too small to be trimmed
    work = tmp_path / "work"
    work.mkdir()
    (work / lifecycle.PROCESSED_DIR).symlink_to(tiny_data_dir / lifecycle.PROCESSED_DIR)

    def trims(script, *argv):
        calls.clear()
        args, _ = stage(script, work, *argv)
        return args, len(calls)

    few = ("--max_steps", 3, "--per_device_train_batch_size", 4, "--max_eval_samples", 8, "--eval_steps", 50)
    assert trims(rm, *few, "--gradient_accumulation_steps", 2)[1] == 3
    assert trims(rm, *few, "--train_split", lifecycle.GOLD_SPLIT)[1] == 3  # the gold reward model
    samples = ("--max_train_samples", 32, "--max_eval_samples", 4, "--per_device_train_batch_size", 4)
    assert trims(sft, *samples, "--max_steps", 3, "--gradient_accumulation_steps", 2, "--eval_steps", 0)[1] == 3
    rollouts = ("--total_steps", 2, "--snapshot_every", 0, "--max_new_tokens", 8)
    ppo_argv = ("--rollout_batch_size", 4, "--num_minibatches", 2, "--test_prompts", 4, "--eval_every", 0)
    args, n = trims(ppo, *rollouts, *ppo_argv)
    assert args.ppo_epochs * args.num_minibatches == 4 and n == 2 * 4  # one per minibatch of every PPO epoch
    args, n = trims(
        grpo, *rollouts, "--rollout_batch_size", 2, "--group_size", 2, "--updates_per_rollout", 2, "--eval_prompts", 2
    )
    assert n == 2 * 2  # one per update of every rollout
    dpo_argv = (*samples, "--max_steps", 3, "--gradient_accumulation_steps", 2, "--eval_steps", 0)
    assert trims(dpo, *dpo_argv, "--snapshot_every", 0, "--eval_every", 0)[1] == 3  # per step, not per micro-batch
