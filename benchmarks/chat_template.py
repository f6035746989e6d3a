"""Does the conversation format matter? An instruct model's replies to hh-rlhf prompts as the pipeline writes them
("\\n\\nHuman: ...\\n\\nAssistant:" text) against the same conversations rendered through the model's own chat
template (SmolLM2-Instruct was tuned on `<|im_start|>user ... <|im_end|>` turns), scored by the same judges.

For a seeded sample of test prompts from processed_data/ (`common.test_prompt_sample`, the evaluation's own), the
model samples one reply per prompt in each format from the same seeded stream; both replies are then scored as the
pipeline scores any reply, `join_conversation(hh prompt, reply)`, by the proxy reward model and, where it exists, the
gold one (both trained on the hh text). Printed: per format the mean scores, the reply length in tokens, the share
of empty replies and the share that ended (EOS or a new turn) before --max_new_tokens; the paired difference
(template - hh) of each score with its percentile-bootstrap 95% interval; a few replies side by side. The per-prompt
rows go to --out (JSON).

    RLHF_CPU_BF16=1 python benchmarks/chat_template.py --work_dir runs/real --model models/SmolLM2-135M-Instruct
"""

# ruff: noqa: E402  (the repository root goes on sys.path before common.py is imported)
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm.auto import tqdm

import common
from evaluate_models import bootstrap_ci
from lifecycle import GOLD_REWARD_MODEL_DIR, PROCESSED_DIR, UserError, atomic_write_json, check

TURN = re.compile(f"({re.escape(common.HUMAN)}|{re.escape(common.ASSISTANT)})")  # the turn markers, kept by split


def chat_messages(prompt):
    """An hh prompt ("\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:") as chat messages, the final
    empty assistant turn left for the template's generation prompt: [{"role": "user", "content": "a"}, ...]."""
    parts = TURN.split(prompt)  # [before the first turn, marker, text, marker, text, ...]
    messages = [
        {"role": "user" if marker == common.HUMAN else "assistant", "content": text.strip()}
        for marker, text in zip(parts[1::2], parts[2::2])
    ]
    check(
        messages and messages[-1] == {"role": "assistant", "content": ""},
        f"a prompt that does not end with an empty Assistant turn: {prompt[-80:]!r}",
    )
    return messages[:-1]


def render(tokenizer, prompts):
    """The prompts through the tokenizer's chat template, each ending with the template's assistant header."""
    check(tokenizer.chat_template, f"--model {tokenizer.name_or_path}: its tokenizer has no chat template")
    return [
        tokenizer.apply_chat_template(chat_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]


def sample(model, tokenizer, prompts, args):
    """One reply per prompt from the seeded stream: (replies, lengths in tokens, whether each ended early)."""
    common.set_seed(args.seed)
    replies, lengths, ended = [], [], []
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="generate", leave=False):
        samples = common.generate_responses(
            model, tokenizer, prompts[i : i + args.batch_size], args.max_prompt_length, args.max_new_tokens,
            args.temperature, args.top_p,
        )  # fmt: skip
        replies += samples.responses
        lengths += samples.response_mask.sum(1).tolist()
        ended += (samples.response_ids == tokenizer.eos_token_id).any(1).tolist()
    return replies, lengths, ended


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--work_dir", default=".", help="holds processed_data/ and final_reward_model/")
    parser.add_argument("--model", required=True, help="the instruct model (its tokenizer has the chat template)")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--max_prompt_length", type=int, default=256, help="tokens, the template's included")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--reward_max_length", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bootstrap_samples", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=3, help="replies printed side by side")
    parser.add_argument("--out", help="per-prompt rows, JSON (default WORK_DIR/chat_template_comparison.json)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    check(args.num_prompts >= 2, f"--num_prompts must be >= 2 (an interval needs two), got {args.num_prompts}")
    check((work / PROCESSED_DIR).is_dir(), f"--work_dir {work}: no {PROCESSED_DIR}/ (run data_process.py first)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = common.load_tokenizer(args.model)
    from datasets import load_from_disk

    _, hh_prompts = common.test_prompt_sample(load_from_disk(str(work / PROCESSED_DIR))["test"], args.num_prompts, 0)
    formats = {"hh": hh_prompts, "template": render(tokenizer, hh_prompts)}
    model = common.load_causal_lm(args.model, tokenizer).to(device).eval()
    judges = {"proxy": common.load_reward_model(work, device)}
    if (work / GOLD_REWARD_MODEL_DIR / "config.json").is_file():
        judges["gold"] = common.load_reward_model(work, device, gold=True)

    rows = [{"prompt": p} for p in hh_prompts]
    for name, prompts in formats.items():
        replies, lengths, ended = sample(model, tokenizer, prompts, args)
        scores = {
            j: common.get_reward(*m, hh_prompts, replies, args.reward_max_length).tolist() for j, m in judges.items()
        }
        for i, row in enumerate(rows):
            row[name] = {"reply": replies[i], "length": lengths[i], "ended": ended[i]}
            row[name] |= {judge: values[i] for judge, values in scores.items()}

    summary = {"prompts": len(rows), "model": args.model, "max_new_tokens": args.max_new_tokens}
    print(f"{len(rows)} test prompts, one reply each, {args.max_new_tokens} new tokens at most; scored on the hh text")
    print("| format | " + " | ".join(judges) + " | length | empty | ended early |")
    print("|---" * (len(judges) + 4) + "|")
    for name in formats:
        cells = {judge: np.mean([r[name][judge] for r in rows]) for judge in judges}
        cells |= {
            "length": np.mean([r[name]["length"] for r in rows]),
            "empty": np.mean([r[name]["reply"] == "" for r in rows]),
            "ended": np.mean([r[name]["ended"] for r in rows]),
        }
        summary[name] = {k: float(v) for k, v in cells.items()}
        print(f"| {name} | " + " | ".join(f"{v:+.3f}" if k in judges else f"{v:.2f}" for k, v in cells.items()) + " |")
    for judge in judges:
        gain = [r["template"][judge] - r["hh"][judge] for r in rows]
        low, high = bootstrap_ci(gain, args.bootstrap_samples, args.seed)
        clears = "clears 0" if low > 0 or high < 0 else "does not clear 0"
        summary[f"{judge}_gain"] = {"mean": float(np.mean(gain)), "ci": [float(low), float(high)]}
        print(f"template - hh, {judge}: {np.mean(gain):+.3f} [{low:+.3f}, {high:+.3f}] (95% bootstrap, {clears})")
    for row in rows[: args.examples]:
        print(f"\n... {row['prompt'][-120:]!r}")
        for name in formats:
            print(f"  {name:8} {row[name]['proxy']:+.2f}: {row[name]['reply'][:160]!r}")
    out = Path(args.out) if args.out else work / "chat_template_comparison.json"
    atomic_write_json(out, {"summary": summary, "rows": rows})
    print(f"\nrows: {out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
