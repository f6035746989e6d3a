"""The shared data rules, the loader, argument parsing and the masked maths of common.py."""

import gzip
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLE

import common
import lifecycle
import reporting
from common import (
    drop_reason,
    filter_edge_cases,
    gather_logprobs,
    join_conversation,
    last_token_index,
    load_preference_data,
    masked_mean,
    masked_whiten,
    position_ids_from_mask,
    response_mask_from_eos,
    split_conversation,
)
from lifecycle import CommonArgs, UserError, parse_args

CONV = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."


# --- split_conversation / join_conversation -------------------------------------------------


def test_split_takes_the_last_assistant_turn_after_the_last_human_turn():
    prompt, response = split_conversation(CONV)
    assert prompt == "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert response == "Put it in boiling water."
    assert join_conversation(prompt, response) == CONV


@pytest.mark.parametrize(
    "text",
    [
        "no turns at all",
        "\n\nAssistant: only the assistant speaks",
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: the human speaks last",
    ],
)
def test_split_returns_none_without_a_final_assistant_turn(text):
    assert split_conversation(text) is None


def test_split_strips_leading_whitespace_and_keeps_an_empty_reply():
    assert split_conversation("\n\nHuman: q\n\nAssistant:   \n answer ") == ("\n\nHuman: q\n\nAssistant:", "answer ")
    assert split_conversation("\n\nHuman: q\n\nAssistant:") == ("\n\nHuman: q\n\nAssistant:", "")


# --- filter rules, in order -----------------------------------------------------------------


def pair(chosen_reply, rejected_reply, prompt="\n\nHuman: How do I boil an egg?\n\nAssistant:"):
    return {"chosen": join_conversation(prompt, chosen_reply), "rejected": join_conversation(prompt, rejected_reply)}


@pytest.mark.parametrize(
    "example, rule",
    [
        (pair("Boil it for nine minutes.", "Boil it for nine minutes."), "tie"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman:"}, "short"),
        (pair("Boil it. " * 30, "No."), "length_ratio"),
        (pair("a" * 7000, "b" * 7000), "char_limit"),
        ({"chosen": "\n\nHuman: one two three", "rejected": "\n\nHuman: one two four"}, "unsplittable"),
        (
            {
                "chosen": "\n\nHuman: boil?\n\nAssistant: Yes, boil it.",
                "rejected": "\n\nHuman: fry?\n\nAssistant: Yes, fry it.",
            },
            "prompts_differ",
        ),
        (pair("", "Put the egg in water and boil it."), "empty_reply"),
        (pair("Put it in boiling water for nine minutes.", "Eggs are eggs, whatever."), None),
    ],
)
def test_drop_reason(example, rule):
    assert drop_reason(example) == rule
    assert filter_edge_cases(example) == (rule is None)


def test_a_pair_breaking_several_rules_is_counted_under_the_first():
    # short (rejected < 10 chars) and also unsplittable: "short" comes first
    assert drop_reason({"chosen": "\n\nHuman: a long enough question", "rejected": "x"}) == "short"


def test_char_limit_is_reached_not_exceeded_and_overridable():
    ex = pair("a" * 100, "b" * 100)
    n = len(ex["chosen"])
    assert drop_reason(ex, char_limit=n) == "char_limit"
    assert drop_reason(ex, char_limit=n + 1) is None


def test_response_scope_applies_length_rules_to_the_replies():
    long_prompt = "\n\nHuman: " + "context " * 50 + "\n\nAssistant:"
    ex = pair("Boil it for nine minutes, then cool it in cold water.", "No idea.", prompt=long_prompt)
    assert drop_reason(ex, scope="full") is None  # the shared prompt hides the length difference
    assert drop_reason(ex, scope="response") == "short"


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/hh-rlhf-sample is absent (a fresh clone)")
def test_rules_on_the_real_sample():
    rows = [json.loads(line) for line in gzip.open(SAMPLE, "rt")]
    reasons = [drop_reason(r) for r in rows]
    kept = [r for r, why in zip(rows, reasons) if why is None]
    assert 0.8 < len(kept) / len(rows) < 0.97  # the seed kept ~89% of the train pairs
    for row in kept:
        prompt, chosen = split_conversation(row["chosen"])
        assert join_conversation(prompt, chosen) == row["chosen"].rstrip() or row["chosen"].startswith(prompt)
        assert prompt.endswith("\n\nAssistant:") and chosen
        assert split_conversation(row["rejected"])[0] == prompt


# --- the loader -----------------------------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_loader_reads_file_folder_and_folder_of_subsets(tmp_path):
    row = json.dumps({"chosen": "a" * 20, "rejected": "b" * 20})
    write_jsonl(tmp_path / "one.jsonl", [row, row])
    assert len(load_preference_data(str(tmp_path / "one.jsonl"))["train"]) == 2
    for subset in ("harmless-base", "helpful-base"):
        (tmp_path / "hh" / subset).mkdir(parents=True)
        with gzip.open(tmp_path / "hh" / subset / "train.jsonl.gz", "wt") as f:
            f.write(row + "\n" + row + "\n")
        write_jsonl(tmp_path / "hh" / subset / "test.jsonl", [row])
    data = load_preference_data(str(tmp_path / "hh"))
    assert (len(data["train"]), len(data["test"])) == (4, 2)
    assert len(load_preference_data(str(tmp_path / "hh" / "helpful-base"))["test"]) == 1


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"chosen": "abc", "rejected": ', "bad.jsonl:2: not valid JSON"),
        ('{"chosen": "abc"}', "bad.jsonl:2: expected an object with string fields 'chosen' and 'rejected'"),
        ('{"chosen": "abc", "rejected": 3}', "bad.jsonl:2: expected an object"),
    ],
)
def test_loader_names_file_and_line_of_a_broken_row(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"chosen": "x", "rejected": "y"}), line])
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        load_preference_data(str(path))


def test_loader_errors_on_missing_paths(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_preference_data(str(tmp_path / "missing.jsonl.gz"))
    with pytest.raises(UserError, match="no train.jsonl"):
        load_preference_data(str(tmp_path))


# --- argument parsing and presets -----------------------------------------------------------


def test_tiny_preset_overrides_defaults_but_flags_win():
    args = parse_args(CommonArgs, {"seed": 7}, ["--preset", "tiny"])
    assert args.model == str(lifecycle.TINY_MODEL_DIR) and args.seed == 7
    args = parse_args(CommonArgs, {"seed": 7}, ["--preset", "tiny", "--seed", "3"])
    assert args.seed == 3
    assert parse_args(CommonArgs, {"seed": 7}, []).model == "gpt2"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
        (["--preset", "huge"], "invalid choice 'huge'"),
        (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    ],
)
def test_bad_flags_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(CommonArgs, {}, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# --- masks, positions and masked maths ------------------------------------------------------


def test_response_mask_keeps_the_first_eos_and_drops_what_follows():
    eos = 0
    ids = torch.tensor([[5, 6, eos, eos, eos], [5, eos, 7, eos, 8], [5, 6, 7, 8, 9], [eos, eos, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(response_mask_from_eos(ids, eos), expected)


def test_positions_and_last_token_under_both_paddings():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(right).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 0, 0]]
    assert last_token_index(left).tolist() == [4, 4]
    assert last_token_index(right).tolist() == [2, 0]


def test_gather_logprobs_matches_a_per_token_loop():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 11), torch.randint(0, 11, (2, 4))
    got = gather_logprobs(logits, labels)
    for b in range(2):
        for t in range(4):
            expected = torch.log(torch.softmax(logits[b, t].double(), -1)[labels[b, t]])
            assert abs(got[b, t].item() - expected.item()) < 1e-5


def test_masked_mean_and_whiten_ignore_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 7.0])
    assert masked_mean(values, mask).item() == pytest.approx(kept.mean().item())
    whitened = masked_whiten(values, mask)
    assert whitened[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened[mask.bool()].var().item() == pytest.approx(1.0, abs=1e-4)
    expected = (kept - kept.mean()) / kept.std()
    assert torch.allclose(whitened[mask.bool()], expected, atol=1e-4)


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    ctl = common.AdaptiveKLController(0.05, target=0.3, horizon=100)
    ctl.update(current_kl=0.6, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.05 * (1 + 0.2 * 10 / 100))
    ctl.update(current_kl=0.0, n_steps=10)  # clipped to -0.2
    assert ctl.value == pytest.approx(0.05 * 1.02 * 0.98)


def test_a_percent_sign_in_help_text_does_not_break_help(capsys):
    from dataclasses import dataclass, field

    @dataclass
    class Args(CommonArgs):
        level: float = field(default=0.95, metadata={"help": "a 95% interval"})

    with pytest.raises(SystemExit) as exc:
        parse_args(Args, {}, ["--help"])
    assert exc.value.code == 0
    assert "a 95% interval (default: 0.95)" in " ".join(capsys.readouterr().out.split())


def test_a_share_is_drawn_on_its_whole_scale_and_a_loss_on_its_own(tmp_path):
    """0.9332 -> 0.9291 is no plunge: accuracies and shares get [0, 1]; other metrics keep their own range."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(
            json.dumps({"step": s, "eval/accuracy": a, "eval/loss": loss}) + "\n"
            for s, a, loss in ((28, 0.9332, 0.25), (56, 0.9291, 0.19))
        )
    )
    ranges = reporting.plot_metrics(path, ["eval/accuracy", "eval/loss"], tmp_path / "curves.png")
    assert ranges["eval/accuracy"] == (-0.02, 1.02)
    assert 0.15 < ranges["eval/loss"][0] < 0.19 and 0.25 < ranges["eval/loss"][1] < 0.3
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_ctrl_c_inside_an_import_is_still_an_interrupt(tmp_path, monkeypatch):
    """Python wraps a KeyboardInterrupt raised in a class body's __set_name__ (a lazy import) in a RuntimeError."""
    from dataclasses import dataclass

    @dataclass
    class Args(lifecycle.CommonArgs):
        pass

    def main(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'cached_property' instance 'line'") from e

    monkeypatch.setattr("sys.argv", ["script", "--work_dir", str(tmp_path), "--model", str(lifecycle.TINY_MODEL_DIR)])
    with pytest.raises(SystemExit, match="interrupted: nothing was left half-written"):
        lifecycle.run(main, Args)
    with pytest.raises(SystemExit, match="interrupted before the first checkpoint"):
        lifecycle.run(main, Args, checkpoint=lambda args: tmp_path / "checkpoint.pt")


def test_gpt2_family_models_load_with_the_fused_gelu_and_give_the_same_logits(tmp_path):
    """Real gpt2's `gelu_new` (about eight kernels) is loaded as `gelu_pytorch_tanh` (one): logits within 1e-5."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
    assert config.activation_function == "gelu_new"  # as in gpt2's own config
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer = SimpleNamespace(pad_token_id=0)
    original = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    fused = common.load_causal_lm(str(tmp_path), tokenizer).eval()
    assert original.config.activation_function == "gelu_new"
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    assert common.fused_activation(str(lifecycle.TINY_MODEL_DIR)) == {}  # already fused: nothing to change


@pytest.mark.parametrize("saved, visible, restored", [(2, 1, [0]), (0, 2, []), (1, 1, [0]), (2, 0, [])])
def test_cuda_random_state_is_restored_where_its_device_exists(monkeypatch, capsys, saved, visible, restored):
    """A checkpoint written on 2 GPUs and resumed on 1 (or written on a CPU and resumed on a GPU) restores the
    generators of the devices that exist and says what it could not; it never indexes a missing device."""
    calls, state = [], lifecycle.rng_state()  # this CPU's: python, numpy, torch
    if saved:
        state["cuda"] = [torch.tensor([7 + i], dtype=torch.uint8) for i in range(saved)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((device, int(state[0]))))
    lifecycle.set_rng_state(state)
    assert calls == [(device, 7 + device) for device in restored]
    said = capsys.readouterr().out
    if saved == visible:
        assert said == ""
    else:
        assert f"holds the CUDA random state of {saved} device(s) and this run sees {visible}" in said
        assert f"{len(restored)} restored, the others seeded afresh" in said


@pytest.mark.parametrize(
    "gpu, capability, native_bf16, expected",
    [
        (None, None, None, ("fp32", "a CPU: fp32")),
        ("NVIDIA A100", (8, 0), True, ("bf16", "NVIDIA A100 (compute capability 8.0) computes bf16 natively")),
        ("Tesla T4", (7, 5), False, ("fp16", "Tesla T4 (compute capability 7.5) has no native bf16: fp16 autocast")),
    ],
)
def test_the_precision_follows_what_the_gpu_computes_natively(monkeypatch, gpu, capability, native_bf16, expected):
    """A T4 'supports' bf16 by emulation (torch's default answer): it gets fp16 with a scaler, not slow bf16."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    name, reason = common.precision()
    assert name == expected[0] and reason.startswith(expected[1]), reason
    assert asked == ([] if gpu is None else [False])  # never the emulated answer
    assert common.MIXED_PRECISION[name] == {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[name]
    assert common.trainer_precision() == {"bf16": name == "bf16", "fp16": name == "fp16"}  # Trainer's flags alike


def test_output_heads_stay_fp32_under_bf16_autocast_while_the_body_runs_in_bf16(tiny_reward_dir):
    """The LM head, the reward model's score and PPO's value head, under CPU bf16 autocast: each equals an fp32
    computation on the same final hidden state within 1e-5; the body is bf16 (its logits move from fp32's)."""
    import PPO_training as ppo

    tokenizer = common.load_tokenizer(str(lifecycle.TINY_MODEL_DIR))
    lm = common.load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer).eval()
    reward_model, _ = common.load_reward_model(tiny_reward_dir, "cpu")
    ids = torch.randint(0, lm.config.vocab_size, (2, 24))
    ids[ids == tokenizer.pad_token_id] = tokenizer.pad_token_id - 1  # the classifier reads the last non-pad token
    with torch.no_grad():
        full_fp32 = lm(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm(ids, output_hidden_states=True)
            scored = reward_model(ids, output_hidden_states=True)
            policy = ppo.PolicyWithValueHead(lm)
            torch.nn.init.normal_(policy.value_head.weight)
            values = policy(ids, torch.ones_like(ids), None).values
    hidden = out.hidden_states[-1].float()
    assert out.logits.dtype == torch.float32 and values.dtype == torch.float32
    torch.testing.assert_close(out.logits, hidden @ lm.lm_head.weight.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        scored.logits, scored.hidden_states[-1].float()[:, -1] @ reward_model.score.weight.T, rtol=0, atol=1e-5
    )
    head = policy.value_head
    torch.testing.assert_close(values, (hidden @ head.weight.T + head.bias).squeeze(-1), rtol=0, atol=1e-5)
    assert (out.logits - full_fp32).abs().max() > 1e-3  # the body did run in bf16
    assert type(common.fp32_head(torch.nn.Linear(2, 1))) is common.FP32Linear
