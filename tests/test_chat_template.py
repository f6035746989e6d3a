"""benchmarks/chat_template.py: hh prompts as chat messages, and a run on the tiny data with a tiny chat template."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SCRIPT_ENV

import common
import lifecycle

SCRIPT = REPO / "benchmarks" / "chat_template.py"
spec = importlib.util.spec_from_file_location("chat_template", SCRIPT)
chat_template = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_template)

# the shape of SmolLM2's template (a default system turn, then <|im_start|>role\ncontent<|im_end|>), in the tiny
# tokenizer's words
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ 'System: be kind.\n' }}{% endif %}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_an_hh_prompt_becomes_its_turns_as_messages():
    prompt = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?\n\nAssistant:"
    assert chat_template.chat_messages(prompt) == [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "In water."},
        {"role": "user", "content": "For how long?"},
    ]
    with pytest.raises(lifecycle.UserError, match="does not end with an empty Assistant turn"):
        chat_template.chat_messages("\n\nHuman: Hi\n\nAssistant: Hello")


def run(*argv):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, env=SCRIPT_ENV, timeout=600
    )


def test_both_formats_are_sampled_and_scored_on_the_same_prompts(work, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(lifecycle.TINY_MODEL_DIR, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    tokenizer = common.load_tokenizer(str(model))
    rendered = chat_template.render(tokenizer, ["\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"])
    assert rendered == ["System: be kind.\nuser: Hi\nassistant: Hello\nuser: Bye\nassistant: "]
    proc = run("--work_dir", work, "--model", model, "--num_prompts", 6, "--max_new_tokens", 8, "--batch_size", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((work / "chat_template_comparison.json").read_text())
    rows, summary = result["rows"], result["summary"]
    assert len(rows) == summary["prompts"] == 6
    for row in rows:
        assert row["prompt"].endswith("\n\nAssistant:")
        for name in ("hh", "template"):
            assert 0 <= row[name]["length"] <= 8 and isinstance(row[name]["reply"], str)
            assert isinstance(row[name]["proxy"], float) and "gold" not in row[name]  # no gold model here
    gains = [r["template"]["proxy"] - r["hh"]["proxy"] for r in rows]
    assert summary["proxy_gain"]["mean"] == pytest.approx(sum(gains) / 6)
    low, high = summary["proxy_gain"]["ci"]
    assert min(gains) <= low <= high <= max(gains)
    assert summary["hh"]["proxy"] == pytest.approx(sum(r["hh"]["proxy"] for r in rows) / 6)
    assert "template - hh, proxy:" in proc.stdout and "| hh |" in proc.stdout and "| template |" in proc.stdout


def test_a_model_without_a_chat_template_is_one_line(work):
    proc = run("--work_dir", work, "--model", lifecycle.TINY_MODEL_DIR, "--num_prompts", 2)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --model {lifecycle.TINY_MODEL_DIR}: its tokenizer has no chat template"
