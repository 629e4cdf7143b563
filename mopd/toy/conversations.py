"""Gold training sequences for the toy world: single-turn answers and expert tool-use episodes.

An env domain's row (envs/toy_tasks.py: it carries ``env`` and ``task``) becomes the conversation a
perfect agent has with that env, tokenized turn by turn exactly as the agent loop builds it at
rollout (rollout/chat_render.py): the prompt with the generation prompt, each assistant turn as the
tokens the model samples (its text, then end-of-turn), each tool response as the chat template's
tokens between the end of that turn and the next generation prompt. Loss is on the assistant tokens
only. So a teacher never trains on tokens the rollout would not produce. Single-turn rows are the
prompt and the label as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from envs.toy_tasks import END_OF_TURN
from envs.toy_tool import ToyToolTask, expert_messages
from rollout.chat_render import ObservationRenderer

# env kind -> the expert's messages after the prompt (assistant and tool turns) for a row's task
EXPERTS: dict[str, Callable[[Any], list[dict[str, str]]]] = {
    "toy_tool": lambda task: expert_messages(ToyToolTask.from_dict(task)),
}


def gold_sequence(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a row's gold episode: the label as one answer, or the env's expert."""
    if not row.get("env"):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["label"] + END_OF_TURN, add_special_tokens=False)["input_ids"]
        return ids + answer, [0] * len(ids) + [1] * len(answer)
    if row["env"] not in EXPERTS:
        raise ValueError(f"row field `env`: no expert for env kind {row['env']!r}; known: {sorted(EXPERTS)}")
    # the agent loop's own rendering (rollout/chat_render.py): prompt, then per tool response the
    # template glue after the sampled turn; it raises if the template cannot be split exactly
    renderer = ObservationRenderer(tokenizer, row["prompt"])
    ids, mask = list(renderer.prompt_ids), [0] * len(renderer.prompt_ids)
    turn: list[int] = []
    for message in EXPERTS[row["env"]](row["task"]):
        if message["role"] == "assistant":  # what the model samples: its text, then end-of-turn
            turn = tokenizer(message["content"] + END_OF_TURN, add_special_tokens=False)["input_ids"]
            ids, mask = ids + turn, mask + [1] * len(turn)
        else:
            glue = renderer.tokens_after_turn(turn, message["content"])
            ids, mask = ids + glue, mask + [0] * len(glue)
    return ids, mask
