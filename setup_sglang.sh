#!/usr/bin/env bash
# Creates .venv-sglang with the real `sglang` package, for the contract suite (tests/contract/):
# mopd's recorded request bodies are checked against SGLang's own request classes and validation.
# Separate from .venv because sglang pins its own torch/transformers versions.
#
# sglang 0.5.23 pins torch==2.14.1 (it refuses the 2.13.0 CPU build .venv uses), so that torch goes in
# first: on the dev/CI machines it lies on local disk, so pip does not download it. No GPU is needed:
# the suite imports the request classes and runs their CPU-side validation only.
# Idempotent: returns at once when the pinned version already imports.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
VENV=.venv-sglang

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$SGLANG_VERSION" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(0 if version("sglang") == sys.argv[1] else 1)
EOF
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.14.1
"$VENV/bin/python" -m pip install -q "sglang==$SGLANG_VERSION"
"$VENV/bin/python" -c "import sglang, sglang.srt.sampling.sampling_params; print('sglang', sglang.__version__, 'in $VENV')"
