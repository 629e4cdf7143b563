"""Engine actors, the rollout manager, teacher scoring and failover against real local servers under Ray."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from mopd.core.types import Sample
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from mopd.teachers import EngineTeacher, TeacherRouter, TeacherSet
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher, EngineUnavailable
from rollout.engine_client import EngineClient, EngineError
from rollout.engines import launch_engines
from rollout.rollout_manager import RolloutManager
from rollout.sglang_api import GenerateRequest
from rollout.teacher_scoring import score_samples
from tests.rollout.conftest import free_port


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



def test_a_sharpened_teacher_scores_as_its_tempered_softmax_through_real_engines(engines, cfg, model_dir):
    """algo.teacher_temperature: the engine's untempered prompt logprobs and top tokens give pi^(1/tau) / Z."""
    tokenizer = build_char_tokenizer()
    samples = _samples(tokenizer, 2)
    for s, resp in zip(samples, ("12<|im_end|>", "ab")):
        s.domain, s.response_ids = "arith", tokenizer(resp, add_special_tokens=False)["input_ids"]
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    teacher = EngineTeacher("t", cfg, list(engines.urls))
    teachers = TeacherSet({"t": teacher}, TeacherRouter({"arith": "t"}), temperature=0.5, temperature_support=vocab)
    asyncio.run(teachers.score(samples, top_k=3))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for s in samples:
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0].float()
        p, n = len(s.prompt_ids), len(s.response_ids)
        sharp = torch.log_softmax(logits[p - 1:p - 1 + n] / 0.5, -1)
        np.testing.assert_allclose(s.teacher_logprobs, [sharp[t, tok].item() for t, tok in enumerate(s.response_ids)],
                                   atol=2e-4)
        want_lp, want_ids = torch.topk(sharp, 3)
        assert s.teacher_top_ids == want_ids.tolist()
        np.testing.assert_allclose(s.teacher_top_logprobs, want_lp.numpy(), atol=2e-4)

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
        # kill as soon as the victim runs requests (a fixed sleep raced a fast machine); those must fail over
        async with EngineClient(engines.urls[0], max_retries=0) as probe:
            for _ in range(2000):
                if _running_requests(await probe.request("GET", "/metrics")) > 0:
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("the victim never ran a request")
        assert not task.done(), "generation finished before the kill: make it longer"
        os.kill(victim, signal.SIGKILL)
        return await task

    samples = asyncio.run(go())
    assert len(samples) == 24 and all(
        1 <= len(s.response_ids) <= 64 and s.finish_reason in ("stop", "length") for s in samples)
    assert sorted(s.prompt_index for s in samples) == list(range(24))
    time.sleep(0.5)  # let the kernel reap the killed server
    # the next step restarts the dead server at the same URL
    urls = engines.ensure_alive()
    assert urls == manager.urls and ray.get(engines.actors[0].pid.remote()) != victim
    assert asyncio.run(EngineClient(urls[0]).health())


def _running_requests(metrics: str) -> int:
    """hf_server_num_running_reqs from the local server's /metrics (Prometheus text)."""
    line = next(x for x in metrics.splitlines() if x.startswith("hf_server_num_running_reqs "))
    return int(line.split()[1])


def test_dispatch_prefers_the_least_loaded_engine_and_sticks_to_a_trajectory():
    d = Dispatcher(["http://a", "http://b", "http://c"])
    d.in_flight = [2, 0, 1]
    assert d.pick() == 1
    assert d.pick("traj") == 1
    d.in_flight = [0, 5, 0]
    assert d.pick("traj") == 1 and d.pick() == 0
    d.failed = [True, False, False]
    assert d.pick() == 2


# --- bounded retries (issue 11): misbehaving engines are real HTTP servers on loopback ----------------------

GOOD_ANSWER = {"text": "", "output_ids": [5], "meta_info": {"finish_reason": {"type": "length"},
                                                            "output_token_logprobs": [[-0.5, 5, None]],
                                                            "weight_version": "0"}}


class FaultyEngine:
    """An HTTP server on loopback that answers /health and, on /generate, whatever `answer` says; counts requests."""

    def __init__(self, answer, port: int | None = None) -> None:
        self.answer, self.port = answer, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.generate_requests = 0
        self.runner = None

    async def start(self) -> FaultyEngine:
        from aiohttp import web

        async def generate(request):
            self.generate_requests += 1
            status, body = self.answer(await request.json())
            return web.Response(status=status, text=body if isinstance(body, str) else json.dumps(body),
                                content_type="application/json")

        async def health(_):
            return web.Response(text="")

        app = web.Application()
        app.router.add_post("/generate", generate)
        app.router.add_get("/health", health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


def _probe() -> GenerateRequest:
    return GenerateRequest(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1}, return_logprob=True)


def test_all_engines_dead_is_a_clear_error_within_the_retry_window_not_a_hang():
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]

    async def go():
        d = Dispatcher(dead, max_retries=50, retry_window_s=2.0, backoff_s=0.05, max_backoff_s=0.5, timeout_s=5)
        start = time.monotonic()
        with pytest.raises(EngineUnavailable) as info:
            await asyncio.wait_for(d.run(lambda c: c.generate(_probe())), 20)  # before the fix: hangs forever
        return time.monotonic() - start, d, str(info.value)

    elapsed, d, message = asyncio.run(go())
    assert elapsed < 6, elapsed
    assert all(url in message for url in dead) and "cannot connect" in message, message
    assert "no engine answered /health within 2s (rollout.startup_timeout_s)" in message  # which bound ended it
    assert d.attempts <= 10  # waits for /health between rounds instead of hammering dead engines


@pytest.mark.parametrize("answer,cause", [
    (lambda body: (500, {"error": {"message": "CUDA error: illegal memory access"}}), "HTTP 500"),
    (lambda body: (200, {"text": "no meta_info"}), "malformed /generate response"),
    (lambda body: (200, "{not json"), "invalid JSON"),
], ids=["5xx", "malformed", "not-json"])
def test_a_broken_engine_gets_at_most_max_retries_resends_then_a_named_error(answer, cause):
    async def go():
        engine = await FaultyEngine(answer).start()
        try:
            d = Dispatcher([engine.url], max_retries=3, retry_window_s=30, backoff_s=0.01, max_backoff_s=0.05)
            with pytest.raises(EngineUnavailable) as info:
                await asyncio.wait_for(d.run(lambda c: c.generate(_probe())), 20)
            await d.close()
            return engine.generate_requests, str(info.value)
        finally:
            await engine.stop()

    requests, message = asyncio.run(go())
    assert requests == 4, requests  # 1 + rollout.max_retries, before the fix: thousands per second
    assert "4 attempt(s)" in message and cause in message and "rollout.max_retries" in message, message


def test_teacher_scoring_with_wrong_length_logprobs_is_bounded():
    def answer(body):
        return 200, {"text": "", "output_ids": [], "meta_info": {"input_token_logprobs": [[None, 1, None]]}}

    async def go():
        engine = await FaultyEngine(answer).start()
        try:
            sample = Sample(prompt_index=0, group_index=0, domain="arith", prompt_ids=[1, 2], response_ids=[3, 4])
            with pytest.raises(EngineUnavailable, match="score: expected 3 prompt logprobs"):
                await asyncio.wait_for(score_samples([engine.url], [sample], max_retries=2, retry_window_s=10), 20)
            return engine.generate_requests
        finally:
            await engine.stop()

    assert asyncio.run(go()) == 3


def test_a_request_waits_for_a_restarting_engine_and_completes():
    port = free_port()

    async def go():
        d = Dispatcher([f"http://127.0.0.1:{port}"], max_retries=3, retry_window_s=20, backoff_s=0.05,
                       max_backoff_s=0.3)
        task = asyncio.create_task(d.run(lambda c: c.generate(_probe())))
        await asyncio.sleep(1.0)  # the engine is down for a second, then comes back on the same URL
        engine = await FaultyEngine(lambda body: (200, GOOD_ANSWER), port=port).start()
        try:
            response = await asyncio.wait_for(task, 20)
        finally:
            await engine.stop()
            await d.close()
        return response, d, engine.generate_requests

    response, d, requests = asyncio.run(go())
    assert response.output_ids == [5] and d.failovers >= 1 and requests == 1


def _wait_restarted(actor, old_pid: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ray.get(actor.status.remote())
        if status["pid"] != old_pid and status["alive"]:
            return status
        time.sleep(0.25)
    raise AssertionError(f"engine not restarted within {timeout}s: {status}")


def test_a_push_while_an_engine_is_dead_completes_and_the_engine_returns_with_it(engines, model_dir, tmp_path):
    """Disk mode: the pushed directory is recorded before the engines are told; a dead one restarts from it."""
    from rollout.engines import latest_pushed_weights
    from trainer.config import TrainerConfig
    from trainer.hf_io import load_hf_state
    from trainer.weight_sync import push_recoverable

    weights = load_hf_state(create_tiny_model(tmp_path / "w", build_char_tokenizer(), arch="qwen3_moe", seed=11))
    cfg = TrainerConfig(weight_sync="disk", weight_sync_dir=str(tmp_path / "sync"), weight_sync_timeout_s=120)
    victim = ray.get(engines.actors[0].pid.remote())
    os.kill(victim, signal.SIGKILL)
    push_recoverable(weights, engines.urls, 7, cfg, model_dir)  # must not raise although engine 0 is down
    assert latest_pushed_weights(engines.urls[0]) == (str(tmp_path / "sync" / "v7"), "7")
    _wait_restarted(engines.actors[0], victim)

    async def version(url: str) -> str:
        async with EngineClient(url) as client:
            return (await client.model_info())["weight_version"]

    assert [asyncio.run(version(u)) for u in engines.urls] == ["7", "7"]


def test_a_killed_engine_restarts_by_itself_with_the_latest_pushed_weights(engines, model_dir, tmp_path):
    """Runs last in this module: it changes the engines' weights."""
    from trainer.config import TrainerConfig
    from trainer.hf_io import load_hf_state
    from trainer.weight_sync import WeightSnapshots, push_recoverable

    tokenizer = build_char_tokenizer()
    new_weights = load_hf_state(create_tiny_model(tmp_path / "pushed", tokenizer, arch="qwen3_moe", seed=7))
    cfg = TrainerConfig(weight_sync="tensor", weight_sync_dir=str(tmp_path / "sync"))
    snapshots = WeightSnapshots(cfg)
    ids = _samples(tokenizer, 1)[0].prompt_ids + tokenizer("12", add_special_tokens=False)["input_ids"]

    async def scores(url: str) -> tuple[list[float], str]:
        async with EngineClient(url) as client:
            scored = await client.score_top_k(ids, len(ids) - 2, 0)
            return scored.logprobs, (await client.model_info())["weight_version"]

    before = asyncio.run(scores(engines.urls[0]))[0]
    push_recoverable(new_weights, engines.urls, 1, cfg, model_dir, snapshots)
    live = asyncio.run(scores(engines.urls[1]))
    assert live[1] == "1" and not np.allclose(live[0], before, atol=1e-4)

    victim = ray.get(engines.actors[0].pid.remote())
    os.kill(victim, signal.SIGKILL)
    status = _wait_restarted(engines.actors[0], victim)  # the watchdog, nobody called ensure_alive
    assert status["served_version"] == "1"
    restarted = asyncio.run(scores(engines.urls[0]))
    assert restarted[1] == "1"  # reports the version it serves
    np.testing.assert_allclose(restarted[0], live[0], atol=1e-5)  # equal to a live engine that got the push
    snapshots.close()


def test_a_retried_generation_gets_a_fresh_request_id():
    """SGLang refuses a request ID that is still in flight (400, not retried): a retry must not reuse it."""
    rids: list[str] = []

    def answer(body):
        rids.append(body["rid"])
        if len(rids) == 1:
            return 503, {"error": "overloaded"}
        return 200, {"text": "a", "output_ids": [5], "meta_info": {
            "id": body["rid"], "finish_reason": {"type": "length", "length": 1},
            "output_token_logprobs": [[-0.5, 5, None]], "prompt_tokens": 3, "completion_tokens": 1}}

    async def go():
        engine = await FaultyEngine(answer).start()
        try:
            cfg = RolloutConfig(num_engines=1, max_new_tokens=1, max_retries=2, request_timeout_s=10)
            manager = RolloutManager([engine.url], cfg, eos_token_id=None, tokenizer=build_char_tokenizer())
            sample = Sample(prompt_index=0, group_index=0, domain="arith", prompt_ids=[1, 2, 3])
            await manager.generate([sample])
            return sample
        finally:
            await engine.stop()

    sample = asyncio.run(go())
    assert sample.response_ids == [5] and len(rids) == 2 and rids[0] != rids[1]


def test_the_local_server_refuses_a_duplicate_request_id_in_flight_as_sglang_does(engines):
    async def go():
        async with EngineClient(engines.urls[0]) as client:
            slow = GenerateRequest(input_ids=[1, 2, 3], rid="same-rid",
                                   sampling_params={"max_new_tokens": 100, "ignore_eos": True})
            return await asyncio.gather(client.generate(slow, retries=0), client.generate(slow, retries=0),
                                        return_exceptions=True)

    results = asyncio.run(go())  # sent together: the second arrives while the first is in flight
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], EngineError), results
    assert errors[0].status == 400 and "rid" in str(errors[0])
