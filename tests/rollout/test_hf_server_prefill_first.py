"""The local server's step order is SGLang's: a prefill runs in its own forward, never padded into decodes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient, TestServer

from rollout.hf_server import HFServer, parse_args

PROMPT = [12, 40, 41, 42, 9, 50, 51, 52, 53]


def body(prompt: list[int], n: int) -> dict[str, Any]:
    return {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}


def test_prefills_join_running_decodes_in_their_own_forward(tiny_models: dict[str, Path]) -> None:
    """Requests arriving while another decodes: every forward is all-prefill or all-decode, the decoding
    request is not held back for more than one forward per arrival, and every output equals its solo run."""
    late = [body(PROMPT[:3 + i] + [60 + i] * (4 + 3 * i), 8) for i in range(3)]
    first = body(PROMPT, 40)

    async def scenario() -> tuple[list[dict], list[dict], list[list[int]]]:
        server = HFServer(parse_args(["--model-path", str(tiny_models["moe"]), "--max-context-len", "256"]))
        widths: list[list[int]] = []
        step = server.runner.step

        def recording_step(inputs: list[Any]) -> Any:
            widths.append([len(x.new_ids) for x in inputs])
            return step(inputs)

        server.runner.step = recording_step  # the real forward, recorded (the scheduler holds this runner)
        async with TestClient(TestServer(server.app())) as client:
            solo = [await (await client.post("/generate", json=b)).json() for b in [first, *late]]
            widths.clear()
            running = asyncio.create_task(client.post("/generate", json=first))
            while len(widths) < 3:  # the first request is decoding
                await asyncio.sleep(0.005)
            together = [running]
            for b in late:
                together.append(asyncio.create_task(client.post("/generate", json=b)))
                await asyncio.sleep(0.02)
            replies = [await (await t).json() for t in together]
        return solo, replies, widths

    solo, replies, widths = asyncio.run(scenario())
    for a, b in zip(replies, solo):
        assert a["output_ids"] == b["output_ids"]
        np.testing.assert_allclose([e[0] for e in a["meta_info"]["output_token_logprobs"]],
                                   [e[0] for e in b["meta_info"]["output_token_logprobs"]], atol=1e-5)
    mixed = [w for w in widths if 1 in w and max(w) > 1]
    assert not mixed, f"forwards mixing a prefill with decodes: {mixed}"
    prefills_between_decodes = [i for i in range(1, len(widths) - 1)
                                if max(widths[i]) > 1 and widths[i - 1] == [1] * len(widths[i - 1])]
    assert prefills_between_decodes, f"no prefill arrived while a request was decoding: {widths}"
