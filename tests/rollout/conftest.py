"""Fixtures for the local HF server tests: tiny checkpoints and real server subprocesses on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """A `python -m rollout.hf_server` subprocess and a tiny blocking JSON client for it."""

    def __init__(self, model_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_path = model_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollout.hf_server", "--model-path", str(model_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--num-threads", "1", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"hf_server did not start: {self.proc.stderr.read().decode()[-3000:]}")
                time.sleep(0.2)

    def post(self, path: str, body: Any, timeout: float = 120) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        status, reply = self.post("/generate", body)
        assert status == 200, reply
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_server_models")
    tok = build_char_tokenizer()
    return {"moe": create_tiny_model(root / "moe", tok, arch="qwen3_moe"),
            "moe_b": create_tiny_model(root / "moe_b", tok, arch="qwen3_moe", seed=7),
            "dense": create_tiny_model(root / "dense", tok, arch="qwen3")}


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path]) -> Iterator[dict[str, ServerProc]]:
    """Started together so their start-ups overlap: MoE with R3, MoE without, dense."""
    procs = {"r3": ServerProc(tiny_models["moe"], "--enable-return-routed-experts", "--max-batch-size", "16"),
             "plain": ServerProc(tiny_models["moe"], "--max-context-len", "1024"),
             "dense": ServerProc(tiny_models["dense"])}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()
