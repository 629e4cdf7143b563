"""The local engine's persistent batch cache (rollout/hf_server_batch_kv.py) changes no request's numbers.

Every fed position's logits equal the request's solo forward while requests join, leave, arrive with
a session's cache, feed drafts and keep only a prefix (speculative rejection), and the batch cache
stays bounded; over HTTP, greedy and seeded-sampling requests arriving and finishing at different
times, a session child and an aborted request give the tokens and logprobs of their solo runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from mopd.toy.models import create_toy_mimo
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.hf_server import HFServer, parse_args
from rollout.hf_server_batch_kv import RowKV
from rollout.hf_server_model import ModelRunner, StepInput


@pytest.fixture(scope="module")
def mimo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sliding-window layers (window 5) and attention sinks: masks built from positions."""
    return create_toy_mimo(tmp_path_factory.mktemp("mimo") / "m", build_char_tokenizer(), mtp_layers=1,
                           num_layers=4, sliding_window=5)


class Replay:
    """Requests with fixed token sequences fed step by step; every fed row is checked against a solo forward."""

    def __init__(self, runner: ModelRunner, seqs: dict[str, list[int]]) -> None:
        self.runner, self.seqs = runner, seqs
        self.solo = {name: runner.step([StepInput(kv=None, kv_len=0, new_ids=s, want_logits=True)])[0]
                     for name, s in seqs.items()}
        self.kv: dict[str, Any] = {}
        self.kv_len = dict.fromkeys(seqs, 0)
        self.widths: list[tuple[int, int]] = []  # (batch cache width, longest request) after each step

    def step(self, feeds: dict[str, int], keep: dict[str, int] | None = None) -> None:
        names = list(feeds)
        outs = self.runner.step([StepInput(kv=self.kv.get(n), kv_len=self.kv_len[n], want_logits=True,
                                           new_ids=self.seqs[n][self.kv_len[n]:self.kv_len[n] + feeds[n]])
                                 for n in names])
        for n, out in zip(names, outs):
            start = self.kv_len[n]
            want = self.solo[n].logits[start:start + feeds[n]]  # type: ignore[index]
            torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0, msg=f"request {n} at {start}")
            kept = (keep or {}).get(n, feeds[n])
            self.kv[n] = out.kv.prefix(start + kept)
            self.kv_len[n] = start + kept
        state = outs[0].kv.state
        self.widths.append((int(state.kpos.shape[1]), max(state.lengths)))


@pytest.mark.parametrize("name", ["moe", "mimo"])
def test_joins_leaves_session_cache_and_rejected_drafts_equal_solo(name: str, tiny_models: dict[str, Path],
                                                                   mimo: Path) -> None:
    runner = ModelRunner.load(str(mimo if name == "mimo" else tiny_models["moe"]), capture_routing=name == "moe")
    g = torch.Generator().manual_seed(0)
    seqs = {n: torch.randint(5, 60, (length,), generator=g).tolist()
            for n, length in {"a": 60, "b": 12, "c": 30, "d": 20, "e": 90}.items()}
    r = Replay(runner, seqs)
    r.step({"a": 10, "b": 4})  # two prompts of different widths: padding queries
    for _ in range(3):
        r.step({"a": 1, "b": 1})
    r.step({"c": 7})  # a prefill alone: a and b stay in the previous step's cache
    r.step({"a": 1, "b": 1, "c": 1})  # rows of two steps' caches in one forward
    r.step({"a": 1, "c": 1})  # b left
    parent = runner.step([StepInput(kv=None, kv_len=0, new_ids=seqs["d"][:6])])[0]
    r.kv["d"], r.kv_len["d"] = [(k[:, :5], v[:, :5]) for k, v in parent.kv], 5  # a session child's cache
    r.step({"c": 1, "d": 4, "a": 1})
    for _ in range(25):  # speculative steps: feed 4, keep 1 (rejected drafts leave masked columns)
        r.step({"a": 1, "e": 4}, keep={"e": 1})
    assert all(width <= longest + 32 + longest // 2 + 4 for width, longest in r.widths), r.widths
    assert any(width - longest > 24 for width, longest in r.widths), "no masked columns accumulated"
    own = r.kv["a"]
    assert isinstance(own, RowKV)
    solo = runner.step([StepInput(kv=None, kv_len=0, new_ids=seqs["a"][:r.kv_len["a"]])])[0]
    for (k, v), (sk, sv) in zip(own, solo.kv):
        torch.testing.assert_close(k, sk, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, sv, atol=1e-5, rtol=0)


def _body(prompt: list[int], n: int, **extra: Any) -> dict[str, Any]:
    sampling = {"max_new_tokens": n, "ignore_eos": True, "temperature": 0.0}
    if "seed" in extra:
        sampling.update(temperature=1.0, sampling_seed=extra.pop("seed"))
    return {"input_ids": prompt, "return_logprob": True, "sampling_params": sampling, **extra}


def test_requests_joining_leaving_child_and_abort_equal_solo_runs(tiny_models: dict[str, Path]) -> None:
    bodies = [_body([12, 40, 41, 42, 9], 30), _body([13, 44, 45], 6, seed=11), _body([14, 46, 47, 48, 49, 50, 51], 12),
              _body([15, 52], 20, seed=12), _body([16, 53, 54, 55], 3), _body([17, 56, 57, 58, 59], 16, seed=13)]
    long_body = _body([18, 30, 31, 32], 400, rid="long")

    async def scenario() -> tuple[list[dict], list[dict], dict, dict]:
        server = HFServer(parse_args(["--model-path", str(tiny_models["moe"]), "--max-context-len", "512"]))
        async with TestClient(TestServer(server.app())) as client:
            async def gen(body: dict[str, Any]) -> dict[str, Any]:
                resp = await client.post("/generate", json=body)
                assert resp.status == 200, await resp.text()
                return await resp.json()

            sid = await (await client.post("/open_session", json={"capacity_of_str_len": 4096})).json()
            parent = await gen(_body([19, 33, 34, 35], 5, session_params={"id": sid}))
            child = _body([36, 37], 8, session_params={"id": sid, "rid": parent["meta_info"]["id"]}, seed=14)
            solo = [await gen(b) for b in [*bodies, child]]
            solo_long = await gen({**long_body, "rid": "long-solo"})
            tasks = [asyncio.create_task(gen(long_body))]
            for b in [*bodies, child]:  # arrive one by one while the others decode
                tasks.append(asyncio.create_task(gen(b)))
                await asyncio.sleep(0.03)
            await asyncio.sleep(0.1)
            assert (await client.post("/abort_request", json={"rid": "long"})).status == 200
            replies = list(await asyncio.gather(*tasks))
        return solo, replies[1:], solo_long, replies[0]

    solo, together, solo_long, aborted = asyncio.run(scenario())
    for a, b in zip(together, solo):
        assert a["output_ids"] == b["output_ids"]
        np.testing.assert_allclose([e[0] for e in a["meta_info"]["output_token_logprobs"]],
                                   [e[0] for e in b["meta_info"]["output_token_logprobs"]], atol=1e-5)
    assert together[-1]["meta_info"]["cached_tokens"] > 0  # the child started from its parent's cache
    assert aborted["meta_info"]["finish_reason"] == {"type": "abort"}
    n = len(aborted["output_ids"])
    assert 0 < n < 400
    assert aborted["output_ids"] == solo_long["output_ids"][:n]
    np.testing.assert_allclose([e[0] for e in aborted["meta_info"]["output_token_logprobs"]],
                               [e[0] for e in solo_long["meta_info"]["output_token_logprobs"][:n]], atol=1e-5)
