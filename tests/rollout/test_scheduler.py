"""The sequence scheduler against two real local engines over HTTP: quotas, whole groups, no waiting on the tail,
partial rollout across real weight pushes, staleness, exact resume from its state, the group hook."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mopd.core.errors import ConfigError
from mopd.core.types import Sample
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.config import RolloutConfig
from rollout.engine_client import EngineClient
from rollout.rollout_manager import RolloutManager
from rollout.scheduler import Batch, SequenceScheduler
from tests.rollout.conftest import ServerProc

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
    base = dict(num_engines=2, max_new_tokens=200, max_context_len=256, prompts_per_step=4, n_samples_per_prompt=N,
                scheduler="sequence", in_flight_per_engine=8, request_timeout_s=60, max_retries=1)
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
    seen = _indices(first)
    for step in range(1, 3):
        scheduler.pause()
        scheduler.resume(0)
        batch = scheduler.next_batch(4, 0)
        _check_batch(batch, source.quota(4))
        assert batch.stats["rollout/staleness_max"] == 0 and batch.stats["rollout/partial_samples"] == 0
        seen += _indices(batch)
    assert len(seen) == len(set(seen)) and set(seen) <= set(source.drawn)
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
        # the tokens of the current version were sampled by the weights the engines hold now, from the prefix
        scored = asyncio.run(_score_new_part(engines[0].url, new, version))
        for s, scores in zip(new, scored):
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


async def _score_new_part(url: str, samples: list[Sample], version: int) -> list[list[float]]:
    """log p of each sample's tokens of `version` under the engine's current weights, given all before them."""
    async with EngineClient(url) as client:
        return [(await client.score_top_k(s.tokens, len(s.prompt_ids) + s.weight_versions.index(version), 0)
                 ).logprobs for s in samples]


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
