"""Eager against compiled generation: `common.generate_responses` with and without `--compile_generation`.

PPO's and GRPO's rollouts and the evaluation sample with `generate`; on a GPU a decode step of gpt2 at batch 8 is
about 580 small kernels, launch-bound in eager mode. This measures both paths on the same prompts, alternating,
`--repeats` times each after one warm-up call per path (the compiled path's warm-up is its compilation, reported
apart), and prints the median generated tokens per second, the peak memory and whether the two paths sampled
the same tokens under the same seed (they should, where the kernels' rounding agrees: tests/test_common.py
checks it on a CPU).

    python benchmarks/generation.py --model gpt2                                # a GPU: inductor with CUDA graphs
    python benchmarks/generation.py --random_init ../shared/gpt2-tokenizer \\
        --dataset ../shared/hh-rlhf-sample/harmless-base-test-first1812.jsonl.gz  # offline, GPT-2's size

The prompts are the first `--batch_size` conversations of `--dataset` cut before their last reply, left
truncated to `--max_prompt_length` tokens (PPO's gpt2 settings: 8 prompts, 256 tokens, 64 new tokens);
`--preset tiny` runs the bundled tiny model on its data in seconds (benchmarks/gpu_check.sh's CPU path).
`--out FILE` also writes the result as JSON.
"""

# ruff: noqa: E402  (the repository root goes on sys.path before common.py is imported)
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from preflight import build_random_model

import common
from lifecycle import CommonArgs, atomic_write_json, check, run
from reporting import peak_memory_mb


@dataclass
class Args(CommonArgs):
    dataset: str = field(
        default="Anthropic/hh-rlhf", metadata={"help": "as data_process.py --dataset: a hub id or a local copy"}
    )
    random_init: str = field(
        default="", metadata={"help": "a tokenizer folder: measure a randomly initialised GPT-2 built with it"}
    )
    n_layer: int = field(default=12, metadata={"help": "--random_init: layers (GPT-2: 12)"})
    n_embd: int = field(default=768, metadata={"help": "--random_init: width (GPT-2: 768)"})
    n_head: int = field(default=12, metadata={"help": "--random_init: attention heads (GPT-2: 12)"})
    work_dir: str = field(default="runs/generation", metadata={"help": "where --random_init's model is saved"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call (PPO's rollout batch)"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept, truncated from the left"})
    max_new_tokens: int = field(default=64, metadata={"help": "reply tokens sampled"})
    repeats: int = field(default=3, metadata={"help": "timed calls per path, alternating"})
    out: str = field(default="", metadata={"help": "also write the result to this JSON file"})


TINY = dict(max_prompt_length=64, max_new_tokens=16)  # --preset tiny: the bundled model and data, in seconds


def prompts_from(dataset, n):
    rows = common.load_preference_data(dataset)["train"]
    prompts = [split[0] for text in list(rows["chosen"][: 4 * n]) if (split := common.split_conversation(text))]
    check(len(prompts) >= n, f"--dataset {dataset}: fewer than {n} conversations with a final reply")
    return prompts[:n]


def timed(model, tokenizer, prompts, args, compile):
    """One seeded generate call: (seconds, reply tokens generated, the sampled ids)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    samples = common.generate_responses(
        model, tokenizer, prompts, args.max_prompt_length, args.max_new_tokens, compile=compile
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, int(samples.response_mask.sum()), samples.response_ids.cpu()


def main(args):
    check(args.batch_size >= 1 and args.repeats >= 1, "--batch_size and --repeats must be at least 1")
    model_path = args.model
    if args.random_init:
        model_path = str((Path(args.work_dir) / "random_gpt2").resolve())
        build_random_model(args, model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = common.load_tokenizer(model_path)
    model = common.load_causal_lm(model_path, tokenizer).to(device).eval()
    prompts = prompts_from(args.dataset, args.batch_size)
    name, reason = common.precision()
    print(f"{device.type}: {reason}; {args.batch_size} prompts x {args.max_new_tokens} new tokens")

    warmup = {path: timed(model, tokenizer, prompts, args, path == "compiled")[0] for path in ("eager", "compiled")}
    runs = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for path in runs:
            runs[path].append(timed(model, tokenizer, prompts, args, path == "compiled"))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "precision": name}
    for path, calls in runs.items():
        result[path] = {
            "warmup_s": round(warmup[path], 2),
            "median_s": round(statistics.median(s for s, _, _ in calls), 3),
            "tokens_per_s": round(statistics.median(n / s for s, n, _ in calls), 1),
        }
    result["same_tokens"] = all(torch.equal(e[2], c[2]) for e, c in zip(runs["eager"], runs["compiled"]))
    result["speedup"] = round(result["compiled"]["tokens_per_s"] / result["eager"]["tokens_per_s"], 2)
    result["peak_mb"] = round(peak_memory_mb())
    print(
        "| path | warm-up (s) | median call (s) | tokens/s |\n| --- | --- | --- | --- |\n"
        + "\n".join(
            f"| {path} | {result[path]['warmup_s']} | {result[path]['median_s']} | {result[path]['tokens_per_s']} |"
            for path in runs
        )
    )
    print(f"compiled / eager: {result['speedup']}x; same tokens: {result['same_tokens']}; peak {result['peak_mb']} MB")
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    run(main, Args, TINY)
