"""Prompt datasets (JSONL files, and the tasks of a multi-turn env kind) and the data scheduler.

The scheduler hands out each step's prompts from one stream per source (domain): a seeded
permutation per epoch, so the order is reproducible and the state is one integer per source.
Saving and restoring that state makes resume exact: no prompt is skipped or repeated.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from envs.config import SINGLE_TURN, EnvConfig
from envs.registry import EnvOptions, env_kind, kind_tasks
from mopd.config import DataConfig
from mopd.core.errors import ConfigError
from mopd.core.types import Sample

log = logging.getLogger(__name__)
ALL_SOURCES = "__all__"


@dataclass
class PromptRow:
    prompt_ids: list[int]
    domain: str
    label: Any
    metadata: dict[str, Any]


def load_prompts(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_prompt_len: int,
                 task_rows: Sequence[dict] = ()) -> list[PromptRow]:
    """Tokenize every JSONL row, then `task_rows` (`env_task_rows`); prompts longer than `max_prompt_len`
    are dropped (logged). The order is fixed, so the scheduler's state resumes the same streams."""
    rows: list[PromptRow] = []
    too_long = 0
    for row in [*(r for file in cfg.train_files for r in iter_rows(file, cfg)), *task_rows]:
        ids = _prompt_ids(row[cfg.prompt_key], tokenizer)
        if len(ids) > max_prompt_len:
            too_long += 1
            continue
        meta = {k: v for k, v in row.items() if k not in (cfg.prompt_key, cfg.domain_key, cfg.label_key)}
        rows.append(PromptRow(ids, str(row[cfg.domain_key]), row.get(cfg.label_key), meta))
    if too_long:
        log.warning("data: dropped %d prompt(s) longer than %d tokens (rollout.max_context_len - "
                    "rollout.max_new_tokens)", too_long, max_prompt_len)
    if not rows:
        raise ConfigError("data.train_files", f"at least one prompt of at most {max_prompt_len} tokens (from "
                          "these files or the tasks of env.kind)", cfg.train_files)
    return rows


def scan_domains(cfg: DataConfig, file: str) -> set[str]:
    """Validate every row of one JSONL file without tokenizing it; return the domains it holds.

    Runs at start-up, before anything is built or started, so a malformed row costs seconds.
    """
    domains = {str(row[cfg.domain_key]) for row in iter_rows(file, cfg)}
    if not domains:
        raise ConfigError("data.train_files", "JSONL files with at least one row", file)
    return domains


def iter_rows(file: str, cfg: DataConfig) -> Iterator[dict]:
    """The rows of one JSONL file, each checked (object, prompt, domain); errors name `file:line`."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError("data.train_files", "paths of existing JSONL files", file)
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _parse_row(line, cfg, f"{file}:{line_no}")
    except UnicodeDecodeError as e:
        raise ConfigError("data.train_files", f"UTF-8 text ({file}: {e.reason} at byte {e.start})") from None


def check_domain_weights(weights: dict[str, float], domains: set[str]) -> None:
    """`data.domain_weights` names exactly the data's domains (0 skips one) and can sample something."""
    unknown = sorted(set(weights) - domains)
    if unknown:
        raise ConfigError("data.domain_weights", f"weights only for domains in the data {sorted(domains)}", unknown)
    missing = sorted(domains - set(weights)) if weights else []
    if missing:
        raise ConfigError("data.domain_weights", f"a weight for every domain in the data (0 skips one); "
                          f"missing {missing}", dict(weights))
    if any(not w >= 0 for w in weights.values()) or (weights and sum(weights.values()) <= 0):
        raise ConfigError("data.domain_weights", "non-negative weights with a positive sum", dict(weights))


def env_task_rows(env: EnvConfig, cfg: DataConfig) -> list[dict]:
    """One data row per task of `env.kind` (`env.tasks`, else the kind's built-in tasks), in the
    episode domain; none for a single-turn kind or one without tasks. The rows make the tasks a data
    source like a JSONL file, so `data.train_files` may be empty.

    A row is `{prompt: [the env's first observation as the user message], domain, task: the kind's
    JSON form of the task}`: the episode opens its session on `task` and renders its prompt from the
    same observation (mopd/agentic.py), so the length filter in `load_prompts` sees that prompt.
    """
    if env.kind == SINGLE_TURN or not (env.tasks or env_kind(env.kind).builtin_tasks):
        return []
    if len(env.episode_domains) != 1:
        raise ConfigError("env.domains", f"one domain when env.kind={env.kind} has tasks (the domain of their "
                          "rows)", sorted(env.episode_domains))
    domain = next(iter(env.episode_domains))
    try:
        tasks = kind_tasks(env.kind, env.tasks)
    except ValueError as e:
        raise ConfigError("env.tasks", f"task directories of kind {env.kind} ({e})", list(env.tasks)) from None
    if not tasks:
        raise ConfigError("env.tasks", f"at least one task (env.kind={env.kind} ships none)", list(env.tasks))
    dump = env_kind(env.kind).dump_task
    return [{cfg.prompt_key: [{"role": "user", "content": first_observation(env, task)}], cfg.domain_key: domain,
             "task": dump(task)} for task in tasks]


def first_observation(env: EnvConfig, task: Any) -> str:
    """What the env's `reset(task)` answers, without opening a sandbox (the kind registers it)."""
    answer = env_kind(env.kind).first_observation
    if answer is None:
        raise ConfigError("env.kind", "a kind that registers its first observation (envs/registry.py) when its "
                          "tasks are the data", env.kind)
    return answer(task, EnvOptions(max_turns=env.max_turns))


def _parse_row(line: str, cfg: DataConfig, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError("data.train_files", f"valid JSON on every line ({where}: {e.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError("data.train_files", f"a JSON object on every line ({where} holds a "
                          f"{type(row).__name__})", _short(row))
    for key, name in ((cfg.prompt_key, "prompt_key"), (cfg.domain_key, "domain_key")):
        if key not in row:
            raise ConfigError(f"data.{name}", f"a key present in every row ({where} has {sorted(row)})", key)
    if not _is_prompt(row[cfg.prompt_key]):
        raise ConfigError("data.train_files", f"a prompt that is a non-empty string or a list of chat "
                          f"messages {{role, content}} ({where})", _short(row[cfg.prompt_key]))
    if not isinstance(row[cfg.domain_key], str) or not row[cfg.domain_key]:
        raise ConfigError("data.train_files", f"a non-empty string domain ({where})", _short(row[cfg.domain_key]))
    return row


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return bool(prompt)
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def _prompt_ids(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class DataScheduler:
    """Per-source prompt streams with per-step quotas; the state is `{source: prompts consumed}`."""

    def __init__(self, rows: list[PromptRow], cfg: DataConfig) -> None:
        self.cfg = cfg
        domains = sorted({r.domain for r in rows})
        check_domain_weights(dict(cfg.domain_weights), set(domains))
        if cfg.domain_weights:
            self.sources = {d: [i for i, r in enumerate(rows) if r.domain == d] for d in domains
                            if cfg.domain_weights.get(d, 0) > 0}
            self.weights = {d: cfg.domain_weights[d] for d in self.sources}
        else:
            self.sources = {ALL_SOURCES: list(range(len(rows)))}
            self.weights = {ALL_SOURCES: 1.0}
        self.rows = rows
        self.consumed = {s: 0 for s in self.sources}

    @property
    def domains(self) -> set[str]:
        return {r.domain for r in self.rows}

    def next_prompts(self, n: int) -> list[tuple[int, PromptRow]]:
        """The next `n` prompts as (stream position, row); positions are unique across sources."""
        out = []
        for source, count in self._quota(n).items():
            for _ in range(count):
                out.append(self._take(source))
        return out

    def make_samples(self, n_prompts: int, n_per_prompt: int) -> list[Sample]:
        samples = []
        for position, row in self.next_prompts(n_prompts):
            for _ in range(n_per_prompt):
                samples.append(Sample(prompt_index=position, group_index=position, domain=row.domain,
                                      prompt_ids=list(row.prompt_ids), label=row.label,
                                      metadata=dict(row.metadata)))
        return samples

    def state_dict(self) -> dict[str, int]:
        return dict(self.consumed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != set(self.consumed):
            raise ValueError(f"data state has sources {sorted(state)}, the scheduler has {sorted(self.consumed)}; "
                             "was data.domain_weights changed since the checkpoint?")
        self.consumed = {k: int(v) for k, v in state.items()}

    def _quota(self, n: int) -> dict[str, int]:
        """Largest-remainder split of n by weight, ties broken by source name for determinism."""
        total = sum(self.weights.values())
        exact = {s: n * w / total for s, w in self.weights.items()}
        quota = {s: int(v) for s, v in exact.items()}
        rest = sorted(exact, key=lambda s: (-(exact[s] - quota[s]), s))
        for s in rest[: n - sum(quota.values())]:
            quota[s] += 1
        return quota

    def _take(self, source: str) -> tuple[int, PromptRow]:
        indices = self.sources[source]
        k = self.consumed[source]
        epoch, offset = divmod(k, len(indices))
        order = list(indices)
        if self.cfg.shuffle:
            random.Random(f"{self.cfg.seed}:{source}:{epoch}").shuffle(order)
        self.consumed[source] = k + 1
        # position: unique per (source, k) so GRPO groups never collide across sources
        position = k * len(self.sources) + sorted(self.sources).index(source)
        return position, self.rows[order[offset]]
