"""Teacher scoring: one prefill of prompt + response per sample, returning the response tokens' logprobs."""

from __future__ import annotations

import asyncio

from mopd.types import Sample
from rollout.dispatch import Dispatcher


async def score_samples(urls: list[str], samples: list[Sample], *, timeout_s: float = 300.0,
                        max_retries: int = 3) -> list[list[float]]:
    """log pi_teacher(y_t | x, y_<t) for every response token, load-balanced over the teacher's engines."""
    dispatcher = Dispatcher(urls, timeout_s=timeout_s, max_retries=max_retries)

    async def one(sample: Sample) -> list[float]:
        if not sample.response_ids:
            return []
        tokens = sample.prompt_ids + sample.response_ids
        return await dispatcher.run(lambda client: client.score(tokens, len(sample.prompt_ids)))

    try:
        return list(await asyncio.gather(*(one(s) for s in samples)))
    finally:
        await dispatcher.close()
