#!/usr/bin/env bash
# The first GPU run, in one go, within 5 minutes (docs/benchmarks.md, "The GPU check"):
#   1. the tests of the scripts that train and sample, on the GPU (each script picks CUDA up by itself);
#   2. the tiny pipeline on the GPU;
#   3. the preflight at GPT-2's size: a random-init GPT2Config() with GPT-2's tokenizer, real hh-rlhf rows, the
#      seed's batch sizes and lengths; CUDA peak memory per phase and whether it fits 12 and 16 GB cards;
#   4. eager against compiled generation (benchmarks/generation.py).
# Each part has a time limit (the parts' sum is 5 minutes) and its log; gpu_check.md sums them up. On a machine
# without CUDA it says so and skips the four parts (the CPU runs them elsewhere: CI, the demo, the docs' figures).
#
# The GPU machine reaches no package registry and has no ../shared: what it lacks travels in gpu_bundle/ (git-
# ignored), made here, where the registry and ../shared are:
#   bash benchmarks/gpu_check.sh --bundle     # fills gpu_bundle/: wheels, GPT-2's tokenizer, the real rows
#   bash benchmarks/gpu_check.sh [OUT]        # there: installs gpu_bundle/wheels, writes OUT (default: $OUT, else
#                                             # runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu_bundle
SHARED=${SHARED:-../shared}
# what the GPU image lacks, or holds in another version than requirements.txt's (its torch stays: a CUDA build)
WHEELS="transformers datasets dill multiprocess openpyxl et_xmlfile trl"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # a venv's python, else the system's

if [ "${1:-}" = "--bundle" ]; then
    set -e
    PY=${RLHF_VENV:-.venv}/bin/python
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels"
    for name in $WHEELS; do
        version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$BUNDLE/wheels" "$name==$version"
    done
    cp -r "$SHARED/gpt2-tokenizer" "$BUNDLE/gpt2-tokenizer"
    cp "$SHARED/hh-rlhf-sample/harmless-base-test-first1812.jsonl.gz" "$BUNDLE/hh-rlhf.jsonl.gz"
    du -sh "$BUNDLE"
    echo "next: the device tool's run with carry [\"$BUNDLE\"] and command \"bash benchmarks/gpu_check.sh\""
    exit 0
fi

OUT_DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/gpu_check.md"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
BUNDLED="no gpu_bundle/ (run --bundle where ../shared and the package index are)"
if [ -d "$BUNDLE/wheels" ]; then
    if [ "$("$PYTHON" -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2> /dev/null)" != True ]; then
        BUNDLED="gpu_bundle/'s wheels are for Python 3.12, not this one: not installed"
    elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$BUNDLE"/wheels/*.whl; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        BUNDLED="installed: $(cd "$BUNDLE/wheels" && ls -- *.whl | cut -d- -f1,2 | tr '\n' ' ')"
    else
        BUNDLED="gpu_bundle/'s wheels failed to install: the image's own packages are used"
    fi
fi

if ! "$PYTHON" -c "import torch, transformers" 2> /dev/null; then
    echo "error: $PYTHON cannot import torch and transformers: activate the environment or set PYTHON=" >&2
    exit 1
fi
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    "$PYTHON" - <<'EOF'
import torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, GPU: {gpu}")
EOF
    echo
    echo "wheels: $BUNDLED"
    echo
    echo "| part | result | seconds |"
    echo "| --- | --- | --- |"
} > "$SUMMARY"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for part in tests tiny_pipeline preflight generation; do
        echo "| $part | skipped: no CUDA on this machine | |" >> "$SUMMARY"
    done
    cat "$SUMMARY"
    echo "no CUDA here: the four GPU parts were skipped ($SUMMARY)"
    exit 0
fi

part() {  # part NAME LIMIT_S COMMAND...: run it with a time limit, log to OUT/NAME.log, one summary row
    local name=$1 limit=$2 start rc result
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) result=passed ;;
        124) result="stopped at its ${limit} s limit" ;;
        *) result="failed (exit $rc): $(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-150)" ;;
    esac
    echo "| $name | $result | $(($(date +%s) - start)) |" >> "$SUMMARY"
    echo "$name: $result"
}

TOKENIZER="$BUNDLE/gpt2-tokenizer"
ROWS="$BUNDLE/hh-rlhf.jsonl.gz"
part tests 45 "$PYTHON" -m pytest -q -n 8 -m "not slow" -p no:cacheprovider tests/test_common.py \
    tests/test_ppo.py tests/test_grpo.py tests/test_dpo.py tests/test_reward_model.py
part tiny_pipeline 70 bash run_pipeline.sh --preset tiny --work_dir "$WORK/tiny"
part preflight 120 "$PYTHON" benchmarks/preflight.py --random_init "$TOKENIZER" --dataset "$ROWS" --steps 3 \
    --eval_prompts 32 --project_to hh-rlhf --work_dir "$WORK/preflight"
part generation 65 "$PYTHON" benchmarks/generation.py --random_init "$TOKENIZER" --dataset "$ROWS" \
    --work_dir "$WORK/generation" --out "$OUT_DIR/generation.json"
{
    echo
    grep -A 12 "^| phase" "$OUT_DIR/preflight.log" || true
    echo
    grep -A 3 "^| path" "$OUT_DIR/generation.log" || true
    grep "^compiled / eager" "$OUT_DIR/generation.log" || true
    if [ -f "$WORK/tiny/rlhf_eval_results_with_base.xlsx" ]; then
        echo
        "$PYTHON" -c "import pandas as pd; d = pd.read_excel('$WORK/tiny/rlhf_eval_results_with_base.xlsx', \
sheet_name='summary'); print(d[['model', 'reward_mean', 'gold_mean', 'kl_mean', 'train_peak_mb']].round(3).to_string(index=False))" || true
    fi
} >> "$SUMMARY"
cp "$WORK/preflight/preflight.json" "$OUT_DIR/" 2>/dev/null || true
cat "$SUMMARY"
