"""What one forward of the local CPU engine costs at batch sizes, and when a new request joins decodes.

    python benchmarks/scheduler/forward_cost.py --model outputs/scheduler/world/student
    python benchmarks/scheduler/forward_cost.py --against /tmp/old_tree     # old code vs this tree, interleaved

The local server (rollout/hf_server_model.py: ModelRunner.step) runs a batch as one padded forward. Every
case is a chain, as the scheduler runs it: each step feeds the previous step's caches (StepOutput.kv) and one
new token per decoding request, so the contexts grow by one token a step (from --context). Timed,
interleaved and repeated (median): 1, 8 and B decodes (how a forward's cost grows with its batch on CPU);
B-1 decodes plus one prefill of P tokens in the same forward; the same work split into a decode forward and
a prefill forward; and B-1 decodes joined by one request prefilled in a forward of its own just before
(the sequence scheduler's steady state: rows of two steps' caches in one forward).

`--against DIR` runs this script on the code of DIR (e.g. a `git worktree` of an older commit) and on this
tree in alternating subprocesses, `--rounds` times each, and prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


class Chain:
    """Requests decoding step after step: each step feeds the caches the last one returned."""

    def __init__(self, runner: Any, step_input: Any, outs: list[Any], kv_len: int) -> None:
        self.runner, self.step_input = runner, step_input
        self.inputs = [step_input(kv=o.kv, kv_len=kv_len, new_ids=[12]) for o in outs]

    def step(self, extra: list[Any] = ()) -> list[Any]:  # type: ignore[assignment]
        outs = self.runner.step([*self.inputs, *extra])
        self.inputs = [self.step_input(kv=o.kv, kv_len=x.kv_len + 1, new_ids=[12]) for x, o in zip(self.inputs, outs)]
        return outs


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Every case's times in ms on the code under args.code."""
    sys.path.insert(0, str(args.code))
    from rollout.hf_server_model import ModelRunner, StepInput

    torch.set_num_threads(1)
    runner = ModelRunner.load(str(args.model), capture_routing=True)
    prompt = [10 + i % 60 for i in range(args.context)]
    joining = [10 + i % 60 for i in range(args.prefill)]
    b = args.batch

    def chain(n: int) -> Chain:
        outs = runner.step([StepInput(kv=None, kv_len=0, new_ids=prompt) for _ in range(n)])
        return Chain(runner, StepInput, outs, args.context)

    chains = {n: chain(n) for n in (1, 8, b, b - 1)}
    padded, split, joined = chain(b - 1), chain(b - 1), chain(b - 1)

    def join_prefilled() -> None:
        first = runner.step([StepInput(kv=None, kv_len=0, new_ids=joining)])[0]  # its own forward, untimed
        late = StepInput(kv=first.kv, kv_len=len(joining), new_ids=[12])
        start = time.perf_counter()
        joined.step([late])
        times[f"{b - 1} decodes + 1 request prefilled the step before"].append(1000 * (time.perf_counter() - start))

    cases: dict[str, Callable[[], object]] = {
        "1 decode": lambda: chains[1].step(),
        "8 decodes": lambda: chains[8].step(),
        f"{b} decodes": lambda: chains[b].step(),
        f"{b - 1} decodes + 1 prefill of {args.prefill}, one padded forward":
            lambda: padded.step([StepInput(kv=None, kv_len=0, new_ids=joining)]),
        f"{b - 1} decodes, then the prefill alone (two forwards)":
            lambda: (split.step(), runner.step([StepInput(kv=None, kv_len=0, new_ids=joining)])),
    }
    times: dict[str, list[float]] = {name: [] for name in [*cases, f"{b - 1} decodes + 1 request prefilled the step before"]}
    for fn in cases.values():
        fn()  # warm-up
    join_prefilled()
    times[f"{b - 1} decodes + 1 request prefilled the step before"].clear()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed_ms(fn))
        join_prefilled()
    return times


def compare(args: argparse.Namespace, argv: list[str]) -> dict[str, tuple[float, float]]:
    """Old tree and this tree in alternating subprocesses; medians over all rounds."""
    runs: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for label, code in (("old", args.against), ("new", REPO)):
            out = subprocess.run([sys.executable, __file__, *argv, "--code", str(code), "--json"], check=True,
                                 capture_output=True, text=True).stdout
            for name, ts in json.loads(out.strip().splitlines()[-1]).items():
                runs[label].setdefault(name, []).extend(ts)
    result = {name: (statistics.median(runs["old"][name]), statistics.median(runs["new"][name]))
              for name in runs["new"]}
    print("| one engine step | old ms | new ms | old / new |\n|---|---:|---:|---:|")
    for name, (old, new) in result.items():
        print(f"| {name} | {old:.1f} | {new:.1f} | {old / new:.2f}x |")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "outputs" / "scheduler" / "world" / "student")
    p.add_argument("--batch", type=int, default=64, help="requests decoding together (B)")
    p.add_argument("--context", type=int, default=40, help="tokens in each decoding request's cache at the start")
    p.add_argument("--prefill", type=int, default=50, help="prompt tokens of the request that joins (P)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--code", type=Path, default=REPO, help="repository whose rollout/ code is measured")
    p.add_argument("--json", action="store_true", help="print every case's times as one JSON line")
    p.add_argument("--against", type=Path, default=None, help="a tree with older code to compare with")
    p.add_argument("--rounds", type=int, default=3, help="alternating subprocess runs per tree (--against)")
    args = p.parse_args(argv)
    if args.against is not None:
        passed = list(sys.argv[1:] if argv is None else argv)
        drop = {"--against", "--rounds"}
        kept = [a for i, a in enumerate(passed) if a not in drop and (i == 0 or passed[i - 1] not in drop)]
        return compare(args, kept)
    times = measure(args)
    if args.json:
        print(json.dumps(times))
        return times
    result = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ms in result.items():
        print(f"{ms:8.1f} ms  {name}")
    return result


if __name__ == "__main__":
    main()
