"""Held-out accuracy of a checkpoint per domain, greedy, sampled and pass@k, scored by the domains' verifiers."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.core.errors import ConfigError
from mopd.rewards import verifier_for

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Held-out accuracy during training (`eval_interval`), scored by the domains' verifiers (`evaluate` below)."""

    files: list[str] = field(default_factory=list)  # JSONL prompt/domain/label rows; [] = toy.dir's data/test.jsonl
    per_domain: int = 50  # the first N rows of each domain
    samples: int = 0  # sampled draws per prompt on top of greedy (0 = greedy only)
    temperature: float = 1.0
    max_new_tokens: int | None = None  # None = rollout.max_new_tokens

    def validate(self, prefix: str, *, during_training: bool, toy_dir: str | None) -> None:
        """Ranges at start-up; the files themselves are checked by `check_heldout_files`."""
        if self.per_domain < 1:
            raise ConfigError(f"{prefix}.per_domain", "an integer >= 1", self.per_domain)
        if self.samples < 0:
            raise ConfigError(f"{prefix}.samples", "an integer >= 0 (0 = greedy only)", self.samples)
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature", "a number > 0", self.temperature)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"{prefix}.max_new_tokens", "null (= rollout.max_new_tokens) or an integer >= 1",
                              self.max_new_tokens)
        if any(not f for f in self.files):
            raise ConfigError(f"{prefix}.files", "JSONL file paths", self.files)
        if during_training and not self.files and not toy_dir:
            raise ConfigError(f"{prefix}.files", "held-out JSONL files when eval_interval > 0 (or toy.dir, whose "
                              "data/test.jsonl is used)", self.files)


def load_eval_rows(path: str | Path | list, per_domain: int) -> dict[str, list[dict]]:
    """The first `per_domain` rows of every single-turn domain in a JSONL file (or in several, in order).

    Rows of a multi-turn environment (an `env` field, e.g. the toy `tool` domain) are left out: a
    single generation cannot play an episode, so they would score 0; their reward during training is
    `rollout/reward/<domain>`."""
    rows: dict[str, list[dict]] = defaultdict(list)
    episodes: set[str] = set()
    for one in path if isinstance(path, list) else [path]:
        with open(one) as f:
            for line in f:
                row = json.loads(line)
                if row.get("env"):
                    episodes.add(row["domain"])
                elif len(rows[row["domain"]]) < per_domain:
                    rows[row["domain"]].append(row)
    if episodes:
        log.info("held-out evaluation: skipping multi-turn domain(s) %s (scored by their environment during "
                 "training: rollout/reward/<domain>)", sorted(episodes))
    return dict(rows)


def heldout_files(job: Any) -> list[str]:
    """The held-out files of `eval_interval`: `eval.files`, else the toy world's data/test.jsonl."""
    return list(job.eval.files) or [str(Path(job.toy.dir) / "data" / "test.jsonl")]


def check_heldout_files(job: Any) -> None:
    """Before anything starts: every held-out file exists and holds prompt/domain/label rows (a toy world
    that is still to be built is taken on trust)."""
    if job.eval_interval <= 0:
        return
    for i, name in enumerate(heldout_files(job)):
        where = f"eval.files[{i}]" if job.eval.files else "toy.dir"
        if not job.eval.files and not Path(name).is_file():
            continue  # the toy world builds it
        try:
            rows = load_eval_rows(name, 1)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(where, "a readable JSONL file of {prompt, domain, label} rows", f"{name}: {e}") from None
        if not rows:
            raise ConfigError(where, "a JSONL file with at least one row", name)


def flat_metrics(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """`evaluate`'s results as logger metrics: eval/<domain>/greedy, .../sampled, .../pass@k, and eval/mean/*."""
    out: dict[str, float] = {}
    for domain, res in results.items():
        out.update({f"{prefix}/{domain}/{k}": float(v) for k, v in res.items() if k != "prompts"})
    keys = {k for res in results.values() for k in res if k != "prompts"}
    for k in sorted(keys):
        vals = [res[k] for res in results.values() if k in res]
        out[f"{prefix}/mean/{k}"] = sum(vals) / len(vals)
    return out


@torch.no_grad()
def evaluate(model_path: str | Path, rows: dict[str, list[dict]], *, max_new_tokens: int = 12,
             samples: int = 4, temperature: float = 1.0, batch_size: int = 64, seed: int = 0,
             teacher: str | Path | None = None) -> dict[str, dict]:
    """{domain: {"greedy": accuracy, "sampled": mean accuracy over `samples` draws, "pass@k": ...}}.

    With `samples=0` only greedy is run (no "sampled" or pass@k).

    pass@k uses the unbiased estimator over the `samples` draws of each prompt (k = 1 and `samples`).
    With a `teacher` checkpoint (and samples >= 1) each domain also gets "reverse_kl": KL(model || teacher) per
    response token on those same sampled draws (see reverse_kl_to_teacher); the draws are the ones without it.
    """
    tokenizer, model = _load(model_path)
    other = _load_teacher(model, teacher) if teacher is not None and samples else None
    torch.manual_seed(seed)
    results = {}
    for domain, domain_rows in rows.items():
        verifier = verifier_for(domain)
        greedy = _correct(model, tokenizer, domain_rows, verifier, max_new_tokens, batch_size, None)
        draws, kl = [], _KL()
        for _ in range(samples):
            texts = generate_texts(model, tokenizer, domain_rows, max_new_tokens, batch_size, temperature, other, kl)
            draws.append([float(verifier(text, row["label"])) for row, text in zip(domain_rows, texts)])
        result = {"greedy": _mean(greedy)}
        if samples:
            result["sampled"] = _mean([sum(d) / samples for d in zip(*draws)])
        for k in sorted({1, samples} if samples else set()):
            result[f"pass@{k}"] = _mean([pass_at_k(samples, int(sum(d)), k) for d in zip(*draws)])
        if other is not None:
            result["reverse_kl"] = kl.mean
        result["prompts"] = len(domain_rows)
        results[domain] = result
    return results


def _load(model_path: str | Path) -> tuple[Any, Any]:
    """A checkpoint's tokenizer (left padding, for batched generation) and its model in float32, for inference."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def _load_teacher(model, teacher_path: str | Path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    mine, theirs = model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if mine != theirs:
        raise ValueError(f"teacher: its vocabulary ({theirs} logits) differs from the model's ({mine}); reverse KL "
                         "needs the same tokenizer")
    return teacher


@dataclass
class _KL:
    """A running sum of per-token KL(model || teacher) over response tokens."""
    total: float = 0.0
    tokens: int = 0

    @property
    def mean(self) -> float:
        return self.total / max(self.tokens, 1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n draws with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def generate_texts(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int,
                   temperature: float | None, teacher=None, kl: _KL | None = None) -> list[str]:
    """One generation per row, decoded with special tokens (greedy when `temperature` is None); with a `teacher`,
    the per-token KL(model || teacher) of the generations is added to `kl`."""
    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        enc, out = _generate(model, tokenizer, rows[start:start + batch_size], max_new_tokens, temperature)
        texts += [tokenizer.decode(ids, skip_special_tokens=False) for ids in out[:, enc["input_ids"].shape[1]:]]
        if teacher is not None and kl is not None:
            per_position, mask = _position_kl(model, teacher, tokenizer, enc, out)
            kl.total += float(per_position[mask].sum())
            kl.tokens += int(mask.sum())
    return texts


def _generate(model, tokenizer, rows: list[dict], max_new_tokens: int, temperature: float | None,
              ) -> tuple[Any, torch.Tensor]:
    """The rows' chat prompts, left-padded into one batch, and the model's sequences (prompt + generation; greedy
    when `temperature` is None, else plain sampling: no top-p, no top-k)."""
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = {"do_sample": False} if temperature is None else \
        {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return enc, out


def _correct(model, tokenizer, rows: list[dict], verifier, max_new_tokens: int, batch_size: int,
             temperature: float | None) -> list[float]:
    """The verifier's score of one generation per row (greedy when `temperature` is None)."""
    texts = generate_texts(model, tokenizer, rows, max_new_tokens, batch_size, temperature)
    return [float(verifier(text, row["label"])) for row, text in zip(rows, texts)]


@torch.no_grad()
def reverse_kl_to_teacher(model_path: str | Path, teacher_path: str | Path, rows: dict[str, list[dict]], *,
                          samples: int = 4, max_new_tokens: int = 12, temperature: float = 1.0,
                          batch_size: int = 64, seed: int = 0) -> dict[str, dict]:
    """{domain: {"reverse_kl": nats per response token, "tokens": n}} on the model's own samples.

    At every position of `samples` draws per prompt, KL(model || teacher) summed over the whole vocabulary
    (exact at that position: only the sampled prefixes add variance), averaged over the response tokens, end
    of turn included. It is what on-policy distillation minimises, measured on fixed held-out prompts; the
    training batches' estimate (`mopd/reverse_kl/<domain>`) also depends on which samples a step happened to
    hold, and uses the policy that sampled them. `evaluate(..., teacher=)` reports it next to accuracy on the
    same draws.
    """
    if samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples}")
    tokenizer, model = _load(model_path)
    teacher = _load_teacher(model, teacher_path)
    torch.manual_seed(seed)
    results = {}
    for domain, domain_rows in rows.items():
        kl = _KL()
        for _ in range(samples):
            generate_texts(model, tokenizer, domain_rows, max_new_tokens, batch_size, temperature, teacher, kl)
        results[domain] = {"reverse_kl": kl.mean, "tokens": kl.tokens}
    return results


def _position_kl(model, teacher, tokenizer, enc, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response position of one generated batch (`_generate`'s enc and out): KL(model || teacher) and whether
    the position is part of the response (up to and including its first end of turn; generate pads the finished
    rows after it)."""
    width = enc["input_ids"].shape[1]
    ended = out[:, width:] == tokenizer.eos_token_id
    mask = (ended.long().cumsum(1) - ended.long()) == 0  # not after the first end of turn
    attention = torch.cat([enc["attention_mask"], mask.long()], dim=1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # left padding: each row's positions start at 0

    def logprobs(m) -> torch.Tensor:
        logits = m(input_ids=out, attention_mask=attention, position_ids=positions).logits[:, width - 1:-1]
        return torch.log_softmax(logits.float(), dim=-1)

    mine, theirs = logprobs(model), logprobs(teacher)
    return (mine.exp() * (mine - theirs)).sum(-1), mask
