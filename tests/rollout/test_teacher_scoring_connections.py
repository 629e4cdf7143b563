"""Teacher scoring group after group (the sequence scheduler's GroupScorer) reuses its keep-alive connections
to a real local engine instead of opening new ones per group, and closes them when the scorer closes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mopd.core.types import Sample
from rollout.teacher_scoring import KeptDispatchers, kept_dispatchers, score_samples
from tests.rollout.conftest import ServerProc


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> Iterator[ServerProc]:
    proc = ServerProc(tiny_models["dense"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _client_ports(server_port: int) -> set[int]:
    """Remote ports of the ESTABLISHED TCP connections the server's port holds (/proc/net/tcp, IPv4)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if state == "01" and int(local.split(":")[1], 16) == server_port:
            ports.add(int(remote.split(":")[1], 16))
    return ports


def _group(n: int = 4) -> list[Sample]:
    return [Sample(prompt_index=0, group_index=0, domain="arith", prompt_ids=[1, 2, 3], response_ids=[4, 5, 6 + i])
            for i in range(n)]


def test_kept_dispatchers_reuse_connections_across_groups(engine: ServerProc) -> None:
    async def run() -> tuple[list[set[int]], set[int], list[list[float]]]:
        kept = KeptDispatchers()
        seen: list[set[int]] = []
        logprobs: list[list[float]] = []
        token = kept_dispatchers.set(kept)
        try:
            for _ in range(5):
                scores = await score_samples([engine.url], _group())
                logprobs.append(scores[0].logprobs)
                seen.append(_client_ports(engine.port))
        finally:
            kept_dispatchers.reset(token)
        await kept.close()
        await asyncio.sleep(0.2)  # the server notices the closes
        return seen, _client_ports(engine.port), logprobs

    seen, after_close, logprobs = asyncio.run(run())
    assert all(seen), "connections are kept open between groups"
    assert set.union(*seen) == seen[0] and len(seen[0]) <= 4, seen  # the same connections, reused
    assert not after_close
    assert all(lp == logprobs[0] and len(lp) == 3 for lp in logprobs)


def test_without_kept_dispatchers_each_call_closes_its_connections(engine: ServerProc) -> None:
    async def run() -> set[int]:
        await score_samples([engine.url], _group())
        await asyncio.sleep(0.2)
        return _client_ports(engine.port)

    assert not asyncio.run(run())
