#!/usr/bin/env bash
# Sets up (./setup.sh) and runs the local MOPD dry run: mopd-train experiment=dry_run.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
case " $* " in
  *" run_dir="*) ;;
  *) set -- run_dir=outputs/dry_run "$@" ;;
esac
mopd-train experiment=dry_run "$@"
