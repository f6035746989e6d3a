"""Any causal LM through every stage: `--model` pointing at a randomly initialised 2-layer Llama (SmolLM2's
architecture, with a tokenizer whose EOS is its own `<|im_end|>` and which opens every text with a BOS, as Llama 3's
does) and at a 2-layer GPT-NeoX (Pythia's: an untied output head, rotary positions on a quarter of each head), a step
or two of each stage on the tiny data, offline, in-process."""

import itertools
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import data_process
import DPO_training as dpo
import evaluate_models
import GRPO_training as grpo
import lifecycle
import PPO_training as ppo
import reward_model_training as rm
import SFT_training as sft
from common import load_tokenizer
from lifecycle import parse_args

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "llama": lambda vocab: LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, **SHAPE)
    ),
    "gpt_neox": lambda vocab: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=vocab, rotary_pct=0.25, max_position_embeddings=512, tie_word_embeddings=False, **SHAPE
        )
    ),
}


def write_model(folder, architecture):
    """A model folder as `from_pretrained` expects one: config, random weights, the tiny data's tokenizer (for the
    Llama with chat-style special tokens: `<|im_start|>` as a BOS on every text, `<|im_end|>` as EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(lifecycle.TINY_MODEL_DIR)
    if architecture == "llama":
        tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
        tokenizer.add_bos_token = True
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture](len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/some-model\n---\n# a model\n")
    return load_tokenizer(str(folder))


def stage(script, work, model, *argv):
    args = parse_args(script.Args, script.TINY, ["--preset", "tiny", "--work_dir", str(work), "--model", str(model)])
    for flag, value in zip(argv[::2], argv[1::2]):
        setattr(args, flag.lstrip("-"), value)
    return script.main(args)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_stage_runs_on_another_architecture(tmp_path, architecture, capsys):
    model, work = tmp_path / architecture, tmp_path / "work"
    tokenizer = write_model(model, architecture)
    if architecture == "llama":  # its texts start with the BOS and end with its own EOS, not GPT-2's
        assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id and tokenizer.eos_token == "<|im_end|>"

    stage(data_process, work, model, "--train_subset", 96, "--test_subset", 24)
    processed = json.loads((work / lifecycle.PROCESSED_DIR / "stats.json").read_text())
    assert processed["base_model"] == str(model)
    few = ("--max_steps", 2, "--per_device_train_batch_size", 4, "--max_eval_samples", 8, "--eval_steps", 50)
    stage(rm, work, model, *few)
    stage(rm, work, model, *few, "--train_split", lifecycle.GOLD_SPLIT)
    sft_few = ("--max_train_samples", 8, "--max_eval_samples", 4, "--per_device_train_batch_size", 4)
    stage(sft, work, model, *sft_few, "--eval_steps", 0)
    rollouts = ("--total_steps", 1, "--snapshot_every", 0, "--max_new_tokens", 8)
    rollouts += ("--eval_prompts", 4)
    stage(ppo, work, model, *rollouts, "--rollout_batch_size", 4, "--num_minibatches", 1, "--test_prompts", 4)
    stage(grpo, work, model, *rollouts, "--rollout_batch_size", 2, "--group_size", 2, "--eval_prompts", 2)
    stage(dpo, work, model, *sft_few, "--eval_steps", 0, "--snapshot_every", 0, "--eval_prompts", 4)
    stage(evaluate_models, work, model, "--num_prompts", 4, "--max_new_tokens", 8, "--frontier", False, "--workers", 1)
    assert "Traceback" not in capsys.readouterr().err

    for folder in (lifecycle.REWARD_MODEL_DIR, lifecycle.SFT_DIR, lifecycle.PPO_DIR, lifecycle.DPO_DIR):
        config = json.loads((work / folder / "config.json").read_text())
        assert config["model_type"] == architecture, folder
        card = ModelCard.load(work / folder / "README.md")  # the base's licence and hub id, its architecture
        assert card.data.license == "apache-2.0" and card.data.base_model == "someone/some-model"
        assert architecture in card.data.tags and "gpt2" not in card.data.tags
    rows = [json.loads(line) for line in (work / evaluate_models.RESPONSES_JSONL).open()]
    assert len(rows) == 4
    for row, name in itertools.product(rows, ("base", "sft", "ppo", "grpo", "dpo")):
        assert isinstance(row[f"{name}_response"], str) and 0 <= row[f"{name}_length"] <= 8
        assert math.isfinite(row[f"{name}_reward"]) and math.isfinite(row[f"{name}_gold"])
    assert set(json.loads((work / lifecycle.PPO_DIR / "eval_results.json").read_text())) >= {"ppo", "sft"}
