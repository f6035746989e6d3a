"""The shared data rules, the loader, argument parsing and the masked maths of common.py."""

import gzip
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLE
from transformers import StoppingCriteria

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


def scripted_lm(tokenizer, prompt, script):
    """A GPT-2 that writes the token ids `script` after `prompt`, whatever it samples: its blocks are silenced and
    its token embedding zero, so its output depends on the position alone (one-hot position embeddings), and the
    head gives each position's next script token a logit of about +200 (sampling cannot pick another)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    start = len(tokenizer(prompt)["input_ids"])
    n = start + len(script) + 4
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=n, n_head=1, vocab_size=len(tokenizer), n_positions=n, tie_word_embeddings=False)
    )
    with torch.no_grad():
        for parameter in model.transformer.h.parameters():
            parameter.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(n))
        model.lm_head.weight.zero_()
        for t, token in enumerate(script):
            model.lm_head.weight[token, start - 1 + t] = 200 / n**0.5
    return model.eval()


@pytest.mark.parametrize("turn", ["\n\nHuman: And the next question?", "\n\nAssistant: I would add"])
def test_a_reply_that_begins_a_new_turn_ends_there_as_with_eos(turn):
    """An instruct model in the hh format writes the user's next turn itself: generation stops there, the reply is
    cut before it and ends with EOS in place of the turn's first token (padding after), so its mask, text, length
    and eos_share are an EOS-ended reply's; a reply that ends with its own EOS is untouched."""
    tokenizer = common.load_tokenizer(str(lifecycle.TINY_MODEL_DIR))
    eos, prompt = tokenizer.eos_token_id, "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    reply = tokenizer(" Put it in boiling water.")["input_ids"]
    turn_ids = tokenizer(turn)["input_ids"]
    model = scripted_lm(tokenizer, prompt, reply + turn_ids + tokenizer(" Thanks")["input_ids"])
    samples = common.generate_responses(model, tokenizer, [prompt], 64, 40, num_return_sequences=2)
    assert samples.responses == ["Put it in boiling water."] * 2
    # stopped as soon as the new turn's marker was complete, not at max_new_tokens
    marker = len(tokenizer(turn.split(":")[0] + ":")["input_ids"])
    assert samples.response_ids.shape[1] == len(reply) + marker
    want = reply + [eos] * marker
    assert samples.response_ids.tolist() == [want] * 2
    assert samples.response_mask.tolist() == [[1] * (len(reply) + 1) + [0] * (marker - 1)] * 2
    assert (samples.response_ids == eos).any(1).all()  # what response/eos_share counts

    ended = scripted_lm(tokenizer, prompt, reply + [eos] + turn_ids)  # its own EOS first: the turn is padding
    samples = common.generate_responses(ended, tokenizer, [prompt], 64, 40)
    assert samples.responses == ["Put it in boiling water."]
    assert samples.response_ids.tolist() == [reply + [eos]]  # stopped at EOS, as before


def test_a_new_turn_inside_a_token_cuts_before_that_token():
    """Where one token holds the reply's last characters and the new turn's first (".\\n" in some vocabularies),
    that token becomes the EOS and the text is decoded from the kept tokens: the reward model reads exactly what the
    policy's tokens say. A turn at the very start leaves an empty reply; one after the reply's own EOS is padding."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "Yes", ".\n", "\n", "Human:", " hi", "!"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    ids = torch.tensor([[1, 6, 3, 3, 4, 5], [1, 2, 3, 4, 5, 0], [3, 3, 4, 5, 0, 0], [1, 0, 3, 3, 4, 5]])
    texts = common.end_at_new_turns(ids, tokenizer)
    assert texts == ["Yes!", "Yes", "", "Yes"]
    assert ids.tolist() == [[1, 6, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6, [1, 0, 3, 3, 4, 5]]


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
    assert common.precision("cpu")[0] == "fp32"  # a model kept on the CPU of a GPU machine: fp32
    assert common.precision(torch.device("cuda", 0))[0] == name
    assert common.MIXED_PRECISION[name] == {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[name]
    assert common.trainer_precision() == {"bf16": name == "bf16", "fp16": name == "fp16"}  # Trainer's flags alike


@pytest.mark.parametrize("native", [True, False])
def test_rlhf_cpu_bf16_asks_for_bf16_autocast_only_on_a_cpu_that_computes_it_natively(monkeypatch, native):
    """The real rehearsal's switch (run_pipeline.sh --preset real sets it): off by default, so the tiny figures stay
    fp32; on, bf16 autocast where the CPU has AMX or AVX512-BF16, and Trainer told that it trains on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.delenv("RLHF_CPU_BF16", raising=False)
    assert common.precision() == ("fp32", "a CPU: fp32")
    assert common.trainer_precision() == {"bf16": False, "fp16": False}
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
    name, reason = common.precision()
    assert name == ("bf16" if native else "fp32") and reason.startswith("RLHF_CPU_BF16=1"), reason
    assert native or "no native bf16" in reason
    cpu = {"use_cpu": True} if native else {}
    assert common.trainer_precision() == {"bf16": native, "fp16": False} | cpu
    with common.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") == native
        assert not native or torch.get_autocast_dtype("cpu") == torch.bfloat16


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


def small_causal_lm(kind, vocab=300):
    """A randomly initialised 2-layer causal LM of three families, loaded as the scripts load theirs."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=64)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **shape)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, num_key_value_heads=2, **shape)),
    }[kind]()
    common.fp32_head(model.get_output_embeddings())
    return model.eval()


def left_padded_batch(vocab=300, rows=3, width=20, pads=(0, 5, 9)):
    ids = torch.randint(1, vocab, (rows, width))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_entropy_and_gradients_equal_the_full_logits(monkeypatch, kind, temperature):
    """`response_logprobs` runs the LM head a chunk at a time (recomputed in backward) and never holds the full
    logits: with the chunk forced to 7 tokens its log-probs, entropies and every gradient equal a hand-written
    computation from the model's full logits."""
    model = small_causal_lm(kind)
    ids, mask = left_padded_batch()
    context = 12

    def reference():
        logits = common.forward(model, ids, mask).logits[:, context - 1 : -1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        token_logp = logp.gather(-1, ids[:, context:, None]).squeeze(-1)
        return token_logp, -(logp.exp() * logp).sum(-1)

    def grads(logprobs, entropy):
        model.zero_grad()
        ((logprobs * mask[:, context:]).sum() + 0.1 * entropy.sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want_lp, want_ent = reference()
    want_grads = grads(want_lp, want_ent)
    monkeypatch.setattr(common, "LOGITS_CHUNK", 7 * 300)  # 7 tokens of a 300-word vocabulary: 3 rows in 6 chunks
    got_lp, got_ent, _ = common.response_logprobs(model, ids, mask, context, temperature, entropy=True)
    assert got_lp.shape == got_ent.shape == (3, 8)
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_ent, want_ent, rtol=0, atol=1e-5)
    got_grads = grads(got_lp, got_ent)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without autograd: no checkpointing, the same numbers, no entropy unless asked
        lp, ent, _ = common.response_logprobs(model, ids, mask, context, temperature)
    assert ent is None
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-5)


def fake_bf16(monkeypatch):
    """This CPU computes as a bf16 GPU would: `precision()` says bf16, so `autocast` and `freeze` act."""
    monkeypatch.setattr(common, "precision", lambda device=None: ("bf16", "faked for a test"))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_frozen_model_stores_what_autocast_casts_and_computes_bit_for_bit_the_same(monkeypatch, kind):
    """`freeze` under bf16 keeps the matrix-product weights in bf16 (no cast at every forward), embeddings, norms
    and the fp32 head in fp32: its log-probs under `autocast` equal the fp32 model's under autocast exactly."""
    import copy

    from transformers.pytorch_utils import Conv1D

    fake_bf16(monkeypatch)
    model = small_causal_lm(kind)
    frozen = common.freeze(copy.deepcopy(model))
    dtypes = {}
    for module in frozen.modules():
        dtypes.setdefault(type(module).__name__, set()).update(p.dtype for p in module.parameters(recurse=False))
    dtypes = {name: kinds for name, kinds in dtypes.items() if kinds}  # modules that hold parameters
    cast = {"Linear", "Conv1D"} & set(dtypes)
    assert cast and all(dtypes[name] == {torch.bfloat16} for name in cast)
    assert dtypes["FP32Linear"] == {torch.float32}
    assert all(dtypes[name] == {torch.float32} for name in dtypes if "Norm" in name or "Embedding" in name)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert any(isinstance(m, (torch.nn.Linear, Conv1D)) for m in model.modules())
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want, _, _ = common.response_logprobs(model, ids, mask, 12)
        got, _, _ = common.response_logprobs(frozen, ids, mask, 12)
        monkeypatch.setattr(common, "precision", lambda device=None: ("fp32", "as on this CPU"))
        plain, _, _ = common.response_logprobs(model, ids, mask, 12)
    assert torch.equal(got, want)
    assert (want - plain).abs().max() > 1e-4  # autocast did run the body in bf16
    assert common.freeze(copy.deepcopy(model)).lm_head.weight.dtype == torch.float32  # fp32: nothing cast


def test_the_evaluation_and_the_trainers_score_and_measure_one_sample_identically(
    monkeypatch, tiny_reward_dir, tmp_path
):
    """One precision everywhere (bf16 faked on this CPU): the rewards evaluate_models.py, PPO's final evaluation
    and GRPO's held-out evaluation give one set of replies are the same numbers, and so is their KL to the
    reference, where the trainers' forward passes and the evaluation's used to differ in precision."""
    import evaluate_models
    import PPO_training as ppo
    from live_eval import LiveEval

    fake_bf16(monkeypatch)
    tokenizer = common.load_tokenizer(str(lifecycle.TINY_MODEL_DIR))
    policy = common.load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer)
    with torch.no_grad():
        for p in policy.parameters():  # a policy that has moved away from its reference
            p.add_(0.02 * torch.randn_like(p))
    base = common.freeze(common.load_causal_lm(str(lifecycle.TINY_MODEL_DIR), tokenizer))
    reward_model, rm_tokenizer = common.load_reward_model(tiny_reward_dir, "cpu")
    assert next(reward_model.transformer.h[0].mlp.c_fc.parameters()).dtype == torch.bfloat16  # frozen as on a GPU
    prompts = [f"\n\nHuman: what is {word}?\n\nAssistant:" for word in ("rain", "a cat", "salt", "the sea")]
    args = SimpleNamespace(
        max_prompt_length=32, max_new_tokens=12, temperature=1.0, top_p=1.0, eval_top_p=1.0, eval_batch_size=4,
        reward_max_length=64, compile_generation=False, batch_size=4, seed=3, reward_funcs="model", reward_weights="",
        missing_eos_penalty=0.0, eval_prompts=4, work_dir=str(tmp_path), select_by="proxy",
    )  # fmt: skip

    def sampled():
        torch.manual_seed(3)
        return common.generate_responses(policy, tokenizer, prompts, 32, 12)

    samples = sampled()
    evaluation = evaluate_models.Scorers(proxy=(reward_model, rm_tokenizer)).score(prompts, samples.responses, args)
    evaluation_kl = evaluate_models.sequence_kl(policy, base, samples, 1.0)
    torch.manual_seed(3)
    ppo_eval = ppo.evaluate(policy, base, tokenizer, reward_model, rm_tokenizer, prompts, args)
    reward = common.RewardMix(args, "cpu", proxy=(reward_model, rm_tokenizer))
    (tmp_path / "processed_data").mkdir()  # not the tiny data: no oracle; no final_gold_reward_model/: no gold
    (tmp_path / "processed_data" / "stats.json").write_text(json.dumps({"dataset": "hh-rlhf"}))
    live = LiveEval(
        args, {"validation": {"prompt": prompts}}, tokenizer, base, (reward_model, rm_tokenizer), "cpu", reward
    )
    live_eval, scored, _ = live(policy)  # PPO's, GRPO's and DPO's held-out evaluation while training
    assert [reply for _, reply in scored] == samples.responses == sampled().responses
    assert [score for score, _ in scored] == pytest.approx(evaluation["reward"], abs=1e-6)
    assert live_eval["eval/proxy"] == pytest.approx(float(torch.tensor(evaluation["reward"]).mean()), abs=1e-6)
    assert live_eval["eval/sample_kl"] == pytest.approx(float(evaluation_kl.mean()), abs=1e-6)
    assert ppo_eval["score"] == pytest.approx(float(torch.tensor(evaluation["reward"]).mean()), abs=1e-6)
    assert ppo_eval["kl"] == pytest.approx(float(evaluation_kl.mean()), abs=1e-6)
    assert evaluation_kl.abs().max() > 0.01  # the policy did move: a KL of 0 would compare nothing
    monkeypatch.setattr(common, "precision", lambda device=None: ("fp32", "as on this CPU"))
    fp32_scores = common.get_reward(reward_model.float(), rm_tokenizer, prompts, samples.responses, 64)
    assert (fp32_scores - torch.tensor(evaluation["reward"])).abs().max() > 1e-5  # bf16 was in force above


class NeverStop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_compiled_generation_gives_the_eager_samples(monkeypatch):
    """--compile_generation (a light backend on this CPU; inductor with CUDA graphs on a GPU): prompts padded to
    one width of COMPILE_PAD, the decode step compiled; the same tokens as the eager path under the same seed and
    log-probs within 1e-5."""
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(common, "COMPILE_BACKEND", "eager")  # dynamo's graph capture without a compiler
    monkeypatch.setattr(common, "COMPILE_PAD", 16)
    monkeypatch.setattr(common, "_turn_stop", lambda tokenizer: NeverStop())  # the integer "words" begin no turn
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)).eval()

    class Tokenizer:  # whitespace-separated integers as token ids: no vocabulary files needed
        pad_token_id = eos_token_id = 299

        def __call__(self, texts, max_length, **kwargs):
            rows = [[int(t) for t in text.split()][-max_length:] for text in texts]
            width = max(map(len, rows))
            ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            return {"input_ids": ids, "attention_mask": mask}

        def batch_decode(self, ids, skip_special_tokens=True):
            return [" ".join(str(t) for t in row if t != self.pad_token_id) for row in ids.tolist()]

    tokenizer = Tokenizer()
    prompts = [" ".join(str(3 + (i * 7 + j) % 280) for j in range(n)) for i, n in enumerate((11, 5, 14))]

    def sample(compile):
        torch.manual_seed(5)
        samples = common.generate_responses(model, tokenizer, prompts, 40, 10, compile=compile)
        logprobs, _, _ = common.response_logprobs(
            model, samples.input_ids, samples.attention_mask, samples.query_ids.shape[1]
        )
        return samples, logprobs

    widths, pad_left = [], common._pad_left
    monkeypatch.setattr(common, "_pad_left", lambda enc, width, pad: widths.append(width) or pad_left(enc, width, pad))
    eager, eager_lp = sample(False)
    torch._dynamo.reset()
    compiled, compiled_lp = sample(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    (cache,) = model._kept_static_caches.values()  # one cache for 3 rows, kept for the next call
    again, again_lp = sample(True)
    assert model._kept_static_caches == {(3, 50): cache}  # emptied and reused, not made anew
    assert torch.equal(again.response_ids, compiled.response_ids) and torch.equal(again_lp, compiled_lp)
    assert widths == [16, 16]  # the compiled calls sampled from prompts padded to the next width (COMPILE_PAD 16)
    assert eager.query_ids.shape[1] == compiled.query_ids.shape[1] == 14  # and returned them without those pads
    assert torch.equal(compiled.query_ids, eager.query_ids) and torch.equal(compiled.query_mask, eager.query_mask)
    assert compiled.responses == eager.responses
    assert torch.equal(compiled.response_ids, eager.response_ids)
    torch.testing.assert_close(compiled_lp * compiled.response_mask, eager_lp * eager.response_mask, rtol=0, atol=1e-5)


@pytest.mark.parametrize("saved_fused, here_fused", [(False, True), (True, False)])
def test_a_resumed_optimizer_keeps_this_machines_fused_choice(saved_fused, here_fused):
    """A checkpoint written on a CPU (fused=False) resumed on a GPU steps fused, and the other way round; the moments
    and step counts carry over, and the next step is the one an uninterrupted optimizer takes."""

    def optimizer(fused):
        torch.manual_seed(0)
        weights = torch.nn.Parameter(torch.randn(4, 3))
        return weights, torch.optim.AdamW([weights], lr=0.1, weight_decay=0.01, fused=fused)

    def step(weights, opt):
        weights.grad = torch.arange(12.0).view(4, 3) / 10
        opt.step()

    saved_weights, saved = optimizer(saved_fused)
    step(saved_weights, saved)
    straight_weights, straight = optimizer(saved_fused)
    step(straight_weights, straight)
    step(straight_weights, straight)
    weights, resumed = optimizer(here_fused)
    with torch.no_grad():
        weights.copy_(saved_weights)
    common.load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]["fused"] is here_fused
    step(weights, resumed)
    assert float(resumed.state[weights]["step"]) == 2
    torch.testing.assert_close(weights, straight_weights, rtol=0, atol=1e-6)
