"""Prompt datasets (JSONL files, and the tasks of a multi-turn env kind) and the data scheduler.

The scheduler hands out each step's prompts from one stream per source (domain): a seeded
permutation per epoch, so the order is reproducible and the state is one integer per source.
Saving and restoring that state makes resume exact: no prompt is skipped or repeated.
"""

from __future__ import annotations

import json
import logging
import random
import threading
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
    """Per-source prompt streams with per-step quotas; the state is `{source: prompts consumed}` plus, with
    `data.pass_rate_weighting`, the rewards seen per prompt row.

    It is also the GroupSource of rollout/scheduler.py (`quota`, `next_group`, `source_of`): the sequence
    scheduler draws one prompt group at a time from the same streams the batch path uses. The streams may be
    read from the scheduler's thread while the driver saves a checkpoint, hence the lock.
    """

    def __init__(self, rows: list[PromptRow], cfg: DataConfig, group_size: int = 1) -> None:
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
        self.group_size = group_size  # samples per prompt in `next_group` (rollout.n_samples_per_prompt)
        self.consumed = {s: 0 for s in self.sources}
        self.outcomes: dict[int, list[float]] = {}  # row index -> [sum of rewards, responses seen]
        self._order: dict[str, tuple[int, list[int]]] = {}  # source -> (epoch, its row order), the last one used
        self._lock = threading.Lock()

    @property
    def domains(self) -> set[str]:
        return {r.domain for r in self.rows}

    def next_prompts(self, n: int) -> list[tuple[int, PromptRow]]:
        """The next `n` prompts as (stream position, row); positions are unique across sources."""
        out = []
        for source, count in self.quota(n).items():
            for _ in range(count):
                out.append(self._take(source))
        return out

    def make_samples(self, n_prompts: int, n_per_prompt: int) -> list[Sample]:
        return [s for position, row in self.next_prompts(n_prompts) for s in _group(position, row, n_per_prompt)]

    def quota(self, n: int) -> dict[str, int]:
        """Largest-remainder split of n by weight, ties broken by source name for determinism."""
        total = sum(self.weights.values())
        exact = {s: n * w / total for s, w in self.weights.items()}
        quota = {s: int(v) for s, v in exact.items()}
        rest = sorted(exact, key=lambda s: (-(exact[s] - quota[s]), s))
        for s in rest[: n - sum(quota.values())]:
            quota[s] += 1
        return quota

    def next_group(self, source: str) -> list[Sample]:
        """The next prompt of `source` as `group_size` fresh samples sharing one group_index."""
        return _group(*self._take(source), self.group_size)

    def source_of(self, sample: Sample) -> str:
        return ALL_SOURCES if ALL_SOURCES in self.sources else sample.domain

    def record_outcomes(self, samples: list[Sample]) -> None:
        """Remember each prompt row's rewards (its pass rate) for `data.pass_rate_weighting`."""
        if not self.cfg.pass_rate_weighting:
            return
        with self._lock:
            for sample in samples:
                seen = self.outcomes.setdefault(self._row_at_position(sample.prompt_index), [0.0, 0])
                seen[0] += sample.reward
                seen[1] += 1

    def pass_rate(self, row: int) -> float | None:
        """Mean reward of the row's responses so far; None until `data.pass_rate_min_samples` were seen."""
        total, count = self.outcomes.get(row, (0.0, 0))
        return total / count if count >= self.cfg.pass_rate_min_samples else None

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"consumed": dict(self.consumed),
                    "outcomes": {str(row): list(seen) for row, seen in sorted(self.outcomes.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; a checkpoint written before pass rates were kept holds only the counts."""
        consumed = state.get("consumed", state)
        if set(consumed) != set(self.consumed):
            raise ValueError(f"data state has sources {sorted(consumed)}, the scheduler has {sorted(self.consumed)}; "
                             "was data.domain_weights changed since the checkpoint?")
        with self._lock:
            self.consumed = {k: int(v) for k, v in consumed.items()}
            self.outcomes = {int(row): [float(total), int(n)] for row, (total, n) in state.get("outcomes", {}).items()}

    def _take(self, source: str) -> tuple[int, PromptRow]:
        """The source's next prompt; with pass-rate weighting, a prompt always or never solved is passed over
        (consumed, not drawn) except with chance `data.pass_rate_keep`, decided by a seeded coin per position."""
        with self._lock:
            while True:
                k = self.consumed[source]
                self.consumed[source] = k + 1
                row = self._row_at(source, k)
                if self._wanted(source, k, row):
                    # position: unique per (source, k) so GRPO groups never collide across sources
                    return k * len(self.sources) + sorted(self.sources).index(source), self.rows[row]

    def _wanted(self, source: str, k: int, row: int) -> bool:
        cfg = self.cfg
        rate = self.pass_rate(row) if cfg.pass_rate_weighting else None
        if rate is None or cfg.pass_rate_low < rate < cfg.pass_rate_high:
            return True
        return random.Random(f"{cfg.seed}:keep:{source}:{k}").random() < cfg.pass_rate_keep

    def _row_at(self, source: str, k: int) -> int:
        """The row index of the source's k-th draw: a seeded permutation per epoch."""
        indices = self.sources[source]
        epoch, offset = divmod(k, len(indices))
        cached = self._order.get(source)
        if cached is None or cached[0] != epoch:
            order = list(indices)
            if self.cfg.shuffle:
                random.Random(f"{self.cfg.seed}:{source}:{epoch}").shuffle(order)
            cached = self._order[source] = (epoch, order)
        return cached[1][offset]

    def _row_at_position(self, position: int) -> int:
        """Inverse of the position numbering in `_take`: which row a sample's prompt_index came from."""
        k, source_number = divmod(position, len(self.sources))
        return self._row_at(sorted(self.sources)[source_number], k)


def _group(position: int, row: PromptRow, n: int) -> list[Sample]:
    return [Sample(prompt_index=position, group_index=position, domain=row.domain, prompt_ids=list(row.prompt_ids),
                   label=row.label, metadata=dict(row.metadata)) for _ in range(n)]
