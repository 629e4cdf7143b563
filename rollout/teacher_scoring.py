"""Teacher scoring: one prefill of prompt + response per sample, returning the response tokens' logprobs."""

from __future__ import annotations

import asyncio

from mopd.core.types import Sample, TokenScores
from rollout.dispatch import Dispatcher


async def score_samples(urls: list[str], samples: list[Sample], *, top_k: int = 0, timeout_s: float = 300.0,
                        max_retries: int = 3, retry_window_s: float = 300.0) -> list[TokenScores]:
    """log pi_teacher(y_t | x, y_<t) for every response token (and the teacher's top-k tokens there, when
    top_k > 0), load-balanced over the teacher's engines. Each prefill may take `timeout_s`; a failed one
    is re-sent at most `max_retries` times within `retry_window_s` (a dead replica restarts meanwhile)."""
    dispatcher = Dispatcher(urls, timeout_s=timeout_s, max_retries=max_retries, retry_window_s=retry_window_s)

    async def one(sample: Sample) -> TokenScores:
        if not sample.response_ids:
            return TokenScores(logprobs=[], top_ids=[] if top_k else None, top_logprobs=[] if top_k else None)
        tokens = sample.prompt_ids + sample.response_ids
        return await dispatcher.run(lambda client: client.score_top_k(tokens, len(sample.prompt_ids), top_k))

    try:
        return list(await asyncio.gather(*(one(s) for s in samples)))
    finally:
        await dispatcher.close()
