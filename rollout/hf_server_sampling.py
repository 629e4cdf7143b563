"""Token sampling of the local HF server: SGLang's logprobs and its truncated sampling, one batch at a time.

A step samples every request's next token together (`sample_tokens`): one softmax over the batch and one
inverse-CDF lookup, with one uniform drawn from each request's own generator, so a seeded request is
reproducible whatever else shares its step. Sampling row by row with `torch.multinomial` cost ~27 us per
request (~1.7 ms of a 64-request decode step, more than the forward's growth from 1 to 64 rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowSampling:
    """How one row is sampled: T = 0 is greedy; `banned` tokens (min_new_tokens' stop ids) get no mass."""
    temperature: float
    top_p: float = 1.0
    top_k: int = -1
    generator: torch.Generator | None = None
    banned: list[int] = field(default_factory=list)


def temperature_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """SGLang's logprobs: log softmax(logits / T); T = 0 (greedy) uses the plain distribution."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _ban(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    banned = [t for t in banned if 0 <= t < logits.shape[-1]]  # eos ids of a config may lie past the logits
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    return logits


def _truncate(probs: torch.Tensor, *, top_p: float, top_k: int) -> torch.Tensor:
    """Top-k, then top-p, of one row's distribution (not renormalised)."""
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=0)
        sorted_p[cum - sorted_p > top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int, banned: list[int]
                   ) -> torch.Tensor:
    """The distribution a request samples from at T > 0: softmax(logits/T), top-k, then top-p, renormalised.

    Speculative verification accepts drafts against exactly this distribution."""
    probs = _truncate(torch.softmax(_ban(logits, banned) / temperature, dim=-1), top_p=top_p, top_k=top_k)
    return probs / probs.sum()


def sample_tokens(logits: torch.Tensor, rows: list[RowSampling]) -> list[int | None]:
    """One token per row of `logits` [batch, vocab]: argmax at T = 0, else a draw from `sampling_probs`.

    A draw is the first token whose cumulative mass exceeds u * total mass, u ~ U[0, 1) from the row's
    generator (the process's default one when it has none). A row whose distribution is not finite or has
    no mass (NaN logits, everything banned) gets None: only that request fails.
    """
    if logits.shape[0] != len(rows):
        raise ValueError(f"sample_tokens: {logits.shape[0]} rows of logits for {len(rows)} requests")
    tokens: list[int | None] = [None] * len(rows)
    if not rows:
        return tokens
    logits = logits.float()
    if any(r.banned for r in rows):
        logits = logits.clone()  # the caller's logits stay as they were
        for i, row in enumerate(rows):
            logits[i] = _ban(logits[i], row.banned)
    finite = torch.isfinite(logits).any(dim=-1) & ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    greedy = [i for i, r in enumerate(rows) if r.temperature <= 0]
    if greedy:
        picked = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, tok in zip(greedy, picked):
            tokens[i] = tok if bool(finite[i]) else None
    drawn = [i for i, r in enumerate(rows) if r.temperature > 0 and bool(finite[i])]
    if not drawn:
        return tokens
    temps = torch.tensor([rows[i].temperature for i in drawn])
    probs = torch.softmax(logits[drawn] / temps[:, None], dim=-1)
    for j, i in enumerate(drawn):  # per-request truncation is rare; only those rows pay for it
        if 0 < rows[i].top_k < probs.shape[-1] or rows[i].top_p < 1.0:
            probs[j] = _truncate(probs[j], top_p=rows[i].top_p, top_k=rows[i].top_k)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=rows[i].generator, dtype=torch.float64) for i in drawn])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # u * total may round up to the total: fall back to the last token that has mass
    last = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    picked = torch.minimum(picked, last)
    ok = (cdf[:, -1] > 0) & torch.isfinite(cdf[:, -1])
    for j, i in enumerate(drawn):
        tokens[i] = int(picked[j]) if bool(ok[j]) else None
    return tokens


NO_MASS = "sampling: the logits are NaN/inf or every token is banned (no probability mass left)"


def sample_token(logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None, banned: list[int]) -> int:
    """One row of `sample_tokens` (speculative decoding's bonus token); raises where that gives None."""
    tok = sample_tokens(logits[None], [RowSampling(temperature, top_p, top_k, generator, list(banned))])[0]
    if tok is None:
        raise ValueError(NO_MASS)
    return tok
