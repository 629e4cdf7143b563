"""Agent loops against real local engines and a scripted in-process environment session.

The tool loop's episode: generate -> env.step(model text) -> append the rendered observation (loss mask 0)
-> generate again. Checked: the prefix cache changes nothing but the prefill work, masks/logprobs/routing
line up, the environment's reward is taken, a failing episode is aborted and carries no loss, and an
engine killed mid-episode (turn 3) is replaced by another one with the sample unchanged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from envs.base import StepResult
from mopd.core.types import Sample
from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.agent_loop import Episode, SingleTurnLoop, ToolLoop, get_agent_loop, register_agent_loop
from rollout.chat_render import ObservationRenderer
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher
from rollout.rollout_manager import RolloutManager
from rollout.trajectory import Trajectory
from tests.rollout.conftest import ServerProc, free_port

TURNS = 4
REPLY = 24  # tokens per model turn (ignore_eos): agent turns longer than the observations, as in tool use
TOK = build_char_tokenizer()


class ScriptedEnv:
    """An environment session scripted per step: observation `r<turn>`, an error at `error_turns`, done with
    `reward` at `done_at`, an infrastructure failure (raises) at `fail_at`; `on_step(turn)` runs first."""

    def __init__(self, *, done_at: int = TURNS, reward: float = 1.0, error_turns: tuple[int, ...] = (),
                 fail_at: int | None = None, on_step=None) -> None:
        self.done_at, self.reward, self.error_turns, self.fail_at = done_at, reward, error_turns, fail_at
        self.on_step = on_step
        self.turn = 0
        self.seen: list[str] = []
        self.closed = False

    async def reset(self) -> str:
        return "go"

    async def step(self, model_text: str) -> StepResult:
        self.turn += 1
        self.seen.append(model_text)
        if self.on_step is not None:
            self.on_step(self.turn)
        if self.turn == self.fail_at:
            raise ConnectionError("sandbox unreachable")
        info = {"latency_s": 0.01 * self.turn}
        if self.turn in self.error_turns:
            info["error"] = "malformed_call"
        if self.turn >= self.done_at:
            return StepResult("", self.reward, True, info)
        return StepResult(f"r{self.turn}", 0.0, False, info)

    async def close(self) -> None:
        self.closed = True


class Renderer:
    """The test's chat rendering (the real one is rollout/chat_render.py's ObservationRenderer, tested on its
    own): the first observation as the user's message, then `<obs>...</obs>` glue after each model turn."""

    def __init__(self, first_observation: str) -> None:
        text = TOK.apply_chat_template([{"role": "user", "content": first_observation}], tokenize=False,
                                       add_generation_prompt=True)
        self.prompt_ids = TOK(text, add_special_tokens=False)["input_ids"]

    def tokens_after_turn(self, model_turn_ids, observation: str) -> list[int]:
        return glue(observation)


def glue(observation: str) -> list[int]:
    return TOK(f"\n<obs>{observation}</obs>\n", add_special_tokens=False)["input_ids"]


def episodes(envs: list[ScriptedEnv]):
    """An episode factory handing out `envs` in order, one per sample."""
    async def open_episode(sample: Sample) -> Episode:
        return Episode(env=envs.pop(0), renderer=Renderer)
    return open_episode


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("agent") / "moe", TOK, arch="qwen3_moe")


@pytest.fixture(scope="module")
def engines(model):
    """Two engines of the same model (greedy answers agree), routed experts on; the last test kills one."""
    procs = [ServerProc(model, "--enable-return-routed-experts", "--max-context-len", "1024") for _ in range(2)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def _sample(i: int = 0, domain: str = "agent") -> Sample:
    return Sample(prompt_index=i, group_index=0, domain=domain, prompt_ids=[1])  # the renderer replaces it


async def _episode(urls: list[str], env: ScriptedEnv, *, prefix_cache: bool, max_turns: int = 8,
                   max_context_len: int = 1024) -> tuple[Sample, Trajectory]:
    dispatcher = Dispatcher(urls, num_layers=2, top_k=2, max_retries=2, retry_window_s=30)
    loop = ToolLoop(episodes([env]), max_turns=max_turns, max_new_tokens=REPLY, max_context_len=max_context_len)
    traj = Trajectory(dispatcher, _sample(), {"max_new_tokens": REPLY, "temperature": 0.0, "ignore_eos": True},
                      prefix_cache=prefix_cache, routing_replay=True)
    try:
        await loop.run(traj.sample, traj)
        return traj.to_sample(TOK), traj
    finally:
        await traj.close()
        await dispatcher.close()


def test_the_registry_names_its_loops():
    assert get_agent_loop("single_turn") is SingleTurnLoop and get_agent_loop("tool") is ToolLoop
    with pytest.raises(KeyError, match=r"unknown agent loop 'chat'.*'single_turn', 'tool'"):
        get_agent_loop("chat")
    with pytest.raises(ValueError, match="already registered"):
        register_agent_loop("tool")(SingleTurnLoop)
    with pytest.raises(ValueError, match="max_turns must be an integer >= 1"):
        ToolLoop(episodes([]), max_turns=0, max_new_tokens=8, max_context_len=64)


def test_a_four_turn_episode_same_with_and_without_the_prefix_cache(engines):
    urls = [engines[0].url]
    cached, traj = asyncio.run(_episode(urls, ScriptedEnv(error_turns=(2,)), prefix_cache=True))
    uncached, traj_full = asyncio.run(_episode(urls, ScriptedEnv(error_turns=(2,)), prefix_cache=False))

    assert cached.prompt_ids == Renderer("go").prompt_ids
    assert cached.response_ids == uncached.response_ids  # greedy: the same conversation either way
    np.testing.assert_allclose(cached.rollout_logprobs, uncached.rollout_logprobs, atol=1e-5)
    np.testing.assert_array_equal(cached.routed_experts, uncached.routed_experts)
    # the cache prefills each token once (plus the re-fed last token of each turn); without it every turn
    # prefills the whole conversation again
    assert traj.prefill_tokens * 4 <= traj_full.prefill_tokens, (traj.prefill_tokens, traj_full.prefill_tokens)
    assert cached.metadata["prefill_tokens"] == traj.prefill_tokens

    # masks: the model's 4 turns are trained, the 3 observations are not, and carry logprob 0.0
    observations = [glue(f"r{t}") for t in range(1, TURNS)]
    expected_mask: list[int] = []
    for t in range(TURNS):
        expected_mask += [1] * REPLY + ([0] * len(observations[t]) if t < TURNS - 1 else [])
    assert cached.loss_mask == expected_mask
    response = np.array(cached.response_ids)
    mask = np.array(cached.loss_mask, dtype=bool)
    at = 0
    for t in range(TURNS - 1):  # the observation tokens sit exactly after each model turn
        at += REPLY
        assert list(response[at:at + len(observations[t])]) == observations[t]
        at += len(observations[t])
    assert all(lp == 0.0 for lp in np.array(cached.rollout_logprobs)[~mask])
    assert all(lp < 0.0 for lp in np.array(cached.rollout_logprobs)[mask])
    assert cached.routed_experts.shape == (len(cached.prompt_ids) + len(cached.response_ids) - 1, 2, 2)

    assert cached.metadata["turns"] == TURNS and cached.metadata["tool_calls"] == TURNS - 1
    assert cached.metadata["tool_errors"] == 1 and len(cached.metadata["tool_latency_s"]) == TURNS
    assert cached.metadata["env_reward"] is True and cached.reward == 1.0
    assert cached.finish_reason == "length"  # the last turn hit max_new_tokens; the episode itself is done
    assert "truncated" not in cached.metadata


def test_with_the_chat_renderer_the_sequence_is_the_template_of_the_conversation(engines):
    renderers: list[ObservationRenderer] = []

    def renderer(first: str) -> ObservationRenderer:
        renderers.append(ObservationRenderer(TOK, [{"role": "user", "content": first}]))
        return renderers[-1]

    async def go() -> Sample:
        dispatcher = Dispatcher([engines[0].url], num_layers=2, top_k=2)
        env = ScriptedEnv()
        loop = ToolLoop(lambda sample: _ready(Episode(env=env, renderer=renderer)), max_turns=8,
                        max_new_tokens=REPLY, max_context_len=1024)
        traj = Trajectory(dispatcher, _sample(), {"max_new_tokens": REPLY, "temperature": 0.0}, prefix_cache=True,
                          routing_replay=True)
        await loop.run(traj.sample, traj)
        await traj.close()
        await dispatcher.close()
        return traj.to_sample(TOK)

    sample = asyncio.run(go())
    assert sample.finish_reason != "abort" and sample.metadata["turns"] == TURNS
    (rendered,) = renderers
    # everything up to the last model turn is the template's rendering of the conversation (tool messages
    # included), token for token as the engine saw it; the last turn follows
    assert TOK.decode(sample.prompt_ids + sample.response_ids).startswith(rendered.text)
    assert sample.prompt_ids == rendered.prompt_ids


async def _ready(episode: Episode) -> Episode:
    return episode


def test_limits_end_the_episode_with_a_length_finish_and_no_env_reward(engines):
    sample, _ = asyncio.run(_episode([engines[0].url], ScriptedEnv(done_at=99), prefix_cache=True, max_turns=2))
    assert sample.metadata["turns"] == 2 and sample.metadata["truncated"] == "max_turns"
    assert sample.finish_reason == "length" and sample.metadata["env_reward"] is False
    assert sample.loss_mask[-1] == 1  # ends with the model's turn: the last observation is never appended

    # the context: turn 2 gets only the room left, and its observation no longer fits
    prompt = len(Renderer("go").prompt_ids)
    limit = prompt + REPLY + len(glue("r1")) + 20
    sample, _ = asyncio.run(_episode([engines[0].url], ScriptedEnv(done_at=99), prefix_cache=True,
                                     max_context_len=limit))
    assert sample.metadata["turns"] == 2 and sample.metadata["truncated"] == "context"
    assert len(sample.prompt_ids) + len(sample.response_ids) == limit and sample.loss_mask[-20:] == [1] * 20


def test_an_episode_that_cannot_finish_is_aborted_and_carries_no_loss(engines):
    env = ScriptedEnv(fail_at=2)
    sample, _ = asyncio.run(_episode([engines[0].url], env, prefix_cache=True))
    assert sample.finish_reason == "abort" and "sandbox unreachable" in sample.metadata["abort_reason"]
    assert len(sample.response_ids) == 2 * REPLY + len(glue("r1"))  # the 2 turns it had
    assert sample.loss_mask == [0] * len(sample.response_ids)
    assert sample.routed_experts.shape[0] == len(sample.prompt_ids) + len(sample.response_ids) - 1
    assert env.closed

    # no engine at all: the turn's retries run out, the episode is aborted instead of failing the step
    dead = f"http://127.0.0.1:{free_port()}"

    async def no_engine() -> Sample:
        dispatcher = Dispatcher([dead], max_retries=1, retry_window_s=1.0, backoff_s=0.01, max_backoff_s=0.05)
        traj = Trajectory(dispatcher, _sample(), {"max_new_tokens": 4}, prefix_cache=True)
        await ToolLoop(episodes([ScriptedEnv()]), max_turns=4, max_new_tokens=4, max_context_len=64).run(
            traj.sample, traj)
        await dispatcher.close()
        return traj.to_sample()

    aborted = asyncio.run(no_engine())
    assert aborted.finish_reason == "abort" and aborted.response_ids == [] and aborted.metadata["turns"] == 0


def test_the_manager_runs_one_loop_per_sample_by_domain_and_reads_prefix_cache(engines, model):
    def run(prefix_cache: bool) -> list[Sample]:
        cfg = RolloutConfig(max_new_tokens=8, temperature=0.0, max_context_len=1024, prefix_cache=prefix_cache)
        envs = [ScriptedEnv(done_at=3, reward=float(i)) for i in range(3)]
        manager = RolloutManager([e.url for e in engines], cfg, eos_token_id=None, tokenizer=TOK,
                                 model_path=str(model),
                                 agent_loops={"agent": ToolLoop(episodes(envs), max_turns=4, max_new_tokens=8,
                                                                max_context_len=1024)})
        samples = [_sample(i) for i in range(3)] + [_sample(3, domain="arith")]
        return asyncio.run(manager.generate(samples))

    on, off = run(True), run(False)
    for a, b in zip(on[:3], off[:3]):
        assert a.response_ids == b.response_ids and a.metadata["turns"] == 3
        assert a.response_text == TOK.decode(a.response_ids)
        assert a.routed_experts.shape[0] == len(a.prompt_ids) + len(a.response_ids) - 1
    assert sorted(s.reward for s in on[:3]) == [0.0, 1.0, 2.0]  # each sample got its own environment
    assert sum(s.metadata["prefill_tokens"] for s in on) < sum(s.metadata["prefill_tokens"] for s in off)
    single = on[3]  # another domain: one turn on the sample's own prompt, no environment
    assert single.prompt_ids == [1] and "turns" not in single.metadata and 1 <= len(single.response_ids) <= 8
    assert single.loss_mask == [1] * len(single.response_ids)


def test_an_engine_killed_at_turn_3_is_replaced_and_the_sample_is_unchanged(engines):
    """Runs last in this module: it kills one of the engines."""
    urls = [e.url for e in engines]
    reference, _ = asyncio.run(_episode(urls, ScriptedEnv(), prefix_cache=True))
    holder: dict[str, Trajectory] = {}

    def kill_session_engine(turn: int) -> None:
        if turn == 2:  # after turn 2's tool call: turn 3 goes to a dead engine holding the session
            victim = next(e for e in engines if e.url == holder["traj"].dispatcher.urls[holder["traj"].session.index])
            victim.proc.kill()
            victim.proc.wait()

    async def killed() -> tuple[Sample, Trajectory]:
        dispatcher = Dispatcher(urls, num_layers=2, top_k=2, max_retries=2, retry_window_s=30)
        env = ScriptedEnv(on_step=kill_session_engine)
        loop = ToolLoop(episodes([env]), max_turns=8, max_new_tokens=REPLY, max_context_len=1024)
        traj = Trajectory(dispatcher, _sample(), {"max_new_tokens": REPLY, "temperature": 0.0, "ignore_eos": True},
                          prefix_cache=True, routing_replay=True)
        holder["traj"] = traj
        try:
            await loop.run(traj.sample, traj)
            return traj.to_sample(TOK), traj
        finally:
            await traj.close()
            await dispatcher.close()

    sample, traj = asyncio.run(killed())
    assert traj.sessions_lost == 1 and sum(e.proc.poll() is not None for e in engines) == 1
    assert sample.finish_reason != "abort" and sample.metadata["turns"] == TURNS
    assert sample.response_ids == reference.response_ids and sample.loss_mask == reference.loss_mask
    np.testing.assert_allclose(sample.rollout_logprobs, reference.rollout_logprobs, atol=1e-5)
    np.testing.assert_array_equal(sample.routed_experts, reference.routed_experts)
