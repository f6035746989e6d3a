#!/usr/bin/env bash
# The project's Python environment, created or reused: sourced by demo.sh and test.sh.
#
# A virtual environment in .venv (RLHF_VENV names another), with torch 2.13.0 unless a torch is installed there
# already (a CUDA build you installed stays), then requirements-dev.txt (the pins of requirements.txt, pytest,
# ruff, TRL). It installs only when a requirements file changed since its last install, and says what it does.
# TORCH_INDEX_URL picks torch's wheel index (e.g. https://download.pytorch.org/whl/cpu for the small CPU build on
# Linux, where pip's default torch is a CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${RLHF_VENV:-.venv}
TORCH_VERSION=2.13.0
PYTHON3=${PYTHON3:-python3}

# A folder without activate or pip is a venv whose creation failed (Debian without python3-venv): made anew.
if ! { [ -f "$VENV/bin/activate" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }; then
  "$PYTHON3" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "error: $PYTHON3 is $("$PYTHON3" --version 2>&1); this project needs Python 3.11 or newer" >&2; exit 1; }
  echo "setup: creating the virtual environment $VENV ($("$PYTHON3" --version 2>&1))"
  "$PYTHON3" -m venv --clear "$VENV" ||
    { echo "error: $PYTHON3 -m venv failed (on Debian and Ubuntu: apt install python3-venv)" >&2; exit 1; }
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.rlhf-requirements"
wanted=$(cat requirements.txt requirements-gguf.txt requirements-dev.txt | cksum)  # POSIX: Linux and macOS alike
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  if torch_now=$(python -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "setup: torch $torch_now is installed in $VENV: kept"
  else
    echo "setup: installing torch==$TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    python -m pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
  echo "setup: installing requirements-dev.txt (requirements.txt's pins, pytest, ruff, TRL, the trackers)"
  python -m pip install -q -r requirements-dev.txt
  echo "$wanted" >"$stamp"
  echo "setup: $VENV is ready (torch $(python -c 'import torch; print(torch.__version__)'))"
else
  echo "setup: $VENV is up to date with requirements*.txt"
fi
