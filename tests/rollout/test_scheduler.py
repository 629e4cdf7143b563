"""The sequence scheduler against two real local engines over HTTP: quotas, whole groups, no waiting on the tail,
partial rollout across real weight pushes, staleness, exact resume from its state, the group hook."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mopd.core.errors import ConfigError
from mopd.core.types import Sample
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.agent_loop import ToolLoop
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher, Gate
from rollout.engine_client import EngineClient
from rollout.rollout_manager import RolloutManager
from rollout.scheduler import Batch, SequenceScheduler
from rollout.sglang_api import GenerateRequest
from tests.rollout.conftest import ServerProc
from tests.rollout.test_agent_loop import TURNS, ScriptedEnv, episodes

N = 2  # samples per prompt


class Source:
    """A GroupSource over two domains: `short` (3 new tokens) and `long` whose lengths are heavy-tailed
    (most prompts 3 tokens, every fourth `tail` tokens), all with ignore_eos so lengths are exact."""

    def __init__(self, weights: dict[str, float], *, tail: int = 60, start: int = 0) -> None:
        self.weights, self.tail = weights, tail
        self.next_index = start
        self.drawn: list[int] = []
        self.tokenizer = build_char_tokenizer()

    def quota(self, num_groups: int) -> dict[str, int]:
        total = sum(self.weights.values())
        exact = {s: num_groups * w / total for s, w in self.weights.items()}
        quota = {s: int(x) for s, x in exact.items()}
        for s in sorted(exact, key=lambda s: quota[s] - exact[s])[:num_groups - sum(quota.values())]:
            quota[s] += 1
        return quota

    def length(self, index: int, source: str) -> int:
        return self.tail if source == "long" and index % 4 == 3 else 3

    def next_group(self, source: str) -> list[Sample]:
        i = self.next_index
        self.next_index += 1
        self.drawn.append(i)
        ids = self.tokenizer(f"{i}+{i}=", add_special_tokens=False)["input_ids"]
        params = {"max_new_tokens": self.length(i, source), "ignore_eos": True}
        return [Sample(prompt_index=i, group_index=i, domain=source, prompt_ids=list(ids),
                       metadata={"sampling_params": dict(params)}) for _ in range(N)]

    def source_of(self, sample: Sample) -> str:
        return sample.domain


@pytest.fixture(scope="module")
def engines(tiny_models: dict[str, Path]) -> Iterator[list[ServerProc]]:
    procs = [ServerProc(tiny_models["moe"], "--enable-return-routed-experts", "--max-batch-size", "16",
                        "--weight-version", "0") for _ in range(2)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def _cfg(**kw: object) -> RolloutConfig:
    base = {"num_engines": 2, "max_new_tokens": 200, "max_context_len": 256, "prompts_per_step": 4,
            "n_samples_per_prompt": N, "scheduler": "sequence", "in_flight_per_engine": 8, "request_timeout_s": 60,
            "max_retries": 1}
    return RolloutConfig(**{**base, **kw})


def _manager(engines: list[ServerProc], cfg: RolloutConfig, model: Path) -> RolloutManager:
    tok = build_char_tokenizer()
    return RolloutManager([e.url for e in engines], cfg, eos_token_id=tok.eos_token_id, tokenizer=tok,
                          model_path=str(model))


def _push(engines: list[ServerProc], model: Path, version: int) -> None:
    for e in engines:
        status, reply = e.post("/update_weights_from_disk", {"model_path": str(model), "weight_version": str(version)})
        assert status == 200, reply


@pytest.fixture
def scheduler_for(engines, tiny_models) -> Iterator:
    """A factory of schedulers on the two engines (reset to the `moe` weights at version 0); all are closed."""
    made: list[SequenceScheduler] = []
    _push(engines, tiny_models["moe"], 0)

    def make(source: Source, cfg: RolloutConfig, **kw: object) -> SequenceScheduler:
        made.append(SequenceScheduler(_manager(engines, cfg, tiny_models["moe"]), source, cfg, **kw))
        return made[-1]
    yield make
    for scheduler in made:
        scheduler.close()


def _check_batch(batch: Batch, quota: dict[str, int]) -> None:
    assert Counter(g[0].domain for g in batch.groups) == Counter({s: q for s, q in quota.items() if q})
    for group in batch.groups:
        assert len(group) == N and len({s.prompt_index for s in group}) == 1  # whole groups
        for s in group:
            n = len(s.response_ids)
            assert n == s.metadata["sampling_params"]["max_new_tokens"]  # ignore_eos: exact lengths
            assert len(s.rollout_logprobs) == n == len(s.weight_versions) and s.loss_mask == [1] * n
            assert s.routed_experts is not None and s.routed_experts.shape == (len(s.prompt_ids) + n - 1, 2, 2)


def _indices(batch: Batch) -> list[int]:
    return [g[0].prompt_index for g in batch.groups]


def test_batches_hold_quotas_and_do_not_wait_for_the_tail(scheduler_for):
    source = Source({"short": 1, "long": 3}, tail=200)
    scheduler = scheduler_for(source, _cfg())
    scheduler.start(0)
    first = scheduler.next_batch(4, 0)
    _check_batch(first, source.quota(4))
    # the 200-token group was started with the others, but the batch did not wait for it: it was cut and
    # (partial_rollout=false) its prompt queued again from scratch
    assert all(len(s.response_ids) == 3 for s in first.samples)
    assert first.stats["rollout/aborted_tokens"] > 0 and first.stats["rollout/in_flight"] == 0
    assert 0 < first.stats["rollout/engine_busy_frac"] <= 1
    requeued = {g["originals"][0]["prompt_index"]: g["source"] for g in scheduler.state_dict()["groups"]}
    tail = {i for i, source_name in requeued.items() if source.length(i, source_name) == 200}
    assert tail  # thrown away once, so it must finish in a later batch rather than be cut again
    seen = _indices(first)
    for step in range(1, 3):
        scheduler.pause()
        scheduler.resume(0)
        batch = scheduler.next_batch(4, 0)
        _check_batch(batch, source.quota(4))
        assert batch.stats["rollout/staleness_max"] == 0 and batch.stats["rollout/partial_samples"] == 0
        seen += _indices(batch)
    assert len(seen) == len(set(seen)) and set(seen) <= set(source.drawn) and tail <= set(seen)
    state = scheduler.state_dict()  # every drawn prompt is in a batch, finished and waiting, or queued again
    waiting = [g["originals"][0]["prompt_index"] for g in state["done"] + state["groups"]]
    assert sorted(seen + waiting) == sorted(source.drawn)


def test_partial_rollout_continues_on_new_weights_with_consistent_tokens(scheduler_for, engines, tiny_models):
    """A sync loop with a real push per step (alternating two sets of weights): sequences cut at a step end
    continue from their prefix on the new weights; the 60-token ones are finished before they go stale."""
    source = Source({"long": 1}, tail=60)
    scheduler = scheduler_for(source, _cfg(partial_rollout=True, max_staleness=2))
    scheduler.start(0)
    mixed: list[Sample] = []
    seen: list[int] = []
    for version in range(5):
        batch = scheduler.next_batch(3, version)
        seen += _indices(batch)
        assert batch.stats["rollout/staleness_max"] <= 2 and batch.stats["rollout/stale_dropped"] == 0
        new = [s for s in batch.samples if len(set(s.weight_versions)) > 1]
        assert batch.stats["rollout/partial_samples"] >= len(new)
        # the tokens of the current version were sampled by the weights the engines hold now, from the prefix,
        # and their routing rows are those weights' routing of that prefix
        scored = asyncio.run(_score_new_part(engines[0].url, new, version))
        for s, (scores, rows) in zip(new, scored):
            first = len(s.prompt_ids) + s.weight_versions.index(version) - 1
            np.testing.assert_array_equal(rows, s.routed_experts[first:])
            np.testing.assert_allclose(scores, s.rollout_logprobs[s.weight_versions.index(version):], atol=2e-3,
                                       err_msg=f"{version} {s.prompt_index} {s.weight_versions}")
        mixed += new
        scheduler.pause()
        _push(engines, tiny_models["moe_b" if version % 2 == 0 else "moe"], version + 1)
        scheduler.resume(version + 1)
    assert {3, 7} <= set(seen) and len(seen) == len(set(seen))  # the long ones made it, within the bound
    assert any(s.prompt_index in (3, 7) for s in mixed)
    for s in mixed:
        n = s.metadata["sampling_params"]["max_new_tokens"]
        assert s.metadata["preemptions"] >= 1 and len(s.response_ids) == n and s.finish_reason == "length"
        assert s.weight_versions == sorted(s.weight_versions)
        assert s.routed_experts.shape == (len(s.prompt_ids) + n - 1, 2, 2)


async def _score_new_part(url: str, samples: list[Sample], version: int
                          ) -> list[tuple[list[float], np.ndarray]]:
    """Under the engine's current weights, each sample's tokens of `version` given all before them: their log p,
    and the routing rows from the position before the first of them on."""
    out = []
    async with EngineClient(url, num_layers=2, top_k=2) as client:
        for s in samples:
            start = len(s.prompt_ids) + s.weight_versions.index(version)
            scores = await client.score_top_k(s.tokens, start, 0)
            routed = await client.generate(GenerateRequest(
                input_ids=s.tokens, sampling_params={"max_new_tokens": 0}, return_routed_experts=True,
                routed_experts_start_len=start - 1))
            out.append((scores.logprobs, routed.routed_experts))
    return out


@pytest.mark.parametrize("policy", ["drop", "regenerate"])
def test_stale_groups_are_dropped_or_regenerated(scheduler_for, engines, tiny_models, policy):
    source = Source({"long": 1}, tail=200)
    scheduler = scheduler_for(source, _cfg(partial_rollout=True, max_staleness=1, stale_policy=policy))
    scheduler.start(0)
    seen = _indices(scheduler.next_batch(3, 0))
    state = scheduler.state_dict()
    stale = {g["originals"][0]["prompt_index"] for g in state["done"]} | {
        g["originals"][0]["prompt_index"] for g in state["groups"] if any(x is not None for x in g["samples"])}
    assert stale
    for version in (1, 2):  # two pushes without a batch between: their tokens are two versions old
        scheduler.pause()
        _push(engines, tiny_models["moe"], version)
        scheduler.resume(version)
    dropped = 0
    for _ in range(4):
        batch = scheduler.next_batch(3, 2)
        dropped += batch.stats["rollout/stale_dropped"]
        seen += _indices(batch)
        assert batch.stats["rollout/staleness_max"] <= 1
    assert dropped == len(stale) and len(seen) == len(set(seen))
    if policy == "drop":
        assert not stale & set(seen)
    else:
        assert stale <= set(seen)


def _json_round_trip(state: dict) -> dict:
    """What a checkpoint does with the state: JSON for everything but the numpy arrays (kept as lists here)."""
    return json.loads(json.dumps(state, default=lambda a: a.tolist()))


def test_state_dict_resumes_in_a_new_scheduler_with_no_prompt_lost_or_repeated(scheduler_for):
    cfg = _cfg(partial_rollout=True, max_staleness=2)
    source = Source({"short": 1, "long": 1}, tail=60)
    first = scheduler_for(source, cfg)
    first.start(0)
    seen = _indices(first.next_batch(2, 0))
    state = first.state_dict()
    partial = {(g["originals"][0]["prompt_index"], j): saved["sample"]["response_ids"]
               for g in state["groups"] for j, saved in enumerate(g["samples"])
               if saved is not None and not saved["finished"]}
    assert partial and state["done"]  # cut sequences and finished groups waiting for the next batch
    first.close()
    # a new process: the data source goes on after the prompts it had handed out, the scheduler has them
    resumed = Source({"short": 1, "long": 1}, tail=60, start=source.next_index)
    second = scheduler_for(resumed, cfg)
    second.load_state_dict(_json_round_trip(state))
    second.start(0)
    continued = 0
    for _ in range(8):
        batch = second.next_batch(2, 0)
        _check_batch(batch, resumed.quota(2))
        seen += _indices(batch)
        for group in batch.groups:
            for j, s in enumerate(group):
                prefix = partial.get((s.prompt_index, j))
                if prefix is not None:  # continued from the saved tokens, not regenerated
                    assert s.response_ids[:len(prefix)] == prefix
                    continued += 1
        if set(source.drawn) <= set(seen):
            break
    assert set(source.drawn) <= set(seen) and len(seen) == len(set(seen)) and continued == len(partial)


def test_filtered_groups_are_counted_and_replaced(scheduler_for):
    judged: list[int] = []

    async def hook(group: list[Sample]) -> bool:
        await asyncio.sleep(0)
        judged.append(group[0].prompt_index)
        return group[0].prompt_index % 3 != 0

    source = Source({"short": 1})
    scheduler = scheduler_for(source, _cfg(), group_hook=hook)
    scheduler.start(0)
    filtered = 0
    for _ in range(2):
        batch = scheduler.next_batch(4, 0)
        _check_batch(batch, {"short": 4})
        assert all(i % 3 for i in _indices(batch))
        filtered += batch.stats["rollout/filtered_groups"]
    assert filtered >= 2 and filtered == sum(1 for i in judged if i % 3 == 0)


def test_a_source_with_no_signal_left_stops_with_an_error_instead_of_drawing_forever(scheduler_for):
    async def reject(group: list[Sample]) -> bool:
        return False

    scheduler = scheduler_for(Source({"short": 1}), _cfg(), group_hook=reject, max_filtered_per_batch=6)
    scheduler.start(0)
    with pytest.raises(RuntimeError, match="dynamic_sampling.max_filtered_batches"):
        scheduler.next_batch(4, 0)


def test_continuous_mode_generates_between_batches_within_the_staleness_bound(scheduler_for, engines, tiny_models):
    source = Source({"short": 1, "long": 1}, tail=60)
    scheduler = scheduler_for(source, _cfg(partial_rollout=True, max_staleness=1), continuous=True)
    scheduler.start(0)
    seen: list[int] = []
    for version in range(3):
        batch = scheduler.next_batch(2, version)
        _check_batch(batch, source.quota(2))
        assert batch.stats["rollout/staleness_max"] <= 1
        seen += _indices(batch)
        time.sleep(0.5)  # training: generation goes on meanwhile
        scheduler.pause()
        state = scheduler.state_dict()
        assert state["done"] and len(state["done"]) + len(state["groups"]) <= 2  # at most max_staleness batches
        _push(engines, tiny_models["moe_b" if version % 2 == 0 else "moe"], version + 1)
        scheduler.resume(version + 1)
    assert len(seen) == len(set(seen))


def test_config_fields_and_per_sample_overrides_are_validated():
    assert RolloutConfig().scheduler == "batch"
    for name, value in (("scheduler", "fast"), ("stale_policy", "keep"), ("in_flight_per_engine", -1),
                        ("max_staleness", -1), ("partial_rollout", "yes")):
        with pytest.raises(ConfigError, match=f"rollout.{name}"):
            _cfg(**{name: value}).validate()
    assert _cfg().in_flight_target(2) == 16 and _cfg(in_flight_per_engine=0).in_flight_target(2) == 8
    manager = RolloutManager(["http://127.0.0.1:9"], _cfg(max_new_tokens=32), eos_token_id=0)

    def params(overrides: object) -> dict:
        return manager.sample_params(Sample(0, 0, "d", [1, 2], metadata={"sampling_params": overrides}))

    expected = {**manager.sampling_params(), "max_new_tokens": 5, "ignore_eos": True}
    assert params({"max_new_tokens": 5, "ignore_eos": True}) == expected
    for bad, match in (({"max_new_tokens": 33}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 0.1}, "unknown"),
                       ({"ignore_eos": "yes"}, "ignore_eos")):
        with pytest.raises(ValueError, match=match):
            params(bad)
    with pytest.raises(TypeError, match="sampling_params"):
        params([5])


def test_an_agent_episode_paused_across_pushes_ends_as_if_never_paused(engines, tiny_models):
    """Greedy tool-use episodes under repeated pause -> push (same weights, new version) -> resume: turns cut
    mid-way continue from their prefix (the engine session dropped and the context resent), the sandbox stays
    open across the pauses, and the episode is token for token the one generated without any pause."""
    _push(engines, tiny_models["moe"], 0)
    envs = [ScriptedEnv() for _ in range(40)]
    loop = ToolLoop(episodes(envs), max_turns=8, max_new_tokens=100, max_context_len=500)
    cfg = _cfg(temperature=0.0, partial_rollout=True, max_staleness=100, prompts_per_step=1, in_flight_per_engine=1)
    tok = build_char_tokenizer()
    manager = RolloutManager([e.url for e in engines], cfg, eos_token_id=tok.eos_token_id, tokenizer=tok,
                             model_path=str(tiny_models["moe"]), agent_loops={"agent": loop})
    source = Source({"agent": 1})
    reference = asyncio.run(manager.generate(source.next_group("agent")))
    assert all(s.finish_reason != "abort" and s.metadata["turns"] == TURNS for s in reference)
    scheduler = SequenceScheduler(manager, source, cfg, continuous=True)
    try:
        scheduler.start(0)
        for version in range(1, 16):
            time.sleep(0.03)
            scheduler.pause()
            saved = scheduler.state_dict()["groups"]  # an episode in flight is saved by its prompt only
            assert all(x is None or x["finished"] for g in saved for x in g["samples"])
            _push(engines, tiny_models["moe"], version)
            scheduler.resume(version)
        batch = scheduler.next_batch(1, version)
    finally:
        scheduler.close()
    (group,) = batch.groups
    assert any(s.metadata.get("preemptions", 0) >= 1 for s in group)
    for s, ref in zip(group, reference):
        assert s.response_ids == ref.response_ids and s.loss_mask == ref.loss_mask and s.reward == ref.reward
        np.testing.assert_allclose(s.rollout_logprobs, ref.rollout_logprobs, atol=1e-4)
        np.testing.assert_array_equal(s.routed_experts, ref.routed_experts)
    assert any(len({v for v, m in zip(s.weight_versions, s.loss_mask) if m}) > 1 for s in group)
    assert all(env.closed for env in envs[:2 * len(source.drawn)] if env.turn)


def test_a_closed_gate_holds_requests_back_and_busy_time_is_counted(engines):
    async def go() -> None:
        gate = Gate()
        gate.close()
        dispatcher = Dispatcher([engines[0].url], gate=gate)
        request = GenerateRequest(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
        task = asyncio.create_task(dispatcher.generate(request))
        await asyncio.sleep(0.3)
        assert not task.done() and dispatcher.in_flight == [0] and dispatcher.busy_seconds() == [0.0]
        gate.open()
        response = await task
        assert len(response.output_ids) == 4 and dispatcher.in_flight == [0]
        assert 0 < dispatcher.busy_seconds()[0] < 10
        await dispatcher.close()

    asyncio.run(go())
