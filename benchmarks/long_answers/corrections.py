"""How often a model withdraws a slip with `!` in the correctable domains, and how often such an answer is right.

Accuracy alone cannot tell a student that stopped slipping from one that slips and repairs; on-policy
distillation can teach the second (the teacher's scores at the student's own slipped states say "`!` and
write the round again"), off-policy SFT on clean teacher samples cannot. So the benchmark counts, over the
greedy answer and `samples` sampled answers per test prompt: the share of answers with a correction, and the
share of those that grade correct (envs/toy_tasks.py `corrected_match_reward`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.toy_tasks import CORRECTION, corrected_match_reward, extract_answer
from mopd.evaluate import generate_texts


@torch.no_grad()
def correction_stats(model_path: str | Path, rows: dict[str, list[dict]], *, max_new_tokens: int, samples: int,
                     seed: int = 0, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{domain: {"greedy"|"sampled": {"with_correction": share, "corrected_right": share of those, "n": answers}}}."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for domain, domain_rows in rows.items():
        out[domain] = {}
        for kind, draws in (("greedy", [None]), ("sampled", [1.0] * samples)):
            answers = [(a, r["label"]) for t in draws for a, r in zip(
                generate_texts(model, tokenizer, domain_rows, max_new_tokens, batch_size, t), domain_rows)]
            if answers:
                out[domain][kind] = summarize(answers)
    return out


def summarize(answers: list[tuple[str, str]]) -> dict[str, float]:
    """Share of (response, label) answers with a correction, and the share of those graded right."""
    corrected = [(a, label) for a, label in answers if CORRECTION in extract_answer(a)]
    right = sum(corrected_match_reward(a, label) for a, label in corrected)
    return {"with_correction": len(corrected) / len(answers),
            "corrected_right": right / len(corrected) if corrected else 0.0, "n": len(answers)}
