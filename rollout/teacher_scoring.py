"""Teacher scoring: one prefill of prompt + response per sample, returning the response tokens' logprobs."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from mopd.core.types import Sample, TokenScores
from rollout.dispatch import Dispatcher


class KeptDispatchers:
    """Dispatchers that outlive one score_samples call, one per teacher (URLs and retry settings), on one event
    loop: the sequence scheduler scores group by group, and a new Dispatcher per group opened a TCP connection
    per sample (8% of the driver's CPU in benchmarks/scheduler). Close them on the loop that used them."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, Dispatcher] = {}

    def get(self, urls: list[str], **settings: float) -> Dispatcher:
        key = (tuple(urls), *sorted(settings.items()))
        if key not in self._by_key:
            self._by_key[key] = Dispatcher(urls, **settings)  # type: ignore[arg-type]
        return self._by_key[key]

    async def close(self) -> None:
        kept, self._by_key = list(self._by_key.values()), {}
        for dispatcher in kept:
            await dispatcher.close()


# Set by a caller that scores repeatedly on one loop (mopd/dynamic_sampling.py's GroupScorer); unset, every
# call makes and closes its own Dispatcher (the batch path runs each step in a fresh asyncio.run loop).
kept_dispatchers: ContextVar[KeptDispatchers | None] = ContextVar("kept_dispatchers", default=None)


async def score_samples(urls: list[str], samples: list[Sample], *, top_k: int = 0, timeout_s: float = 300.0,
                        max_retries: int = 3, retry_window_s: float = 300.0) -> list[TokenScores]:
    """log pi_teacher(y_t | x, y_<t) for every response token (and the teacher's top-k tokens there, when
    top_k > 0), load-balanced over the teacher's engines. Each prefill may take `timeout_s`; a failed one
    is re-sent at most `max_retries` times within `retry_window_s` (a dead replica restarts meanwhile)."""
    kept = kept_dispatchers.get()
    settings = {"timeout_s": timeout_s, "max_retries": max_retries, "retry_window_s": retry_window_s}
    dispatcher = kept.get(urls, **settings) if kept is not None else Dispatcher(urls, **settings)  # type: ignore[arg-type]

    async def one(sample: Sample) -> TokenScores:
        if not sample.response_ids:
            return TokenScores(logprobs=[], top_ids=[] if top_k else None, top_logprobs=[] if top_k else None)
        tokens = sample.prompt_ids + sample.response_ids
        return await dispatcher.run(lambda client: client.score_top_k(tokens, len(sample.prompt_ids), top_k))

    try:
        return list(await asyncio.gather(*(one(s) for s in samples)))
    finally:
        if kept is None:
            await dispatcher.close()
