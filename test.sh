#!/usr/bin/env bash
# Sets up (./setup.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
./setup_sglang.sh  # .venv-sglang: the real sglang package for tests/contract (in CI its absence fails the suite)
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
