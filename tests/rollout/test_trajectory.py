"""Request-level prefix cache: an 8-turn conversation assembled from sessions equals one full request."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from mopd.core.types import Sample
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.dispatch import Dispatcher
from rollout.engine_client import EngineClient
from rollout.sglang_api import GenerateRequest
from rollout.trajectory import Trajectory

TURNS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = create_tiny_model(tmp_path_factory.mktemp("traj") / "moe", build_char_tokenizer(), arch="qwen3_moe")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rollout.hf_server", "--model-path", str(path), "--port",
                             str(port), "--host", "127.0.0.1", "--enable-return-routed-experts",
                             "--max-context-len", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, "server exited during start-up"
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


async def _conversation(url: str, prefix_cache: bool):
    tokenizer = build_char_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "start"}], tokenize=False,
                                           add_generation_prompt=True)
    sample = Sample(prompt_index=0, group_index=0, domain="agent",
                    prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"])
    dispatcher = Dispatcher([url], num_layers=2, top_k=2)
    traj = Trajectory(dispatcher, sample, {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True},
                      prefix_cache=prefix_cache, routing_replay=True)
    for turn in range(TURNS):
        await traj.generate()
        if turn < TURNS - 1:
            traj.append_observation(tokenizer(f"\nobs {turn}: ok\n", add_special_tokens=False)["input_ids"])
    sample = traj.to_sample()
    await traj.close()
    await dispatcher.close()
    return sample, traj


def test_eight_turns_with_the_cache_equal_one_full_request_and_prefill_only_new_tokens(server):
    cached, traj = asyncio.run(_conversation(server, prefix_cache=True))
    uncached, traj_full = asyncio.run(_conversation(server, prefix_cache=False))
    assert cached.response_ids == uncached.response_ids  # greedy: the same conversation either way
    tokens = cached.prompt_ids + cached.response_ids

    async def full():
        async with EngineClient(server, num_layers=2, top_k=2) as client:
            start = len(cached.prompt_ids)
            return await client.generate(GenerateRequest(
                input_ids=tokens, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                logprob_start_len=start - 1, return_routed_experts=True))

    reference = asyncio.run(full())
    mask = np.array(cached.loss_mask, dtype=bool)
    ref_lp = np.array(reference.input_logprobs[1:], dtype=np.float64)  # SGLang: none at logprob_start_len
    np.testing.assert_allclose(np.array(cached.rollout_logprobs)[mask], ref_lp[mask], atol=1e-5)
    np.testing.assert_allclose(np.array(uncached.rollout_logprobs)[mask], ref_lp[mask], atol=1e-5)
    assert cached.routed_experts.shape == (len(tokens) - 1, 2, 2)
    np.testing.assert_array_equal(cached.routed_experts, reference.routed_experts)
    np.testing.assert_array_equal(uncached.routed_experts, reference.routed_experts)
    # with the cache every token is prefilled once (plus the re-fed last output token per turn)
    assert traj.prefill_tokens <= len(tokens) + TURNS
    assert traj_full.prefill_tokens > 3 * traj.prefill_tokens
    assert cached.loss_mask.count(0) == sum(len(f"\nobs {t}: ok\n") for t in range(TURNS - 1))
