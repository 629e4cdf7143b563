"""MTP self-speculative decoding on the toy MiMo student: decode tokens/s and acceptance length with and
without speculation (K = 1, 2, 3 draft tokens), batch sizes 1 and 8, side by side in one run.

    python benchmarks/mtp/run.py --out benchmarks/mtp/results.json

Builds the toy MiMo-V2-Flash student (6 layers, 3 MTP layers) the way the toy world does: random init,
a base warm-up SFT on the long-answer domains, then the MTP heads trained on the student's own samples
(mopd.toy.mtp.train_toy_mtp). Starts one local server per K (K = 0 is the plain baseline) and
interleaves the measurements round by round (K order rotated each round), so a noisy shared machine
hits every setting alike; the table reports ratios against the baseline of the same batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from envs.toy_tasks import make_examples
from mopd.toy.models import create_tiny_model
from mopd.toy.mtp import train_toy_mtp
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.toy.world import ToyWorldSpec, sft
from rollout.speculative import cli_args
from tests.rollout.conftest import ServerProc


def build_student(root: Path, domains: tuple[str, ...], base_steps: int, mtp_steps: int, new_tokens: int) -> Path:
    tok = build_char_tokenizer()
    path = create_tiny_model(root / "student", tok, arch="mimo_v2_flash", hidden_size=64, num_layers=6)
    spec = ToyWorldSpec(domains=domains, arch="mimo_v2_flash", num_layers=6)
    if base_steps:
        sft(path, path, domains, base_steps, spec, seed=2)
    losses = train_toy_mtp(path, domains, steps=mtp_steps, new_tokens=new_tokens)
    print(f"MTP KL {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f} (mean of the last 20 steps)",
          flush=True)
    return path


def prompts(domains: tuple[str, ...], n: int) -> list[list[int]]:
    tok = build_char_tokenizer()
    out = []
    for d in domains:
        for row in make_examples(d, n, seed=4242):
            text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(srv: ServerProc, batch: list[list[int]], max_new: int, temperature: float) -> dict:
    bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": max_new, "temperature": temperature,
                                                   "ignore_eos": False}} for p in batch]
    cpu0, t0 = cpu_seconds(srv.proc.pid), time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(srv.generate, bodies))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(srv.proc.pid) - cpu0
    tokens = sum(len(r["output_ids"]) for r in replies)
    verify = sum(r["meta_info"].get("spec_verify_ct", 0) for r in replies)
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "verify_ct": verify, "requests": len(replies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/mtp/results.json")
    ap.add_argument("--domains", default="shift,rot")
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--mtp-steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--student", default=None, help="reuse a student built by an earlier run")
    args = ap.parse_args()
    domains = tuple(args.domains.split(","))
    load_start = os.getloadavg()
    torch.set_num_threads(1)  # building the tiny student: more threads only wait on each other on shared cores
    root = Path(tempfile.mkdtemp(prefix="mtp_bench_"))
    student = Path(args.student) if args.student else build_student(root, domains, args.base_steps, args.mtp_steps,
                                                                               args.max_new_tokens)
    print(f"student: {student}", flush=True)
    pool = prompts(domains, 16)
    ks = [0, 1, 2, 3]
    servers = {k: ServerProc(student, "--max-context-len", "256", "--max-batch-size", "8", *cli_args(k)) for k in ks}
    rows: dict[str, dict] = {}
    per_round: dict[str, list[float]] = {}  # tokens/s per round: ratios are taken within a round
    try:
        for s in servers.values():
            s.wait_ready(timeout=300)
        for srv in servers.values():  # warm-up
            measure(srv, pool[:2], 8, 0.0)
        for r in range(args.rounds):
            order = ks[r % len(ks):] + ks[:r % len(ks)]
            for temp in [float(t) for t in args.temperatures.split(",")]:
                for bs in (1, 8):
                    batch = [pool[(r * 8 + i) % len(pool)] for i in range(bs)]
                    for k in order:
                        m = measure(servers[k], batch, args.max_new_tokens, temp)
                        key = f"T={temp:g} bs={bs} K={k}"
                        acc = rows.setdefault(key, {"wall_s": 0.0, "cpu_s": 0.0, "tokens": 0, "verify_ct": 0,
                                                    "requests": 0})
                        for f in acc:
                            acc[f] += m[f]
                        per_round.setdefault(key, []).append(m["tokens"] / m["wall_s"])
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    table = []
    for key, acc in rows.items():
        temp, bs, k = key.split()
        base = rows[f"{temp} {bs} K=0"]
        tps = acc["tokens"] / acc["wall_s"]
        # the server's own CPU seconds: insensitive to other processes taking turns on the cores
        cpu_ratio = (acc["tokens"] / acc["cpu_s"]) / (base["tokens"] / base["cpu_s"])
        ratios = [a / b for a, b in zip(per_round[key], per_round[f"{temp} {bs} K=0"])]
        table.append({"setting": key, "tokens_per_s": round(tps, 1),
                      "speedup": round(tps / (base["tokens"] / base["wall_s"]), 3),
                      "speedup_median_of_rounds": round(statistics.median(ratios), 3),
                      "speedup_rounds_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                      "speedup_per_server_cpu_s": round(cpu_ratio, 3),
                      # SGLang's spec_accept_length: completion tokens / verify forwards (first token from prefill)
                      "accept_length": round(acc["tokens"] / acc["verify_ct"], 3) if acc["verify_ct"] else None,
                      # tokens per verify forward, the prefill token excluded
                      "tokens_per_verify": (round((acc["tokens"] - acc["requests"]) / acc["verify_ct"], 3)
                                            if acc["verify_ct"] else None)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "load_average_start_end": [load_start, os.getloadavg()],
                                          "args": vars(args), "table": table}, indent=2))
    for row in table:
        print(row)


if __name__ == "__main__":
    main()
