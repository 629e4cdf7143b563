"""Fixtures for environment and sandbox tests: a local sandbox backend in a private base dir."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import pytest_asyncio

from envs.config import SandboxConfig
from envs.sandbox.local import LocalSandboxBackend


@pytest.fixture
def sandbox_base():
    """A world-searchable base dir (pytest's tmp_path is 0700 and the sandbox uid could not enter it)."""
    path = tempfile.mkdtemp(prefix="mopd-sbtest-", dir="/tmp")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox_config(sandbox_base) -> SandboxConfig:
    return SandboxConfig(cpu_time_s=20, memory_mb=768, wall_timeout_s=30, max_output_bytes=65536, max_procs=48,
                         file_size_mb=16, base_dir=sandbox_base)


@pytest.fixture
def backend(sandbox_config) -> LocalSandboxBackend:
    return LocalSandboxBackend(sandbox_config)


@pytest_asyncio.fixture
async def sandbox(backend):
    sb = await backend.create()
    yield sb
    await sb.close()
