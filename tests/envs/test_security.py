"""Containment of hostile code in local sandboxes. Each attack runs only when the mechanism that
contains it is proven active (probe + a harmless check first); otherwise it is skipped with why.
Limits are tight and timeouts short so the shared 2-core host is never at risk."""

from __future__ import annotations

import os
import time

import pytest

from envs.config import SandboxConfig
from envs.sandbox.isolation import detect
from envs.sandbox.local import LocalSandboxBackend

pytestmark = pytest.mark.asyncio
ISO = detect()


async def _other_sandbox_still_works(backend) -> None:
    other = await backend.create()
    try:
        r = await other.exec("echo ok", timeout=10)
        assert r.ok and r.output.strip() == "ok"
    finally:
        await other.close()


@pytest.mark.skipif(
    not (ISO.setuid or ISO.fs_readonly),
    reason="neither a uid switch nor a read-only mount namespace is available here",
)
async def test_cannot_write_outside_the_sandbox(sandbox, sandbox_base):
    victims = [
        "/tmp/mopd-escape-test",
        os.path.join(sandbox_base, "escape"),
        "/etc/mopd-escape",
        os.path.join(os.getcwd(), "mopd-escape"),
    ]
    cmd = "; ".join(f"echo x > {v} 2>/dev/null && echo WROTE {v}" for v in victims)
    r = await sandbox.exec(cmd + "; echo inside > ok.txt; cat ok.txt")
    assert "WROTE" not in r.output and "inside" in r.output
    assert not any(os.path.exists(v) for v in victims)
    if ISO.fs_readonly:
        r = await sandbox.exec("ls /root | wc -l")
        assert r.output.strip() in ("0", "1")  # /root is hidden (only the python install re-exposed)


@pytest.mark.skipif(not ISO.no_network, reason="network namespaces are not permitted on this host")
async def test_no_network(sandbox):
    r = await sandbox.exec(
        'python3 -c "import socket; s=socket.socket(); s.settimeout(2); '
        "s.connect(('127.0.0.1', %d)); print('CONNECTED')\"" % int(sandbox.client.base_url.rsplit(":", 1)[1]),
        timeout=10,
    )
    assert "CONNECTED" not in r.output and r.exit_code != 0
    assert "unreachable" in r.output.lower() or "refused" in r.output.lower()


async def test_fork_bomb_is_contained(backend, sandbox_config):
    if not (ISO.pids_cgroup or ISO.setuid):
        pytest.skip(
            "no pids cgroup and no per-sandbox uid: RLIMIT_NPROC does not bind root, not running a fork bomb"
        )
    sb = await backend.create()
    try:
        # prove the limit first, harmlessly: more than max_procs sleeping children must fail to spawn
        probe = await sb.exec(
            f"for i in $(seq {sandbox_config.max_procs + 10}); do sleep 5 & done 2>&1; echo spawned",
            timeout=15,
        )
        assert "Resource temporarily unavailable" in probe.output or "retry" in probe.output, probe.output[
            -300:
        ]
        t0 = time.monotonic()
        r = await sb.exec(":(){ :|:& };:", timeout=4)
        assert time.monotonic() - t0 < 20
        assert r.timed_out or "Resource temporarily unavailable" in r.output or "retry" in r.output, r
        assert (await sb.exec("echo survived", timeout=10)).output.strip() == "survived"
    finally:
        await sb.close()
    await _other_sandbox_still_works(backend)


async def test_memory_bomb_is_contained(sandbox, backend):
    r = await sandbox.exec('python3 -c "b=[]\nwhile True: b.append(bytearray(64<<20))"', timeout=20)
    assert r.exit_code != 0 and ("MemoryError" in r.output or r.killed_reason), r
    await _other_sandbox_still_works(backend)


async def test_endless_output_and_sleep_are_contained(sandbox, backend):
    r = await sandbox.exec("cat /dev/zero | tr '\\0' 'a'", timeout=20, max_output=10000)
    assert r.killed_reason == "output_limit" and len(r.output) == 10000
    t0 = time.monotonic()
    r = await sandbox.exec("sleep infinity", timeout=1)
    assert r.timed_out and time.monotonic() - t0 < 10
    assert (await sandbox.exec("echo fine", timeout=10)).output.strip() == "fine"
    await _other_sandbox_still_works(backend)


async def test_cpu_time_limit(sandbox_base):
    backend = LocalSandboxBackend(SandboxConfig(cpu_time_s=1, base_dir=sandbox_base))
    sb = await backend.create()
    try:
        r = await sb.exec("python3 -c 'while True: pass'", timeout=30)
        assert r.exit_code != 0 and not r.timed_out and r.duration_s < 15  # SIGXCPU/SIGKILL at 1 s of CPU
    finally:
        await sb.close()


async def test_strict_mode_reports_missing_mechanisms(sandbox_base):
    try:
        backend = LocalSandboxBackend(SandboxConfig(isolation="strict", base_dir=sandbox_base))
    except Exception as exc:  # missing mechanisms are named
        assert "cannot be enforced" in str(exc)
    else:
        assert backend.isolation.setuid and backend.isolation.no_network and backend.isolation.fs_readonly
