"""Build the offline `tiny` base model: a byte-level BPE tokenizer and a ~1M-parameter GPT-2.

The tokenizer is GPT-2's recipe (byte-level BPE, `<|endoftext|>` as BOS/EOS/UNK)
trained on the tiny data's conversations; the model is `GPT2LMHeadModel` with a small
`GPT2Config`, briefly trained as a language model on the same conversations: chosen
and rejected final replies alike, each followed by EOS, with the loss on the reply
only (as supervised fine-tuning does; a loss on the whole text also teaches it to
invent further turns instead of ending its own). After `\\n\\nAssistant:` it therefore
writes on-format replies, good and bad ones, and ends its turn with EOS: the starting
point RLHF needs, a model whose samples vary in quality.

The incoherent rejected replies (word salad, `tiny_oracle.coherent_sentences`) are left out of its
training text, as a pretrained GPT-2 never read salad written on purpose: the model knows
what fluent text is, so the reward model built on it can learn to tell salad apart, and
the salad it still writes is its own (what a policy drifting from it writes too).

Everything is loaded later with `from_pretrained(path)`, exactly as `gpt2` is.
Deterministic on one machine (fixed seed, fixed thread count, deterministic kernels).

    python assets/make_tiny_model.py                 # writes assets/tiny_gpt2/
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_oracle import coherent_sentences  # noqa: E402

from common import load_preference_data, split_conversation
from lifecycle import TINY_DATA_DIR, TINY_MODEL_DIR, replace_folder

EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
# gelu_pytorch_tanh: the same tanh approximation as GPT-2's gelu_new (within 3e-7), in one fused kernel: 5x faster
CONFIG = dict(n_positions=512, n_embd=128, n_layer=4, n_head=4, activation_function="gelu_pytorch_tanh")
STEPS, BATCH_SIZE, MAX_LENGTH, LR = 1500, 32, 192, 2e-3


def build_tokenizer(texts, out_dir):
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tokenizer.model_max_length = CONFIG["n_positions"]
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def main(out_dir=TINY_MODEL_DIR, seed=0, steps=STEPS):
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    data = load_preference_data(str(TINY_DATA_DIR))["train"]
    texts = list(data["chosen"]) + list(data["rejected"])
    pairs = [split for split in map(split_conversation, texts) if split and split[1]]
    fluent = [(prompt, reply) for prompt, reply in pairs if coherent_sentences(reply) is not None]
    print(f"{len(fluent)} replies to learn from ({len(pairs) - len(fluent)} incoherent ones left out)")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(texts, tmp)

    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **CONFIG,
    )
    model = GPT2LMHeadModel(config)
    print(f"tiny GPT-2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # (prompt ids, reply ids + EOS), the prompt cut from the left to fit MAX_LENGTH
    examples = []
    for prompt, reply in fluent:
        reply_ids = tokenizer(" " + reply)["input_ids"][: MAX_LENGTH // 2] + [tokenizer.eos_token_id]
        examples.append((tokenizer(prompt)["input_ids"][-(MAX_LENGTH - len(reply_ids)) :], reply_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.05)
    order = torch.randperm(len(examples))
    model.train()
    for step in range(steps):
        batch = [examples[i] for i in order[(step * BATCH_SIZE) % len(examples) :][:BATCH_SIZE].tolist()]
        width = max(len(p) + len(r) for p, r in batch)
        pad = [tokenizer.eos_token_id]
        input_ids = torch.tensor([p + r + pad * (width - len(p) - len(r)) for p, r in batch])
        mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in batch])
        # loss on the reply and its EOS only; right padding keeps positions simple here
        labels = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  lm loss {loss.item():.3f}")
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    replace_folder(tmp, out_dir)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".prev"), ignore_errors=True)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out_dir", default=str(TINY_MODEL_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    cli = parser.parse_args()
    main(cli.out_dir, cli.seed, cli.steps)
