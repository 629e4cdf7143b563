"""Agent loops: how one prompt becomes one finished sample, one registry entry per kind of episode.

A loop is `async run(sample, llm)`: it drives the model through `llm` (rollout/trajectory.py, which
every model turn goes through) and leaves the sample filled: response tokens, loss mask (1 on tokens
the engine sampled, 0 on observations and template glue), rollout logprobs (0.0 where the mask is 0),
routed experts for the whole conversation, finish reason, metadata, and the environment's reward when
the episode grades itself (`metadata["env_reward"]` True; False when a limit cut the episode: mopd/rewards.py
then gives 0, the verifier never scores an episode).

- `single_turn`: one model turn (the verifiable single-answer tasks).
- `tool`: multi-turn tool use against an environment session (`envs.base.EnvSession`, provided by the
  ToolManager in toolbox/): generate -> env.step(model text) -> append the rendered observation ->
  generate again, until the environment says done, `max_turns` model turns, or the context is full.
  An episode that cannot finish (engines gone, environment infrastructure failing, a chat template
  that cannot be split) is aborted: `finish_reason="abort"`, loss mask all 0.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

from envs.base import EnvSession
from mopd.core.types import Sample
from rollout.trajectory import Trajectory

log = logging.getLogger(__name__)


class AgentLoop(Protocol):
    """What the rollout manager runs once per sample. `multi_turn`: whether the prefix cache can help."""

    multi_turn: ClassVar[bool]

    async def run(self, sample: Sample, llm: Trajectory) -> None: ...


L = TypeVar("L", bound=type)
_LOOPS: dict[str, type] = {}


def register_agent_loop(name: str) -> Callable[[L], L]:
    """Class decorator: make a loop available as `get_agent_loop(name)` (e.g. for a config's loop name)."""
    def add(cls: L) -> L:
        if name in _LOOPS and _LOOPS[name] is not cls:
            raise ValueError(f"agent loop {name!r} is already registered ({_LOOPS[name].__qualname__})")
        _LOOPS[name] = cls
        return cls
    return add


def get_agent_loop(name: str) -> type:
    """The loop class registered under `name`; the error lists the registered names."""
    if name not in _LOOPS:
        raise KeyError(f"unknown agent loop {name!r}; registered: {sorted(_LOOPS)}")
    return _LOOPS[name]


@register_agent_loop("single_turn")
class SingleTurnLoop:
    """One model turn: the prompt is the whole task."""

    multi_turn: ClassVar[bool] = False

    async def run(self, sample: Sample, llm: Trajectory) -> None:
        await llm.generate()


# --- tool use ---------------------------------------------------------------------------------------------

class ConversationRenderer(Protocol):
    """One episode's chat rendering (rollout/chat_render.py's ObservationRenderer is one): the prompt rendered
    from the environment's first observation, and, after each model turn, the tokens to append: whatever
    closes the model's turn, the observation in the model's chat template, and the next assistant prompt."""

    prompt_ids: list[int]

    def tokens_after_turn(self, model_turn_ids: Sequence[int], observation: str) -> list[int]: ...


@dataclass
class Episode:
    """What one tool-use sample needs: its environment session (not yet reset), and the renderer of its
    conversation made from the first observation (`reset`'s answer)."""

    env: EnvSession
    renderer: Callable[[str], ConversationRenderer]


OpenEpisode = Callable[[Sample], Awaitable[Episode]]


@register_agent_loop("tool")
class ToolLoop:
    """Multi-turn tool use; see the module docstring. Limits: `max_turns` model turns, `max_new_tokens`
    per model turn, `max_context_len` tokens for prompt + whole response (the engine's context)."""

    multi_turn: ClassVar[bool] = True

    def __init__(self, open_episode: OpenEpisode, *, max_turns: int, max_new_tokens: int,
                 max_context_len: int) -> None:
        for name, value in (("max_turns", max_turns), ("max_new_tokens", max_new_tokens),
                            ("max_context_len", max_context_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ToolLoop: {name} must be an integer >= 1, got {value!r}")
        self.open_episode = open_episode
        self.max_turns, self.max_new_tokens, self.max_context_len = max_turns, max_new_tokens, max_context_len

    async def run(self, sample: Sample, llm: Trajectory) -> None:
        meta = sample.metadata
        meta.update(turns=0, tool_calls=0, tool_errors=0, tool_latency_s=[], env_reward=False)
        episode: Episode | None = None
        try:
            episode = await self.open_episode(sample)
            renderer = episode.renderer(await episode.env.reset())
            llm.reset_prompt(renderer.prompt_ids)
            await self._turns(sample, llm, episode.env, renderer)
        except Exception as e:  # the episode cannot finish: anything above failed past its own recovery
            log.warning("episode of sample %d aborted: %s: %s", sample.prompt_index, type(e).__name__, e,
                        exc_info=True)
            llm.abort(f"{type(e).__name__}: {e}")
        finally:
            if episode is not None:
                await self._close(sample, episode)

    @staticmethod
    async def _close(sample: Sample, episode: Episode) -> None:
        """A session that fails to close does not undo a finished episode (the ToolManager reaps it)."""
        try:
            await episode.env.close()
        except Exception as e:  # noqa: BLE001 - logged; the sample is complete either way
            log.warning("closing the environment of sample %d failed: %s: %s", sample.prompt_index,
                        type(e).__name__, e)

    async def _turns(self, sample: Sample, llm: Trajectory, env: EnvSession, renderer: ConversationRenderer
                     ) -> None:
        meta = sample.metadata
        for turn in range(1, self.max_turns + 1):
            budget = min(self.max_new_tokens, self.max_context_len - len(llm.tokens))
            if budget < 1:
                return self._truncated(sample, "context")
            start = len(llm.tokens)
            response = await llm.generate({"max_new_tokens": budget})
            meta["turns"] += 1
            if response.finish_reason == "abort":
                llm.abort("the engine aborted the turn")
                return None
            result = await env.step(response.text)
            if result.info.get("latency_s") is not None:
                meta["tool_latency_s"].append(float(result.info["latency_s"]))
            if result.info.get("error"):
                meta["tool_errors"] += 1
            if result.done:
                sample.reward = float(result.reward)
                meta["env_reward"] = True
                return None
            meta["tool_calls"] += 1
            if turn == self.max_turns:  # no turn left to answer the observation: do not append it
                break
            observation = renderer.tokens_after_turn(llm.tokens[start:], result.observation)
            if len(llm.tokens) + len(observation) >= self.max_context_len:  # no room left to answer it
                return self._truncated(sample, "context")
            llm.append_observation(observation)
        return self._truncated(sample, "max_turns")

    @staticmethod
    def _truncated(sample: Sample, limit: str) -> None:
        """Cut by a limit before the environment said done: a length finish, graded by the verifier."""
        sample.finish_reason = "length"
        sample.metadata["truncated"] = limit

