"""Engine actors, the rollout manager, teacher scoring and failover against real local servers under Ray."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.types import Sample
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher
from rollout.engine_client import EngineClient, EngineError
from rollout.engines import launch_engines
from rollout.rollout_manager import RolloutManager
from rollout.sglang_api import GenerateRequest
from rollout.teacher_scoring import score_samples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(create_tiny_model(tmp_path_factory.mktemp("rm") / "moe", build_char_tokenizer(), arch="qwen3_moe"))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg():
    return RolloutConfig(num_engines=2, cpus_per_engine=0.5, max_new_tokens=8, max_context_len=128,
                         temperature=1.0, max_retries=2, request_timeout_s=60)


@pytest.fixture(scope="module")
def engines(cluster, model_dir, cfg):
    group = launch_engines(model_dir, cfg, name="rm-test", routing_replay=True)
    yield group
    group.shutdown()


def _samples(tokenizer, n: int) -> list[Sample]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{i}+{i}="}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(Sample(prompt_index=i, group_index=i // 2, domain="arith", prompt_ids=ids))
    return out


def test_generate_fills_every_sample_with_logprobs_and_routing(engines, cfg, model_dir):
    tokenizer = build_char_tokenizer()
    manager = RolloutManager(engines.urls, cfg, eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer,
                             model_path=model_dir, engines=engines)
    asyncio.run(manager.check_engines())
    samples = asyncio.run(manager.generate(_samples(tokenizer, 6)))
    for s in samples:
        n = len(s.response_ids)
        assert 1 <= n <= cfg.max_new_tokens and s.finish_reason in ("stop", "length")
        assert len(s.rollout_logprobs) == n and all(lp <= 0 for lp in s.rollout_logprobs)
        assert s.loss_mask == [1] * n and s.weight_versions == [int(s.weight_versions[0])] * n
        assert s.routed_experts.shape == (len(s.prompt_ids) + n - 1, 2, 2)
        assert s.routed_experts[:, 0].max() == 0  # layer 0 is dense
        assert s.routed_experts[:, 1].max() < 4
        assert s.response_text == tokenizer.decode(s.response_ids)


def test_teacher_scores_equal_a_direct_hf_forward(engines, cfg, model_dir):
    tokenizer = build_char_tokenizer()
    samples = _samples(tokenizer, 3)
    for s, resp in zip(samples, ("12<|im_end|>", "ab", "7")):
        s.response_ids = tokenizer(resp, add_special_tokens=False)["input_ids"]
    scores = asyncio.run(score_samples(engines.urls, samples))
    top = asyncio.run(score_samples(engines.urls, samples, top_k=3))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for s, got, got_top in zip(samples, scores, top):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(s.prompt_ids)
        want = [logp[p - 1 + t, tok].item() for t, tok in enumerate(s.response_ids)]
        np.testing.assert_allclose(got.logprobs, want, atol=1e-4)
        assert got.top_ids is None and got_top.logprobs == got.logprobs
        want_lp, want_ids = torch.topk(logp[p - 1:p - 1 + len(s.response_ids)], 3)
        assert got_top.top_ids == want_ids.tolist()
        np.testing.assert_allclose(got_top.top_logprobs, want_lp.numpy(), atol=1e-4)


def test_routing_replay_without_engine_support_fails_at_start_up(cluster, model_dir, cfg):
    group = launch_engines(model_dir, cfg, name="no-r3", num_engines=1, routing_replay=False)
    try:
        manager = RolloutManager(group.urls, cfg, eos_token_id=2, model_path=model_dir)
        with pytest.raises(RuntimeError, match="--enable-return-routed-experts"):
            asyncio.run(manager.check_engines())
    finally:
        group.shutdown()


def test_bad_requests_fail_with_the_reason_and_are_not_retried(engines):
    async def go():
        async with EngineClient(engines.urls[0]) as client:
            with pytest.raises(EngineError, match="400"):
                await client.generate(GenerateRequest(input_ids=list(range(5, 100)) * 2,
                                                      sampling_params={"max_new_tokens": 4}))
            with pytest.raises(EngineError, match="400"):
                await client.request("POST", "/generate", {"input_ids": [], "sampling_params": {}})
            with pytest.raises(EngineError, match="400"):
                await client.request("POST", "/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 2}})
        async with EngineClient("http://127.0.0.1:9", max_retries=1, timeout_s=5) as dead:
            with pytest.raises(EngineError, match="cannot connect"):
                await dead.model_info()
    asyncio.run(go())


def test_a_server_killed_mid_request_loses_and_duplicates_nothing(engines, cfg, model_dir):
    tokenizer = build_char_tokenizer()
    long_cfg = RolloutConfig(**{**cfg.__dict__, "max_new_tokens": 64})
    manager = RolloutManager(engines.urls, long_cfg, eos_token_id=None, tokenizer=tokenizer,
                             model_path=model_dir, engines=engines)
    victim = ray.get(engines.actors[0].pid.remote())

    async def go():
        task = asyncio.create_task(manager.generate(_samples(tokenizer, 24)))
        # kill as soon as the victim holds requests (a fixed sleep raced a fast machine)
        for _ in range(2000):
            live = manager._live
            if live is not None and live.in_flight[0] > 0:
                break
            await asyncio.sleep(0.005)
        assert not task.done(), "generation finished before the kill: make it longer"
        os.kill(victim, signal.SIGKILL)
        return await task

    samples = asyncio.run(go())
    assert manager.failovers > 0  # some requests were in flight on the killed server
    assert len(samples) == 24 and all(
        1 <= len(s.response_ids) <= 64 and s.finish_reason in ("stop", "length") for s in samples)
    assert sorted(s.prompt_index for s in samples) == list(range(24))
    time.sleep(0.5)  # let the kernel reap the killed server
    # the next step restarts the dead server at the same URL
    urls = engines.ensure_alive()
    assert urls == manager.urls and ray.get(engines.actors[0].pid.remote()) != victim
    assert asyncio.run(EngineClient(urls[0]).health())


def test_dispatch_prefers_the_least_loaded_engine_and_sticks_to_a_trajectory():
    d = Dispatcher(["http://a", "http://b", "http://c"])
    d.in_flight = [2, 0, 1]
    assert d.pick() == 1
    assert d.pick("traj") == 1
    d.in_flight = [0, 5, 0]
    assert d.pick("traj") == 1 and d.pick() == 0
    d.failed = [True, False, False]
    assert d.pick() == 2
