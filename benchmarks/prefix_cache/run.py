"""Multi-turn episodes with the request-level prefix cache on and off, against the same local engine.

    python benchmarks/prefix_cache/run.py --episodes 8 --turns 8

Both modes run the same greedy conversations (growing context: each turn adds an observation and
a model reply) interleaved episode by episode on one server, and the script prints prefill tokens
computed and wall time, with the ratio off/on.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mopd.core.types import Sample
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.dispatch import Dispatcher
from rollout.trajectory import Trajectory


def start_server(model: Path, max_context: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rollout.hf_server", "--model-path", str(model), "--port",
                             str(port), "--host", "127.0.0.1", "--enable-return-routed-experts",
                             "--max-context-len", str(max_context)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def episode(url: str, episode_id: int, turns: int, obs_len: int, reply_len: int, cache: bool
                  ) -> tuple[int, float]:
    tokenizer = build_char_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"task {episode_id}: fix the bug"}],
                                           tokenize=False, add_generation_prompt=True)
    sample = Sample(prompt_index=episode_id, group_index=episode_id, domain="agent",
                    prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"])
    dispatcher = Dispatcher([url], num_layers=2, top_k=2)
    traj = Trajectory(dispatcher, sample, {"max_new_tokens": reply_len, "temperature": 0.0, "ignore_eos": True},
                      prefix_cache=cache, routing_replay=True)
    start = time.perf_counter()
    for turn in range(turns):
        await traj.generate()
        if turn < turns - 1:
            obs = (f"\n$ pytest -q  # turn {turn}\n" + "." * obs_len)[: obs_len]
            traj.append_observation(tokenizer(obs, add_special_tokens=False)["input_ids"])
    elapsed = time.perf_counter() - start
    await traj.close()
    await dispatcher.close()
    return traj.prefill_tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--obs-len", type=int, default=48)
    parser.add_argument("--reply-len", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = create_tiny_model(Path(tmp) / "moe", build_char_tokenizer(), arch="qwen3_moe")
        context = 64 + args.turns * (args.obs_len + args.reply_len) + 64
        proc, url = start_server(model, context)
        try:
            totals = {True: [0, 0.0], False: [0, 0.0]}
            for ep in range(args.episodes):
                for cache in (True, False):  # interleaved: both modes see the same machine load
                    tokens, seconds = asyncio.run(episode(url, ep, args.turns, args.obs_len, args.reply_len, cache))
                    totals[cache][0] += tokens
                    totals[cache][1] += seconds
        finally:
            proc.terminate()
            proc.wait()
    on, off = totals[True], totals[False]
    print(f"episodes={args.episodes} turns={args.turns} obs_len={args.obs_len} reply_len={args.reply_len}")
    print(f"{'mode':<14}{'prefill tokens':>16}{'wall s':>10}")
    print(f"{'cache on':<14}{on[0]:>16}{on[1]:>10.2f}")
    print(f"{'cache off':<14}{off[0]:>16}{off[1]:>10.2f}")
    print(f"ratio off/on: prefill tokens {off[0] / max(on[0], 1):.2f}x, wall time {off[1] / max(on[1], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
