"""Held-out accuracy of a checkpoint per domain, greedy and sampled, scored by the domains' verifiers."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.rewards import verifier_for


def load_eval_rows(path: str | Path, per_domain: int) -> dict[str, list[dict]]:
    """The first `per_domain` rows of every domain in a JSONL file."""
    rows: dict[str, list[dict]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if len(rows[row["domain"]]) < per_domain:
                rows[row["domain"]].append(row)
    return dict(rows)


@torch.no_grad()
def evaluate(model_path: str | Path, rows: dict[str, list[dict]], *, max_new_tokens: int = 12,
             samples: int = 4, temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> dict[str, dict]:
    """{domain: {"greedy": accuracy, "sampled": mean accuracy over `samples` draws}}."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    results = {}
    for domain, domain_rows in rows.items():
        verifier = verifier_for(domain)
        greedy = _accuracy(model, tokenizer, domain_rows, verifier, max_new_tokens, batch_size, None)
        sampled = sum(_accuracy(model, tokenizer, domain_rows, verifier, max_new_tokens, batch_size, temperature)
                      for _ in range(samples)) / max(samples, 1)
        results[domain] = {"greedy": greedy, "sampled": sampled}
    return results


def _accuracy(model, tokenizer, rows: list[dict], verifier, max_new_tokens: int, batch_size: int,
              temperature: float | None) -> float:
    correct = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                 for r in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": False} if temperature is None else \
            {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        for row, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            text = tokenizer.decode(ids, skip_special_tokens=False)
            correct += verifier(text, row["label"])
    return correct / max(len(rows), 1)
