"""Does the MTP draft keep up with a moving policy? Acceptance length of the toy MiMo student's checkpoints
over an RL (MOPD) run, with and without the MTP loss (`trainer.mtp_loss_coef`).

    python benchmarks/mtp/rl_acceptance.py --steps 50 --out benchmarks/mtp/rl_acceptance.json

The student is built as in run.py (toy MiMo-V2-Flash, base warm-up, MTP heads trained on its own samples)
and trained with `mopd-train experiment=dry_run student=hf student.model_path=<it>` (the toy world's
Qwen3-MoE teachers share its tokenizer), once with trainer.mtp_loss_coef=0 and once with 0.5; each
saved checkpoint (HF export, MTP layers included) is then served by a local server with K = 3 MTP
draft tokens and sampled at the rollout temperature on fixed toy prompts. Measuring offline on the
checkpoints needs no speculative flag in the engine launcher; the same numbers come from
`rollout/spec_accept_len` once the engines run with rollout.speculative_num_steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.mtp.run import build_student, prompts
from rollout.speculative import cli_args
from tests.rollout.conftest import ServerProc

DOMAINS = ("arith", "reverse")


def acceptance(path: Path, pool: list[list[int]], temperature: float) -> float:
    srv = ServerProc(path, "--max-context-len", "256", "--max-batch-size", "8", *cli_args(3))
    try:
        srv.wait_ready(timeout=300)
        bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": 12, "temperature": temperature,
                                                       "sampling_seed": i}} for i, p in enumerate(pool)]
        with ThreadPoolExecutor(8) as ex:
            replies = list(ex.map(srv.generate, bodies))
    finally:
        srv.stop()
    tokens = sum(len(r["output_ids"]) for r in replies)
    verify = sum(r["meta_info"].get("spec_verify_ct", 0) for r in replies)
    return tokens / max(verify, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--coefs", default="0.5,0")
    ap.add_argument("--lr", type=float, default=None, help="trainer.lr (dry_run's 1e-2 when not given)")
    ap.add_argument("--out", default="benchmarks/mtp/rl_acceptance.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mtp_rl_"))
    torch.set_num_threads(1)  # building the tiny student: more threads only wait on each other on shared cores
    student = build_student(root, DOMAINS, base_steps=100, mtp_steps=200, new_tokens=16)
    pool = prompts(DOMAINS, 24)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args), "runs": {}}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    for coef in [float(c) for c in args.coefs.split(",")]:
        run_dir = root / f"run_coef{coef:g}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "mopd.train", "experiment=dry_run", "student=hf",
                               f"student.model_path={student}", f"trainer.mtp_loss_coef={coef}",
                               f"num_steps={args.steps}", f"save_interval={args.every}", "toy.teacher_steps=60",
                               "logger.progress=false", f"toy.dir={root / 'toy'}", f"run_dir={run_dir}",
                               *([f"trainer.lr={args.lr}"] if args.lr is not None else [])],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"mopd.train failed (coef {coef}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        points = {0: acceptance(student, pool, 1.0)}
        for step in range(args.every, args.steps + 1, args.every):
            points[step] = acceptance(run_dir / "checkpoints" / f"step_{step}" / "hf", pool, 1.0)
        result["runs"][f"mtp_loss_coef={coef:g}"] = {"acceptance_by_step": points, "train_s": round(time.time() - t0)}
        print(coef, points, flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
