"""Token-in, token-out chat rendering for multi-turn tool use.

What the engine sampled is exactly what is trained: a model turn is never decoded and re-encoded.
Between two model turns the agent loop appends *glue*: whatever closes the model's turn, the tool
observation wrapped by the model's own chat template, and the next assistant generation prompt.

The glue is found by rendering the whole conversation with the chat template, up to the new tool
message and the next generation prompt, and cutting off the text the engine has already seen (prompt,
sampled turns, earlier glue). That is only exact when the template is *prefix-stable*: the text
seen so far, every model turn exactly as sampled, must be a prefix of the new rendering. Templates break this when they
re-render earlier turns (Qwen3 drops the ``<think>`` block of turns before the last user query and
rebuilds the block it keeps as ``<think>\\n...\\n</think>\\n\\n``; some templates only render
reasoning on the last turn) or when the generation prompt differs from how the template opens an
assistant turn in history. Every call checks the prefix property and raises
``ChatTemplateSplitError`` when it fails, so rollout tokens and the template's rendering of the
conversation can never silently diverge; the agent loop ends such an episode as aborted.

A turn that stopped without an end-of-turn token (the engine hit max tokens) is closed by the
template: the template's turn close (e.g. ``<|im_end|>\\n``) is part of the glue, so it carries no
loss, and the trained sequence still equals the template's rendering of the truncated turn.

Observations are hostile text (a tool echoes whatever the model or a file wrote): a special
token's text inside one (``<|im_end|>``, ``</tool_response>``, ...) would be encoded as the special
token itself and could forge turns. The renderer puts a zero-width space after its first character
first, so observations only ever hold plain-text tokens.

The glue is encoded on its own, so its tokens start at the turn boundary: that is what the engine
is fed and what is trained. It equals the tokenization of the whole conversation when the boundary
is a special token, as in every ChatML template (the turn ends with or is closed by ``<|im_end|>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant", "tool")
ZERO_WIDTH_SPACE = "\u200b"


class ChatTemplateSplitError(ValueError):
    """The chat template cannot be split turn by turn without changing tokens already sampled."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
            tools: Sequence[Mapping[str, Any]] | None, template_kwargs: Mapping[str, Any] | None) -> str:
    """The template's text of ``messages`` followed by the assistant generation prompt."""
    if tokenizer.chat_template is None:
        raise ValueError("tokenizer.chat_template is not set; token-in/token-out rendering needs one")
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tools=[dict(t) for t in tools] if tools else None,
        add_generation_prompt=True,
        tokenize=False,
        **dict(template_kwargs or {}),
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # apply_chat_template(tokenize=True) encodes the rendered text the same way: the template
    # writes every special token itself, so the tokenizer must add none.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("messages: need at least one message to render a prompt")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}]: must be a mapping, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role: must be one of {ROLES}, got {message.get('role')!r}")


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                  tools: Sequence[Mapping[str, Any]] | None = None,
                  template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Prompt token ids: the chat template over ``messages`` with the tool schema and the
    assistant generation prompt, tokenized exactly as ``apply_chat_template(tokenize=True)``.

    ``template_kwargs`` go to the template (e.g. ``{"enable_thinking": False}``)."""
    _check_messages(messages)
    return _encode(tokenizer, _render(tokenizer, messages, tools, template_kwargs))


class ObservationRenderer:
    """One episode's conversation, rendered incrementally so sampled tokens are kept verbatim.

    ``prompt_ids`` start the sequence; after each model turn, ``tokens_after_turn`` returns the
    glue ids (loss mask 0) to append before the next turn. Invariant after every call: prompt ids +
    all model turns + all glue == the template's rendering of the whole conversation, provided the
    model's tokens are the tokenizer's own encoding of their text (checked on text here; a
    non-canonical tokenization sampled by the engine is kept, as token-in/token-out requires).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 template_kwargs: Mapping[str, Any] | None = None) -> None:
        _check_messages(messages)
        self.template_kwargs = dict(template_kwargs or {})
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages]
        # The conversation's text exactly as the engine has seen it so far.
        self.text = _render(tokenizer, self.messages, self.tools, self.template_kwargs)
        self.prompt_ids = _encode(tokenizer, self.text)
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        self._specials = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)

    def _neutralize(self, observation: str) -> str:
        """The observation with every special token's text broken by a zero-width space."""
        for token in self._specials:
            observation = observation.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
        return observation

    def tokens_after_turn(self, model_turn_ids: Sequence[int], observation: str | Sequence[str]) -> list[int]:
        """Glue ids after a model turn: the turn's close if it was not sampled, one tool message
        per observation (several for parallel tool calls), then the next generation prompt.

        Raises ``ChatTemplateSplitError`` when the template re-renders the conversation so far
        differently (see the module docstring) instead of returning tokens that disagree with it.
        """
        ids = [int(t) for t in model_turn_ids]
        if not ids:
            raise ValueError("model_turn_ids: empty; a model turn has at least one token")
        observations = [observation] if isinstance(observation, str) else list(observation)
        if not observations or not all(isinstance(o, str) for o in observations):
            raise ValueError("observation: must be a string or a non-empty sequence of strings")
        sampled = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # The sampled EOS belongs to the turn (loss mask 1); the message's content stops before it.
        content_ids = ids[:-1] if ids[-1] == self.tokenizer.eos_token_id else ids
        content = self.tokenizer.decode(content_ids, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
        messages = self.messages + [{"role": "assistant", "content": content}]
        messages += [{"role": "tool", "content": self._neutralize(o)} for o in observations]
        rendered = _render(self.tokenizer, messages, self.tools, self.template_kwargs)
        seen = self.text + sampled
        if not rendered.startswith(seen):
            at = next((i for i, (a, b) in enumerate(zip(rendered, seen)) if a != b), min(len(rendered), len(seen)))
            raise ChatTemplateSplitError(
                f"chat template is not prefix-stable at assistant turn "
                f"{sum(m['role'] == 'assistant' for m in messages)}: the conversation as sampled and "
                f"its re-rendering differ at char {at}: sampled {seen[at:at + 60]!r}, template "
                f"{rendered[at:at + 60]!r} (the template rewrites earlier turns or the sampled turn)"
            )
        glue = rendered[len(seen):]
        self.messages = messages
        self.text = rendered
        return _encode(self.tokenizer, glue)
