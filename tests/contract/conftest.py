"""Fixtures for the SGLang contract suite: a real local engine server and a recording reverse proxy in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract_recording import RecordingProxy, ServerProc

from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("contract") / "moe", build_char_tokenizer(), arch="qwen3_moe")


@pytest.fixture(scope="module")
def server(moe_model: Path) -> Iterator[Any]:
    """The local engine with routed experts on (the MoE + R3 configuration mopd uses in production)."""
    proc = ServerProc(moe_model, "--enable-return-routed-experts", "--max-batch-size", "16")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def proxy(server: Any) -> Iterator[RecordingProxy]:
    rec = RecordingProxy(server.url, model_path=server.model_path)
    rec.start()
    try:
        yield rec
    finally:
        rec.stop()
