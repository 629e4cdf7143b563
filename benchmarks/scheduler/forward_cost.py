"""What one forward of the local CPU engine costs when a new request joins a batch of decodes.

    python benchmarks/scheduler/forward_cost.py --model outputs/scheduler/world/student

The local server (rollout/hf_server_model.py: ModelRunner.step) runs a batch as one padded forward: every
request is padded to the longest new input of the step. Batch mode prefills all of a step's prompts in one
forward and then only decodes; a sequence scheduler refills as sequences finish, so a prompt's prefill joins
running decodes again and again, and each such forward is as wide as that prompt for every request. This
times, interleaved and repeated (median): 1, 8 and B decodes (how a forward's cost grows with its batch on
CPU); B-1 decodes plus one prefill of P tokens in the same forward; and the same work split into a decode
forward and a prefill forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from rollout.hf_server_model import ModelRunner, StepInput


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "outputs" / "scheduler" / "world" / "student")
    p.add_argument("--batch", type=int, default=64, help="requests decoding together (B)")
    p.add_argument("--context", type=int, default=40, help="tokens already in each decoding request's cache")
    p.add_argument("--prefill", type=int, default=50, help="prompt tokens of the request that joins (P)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runner = ModelRunner.load(str(args.model), capture_routing=True)
    prompt = [10 + i % 60 for i in range(args.context)]
    first = [runner.step([StepInput(kv=None, kv_len=0, new_ids=prompt)])[0] for _ in range(args.batch)]
    decodes = [StepInput(kv=o.kv, kv_len=args.context, new_ids=[12]) for o in first]
    joining = StepInput(kv=None, kv_len=0, new_ids=[10 + i % 60 for i in range(args.prefill)])
    cases: dict[str, Callable[[], object]] = {
        "1 decode": lambda: runner.step(decodes[:1]),
        "8 decodes": lambda: runner.step(decodes[:8]),
        f"{args.batch} decodes": lambda: runner.step(decodes),
        f"{args.batch - 1} decodes + 1 prefill of {args.prefill}, one padded forward":
            lambda: runner.step([*decodes[:-1], joining]),
        f"{args.batch - 1} decodes, then the prefill alone (two forwards)":
            lambda: (runner.step(decodes[:-1]), runner.step([joining])),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed_ms(fn))
    result = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ms in result.items():
        print(f"{ms:8.1f} ms  {name}")
    return result


if __name__ == "__main__":
    main()
