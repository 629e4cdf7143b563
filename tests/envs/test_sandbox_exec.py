"""Commands through the fork server behave exactly like a jail process per call (``exec_mode``).

Each call gets fresh confinement in both modes: files in the work dir persist between calls, while
the cwd, environment variables, ``/dev/shm``, IPC objects and processes do not (``/tmp`` is
read-only; ``$TMPDIR`` is ``.tmp`` in the work dir and persists like any file there). A fork server that dies
is restarted on the next call, with the work dir intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import time

import pytest
import pytest_asyncio

from envs.sandbox.local import LocalSandboxBackend

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(params=["forkserver", "process"])
async def sandbox(request, sandbox_config):
    sb = await LocalSandboxBackend(sandbox_config, exec_mode=request.param).create()
    yield sb
    await sb.close()


def _forkservers(agent_pid: int) -> list[int]:
    """Pids of the fork servers the agent runs (its children whose command line names the file)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == agent_pid and b"forkserver.py" in cmd:
                out.append(int(entry))
    return out


async def test_what_persists_between_calls(sandbox):
    first = await sandbox.exec(
        "echo kept > file.txt; mkdir -p sub; cd sub; export MARK=1; echo gone > /dev/shm/t;"
        " ipcmk -M 64 > /dev/null;"
        " (sleep 30; echo late > late.txt) & echo started",
        timeout=20,
    )
    assert first.ok and first.output.strip() == "started", first
    second = await sandbox.exec(
        "cat file.txt; pwd; echo mark=${MARK:-unset}; ls /dev/shm | wc -l;"
        " ipcs -m | grep -c ^0x;"
        " ps -e -o comm= | grep -c sleep",
        timeout=20,
    )
    kept, cwd, mark, shm, ipc, sleepers = second.output.split()
    assert (kept, cwd, mark) == ("kept", sandbox.info["dir"], "mark=unset")
    assert (shm, ipc, sleepers) == ("0", "0", "0"), second.output


async def test_timeout_kills_the_call_and_the_sandbox_survives(sandbox):
    r = await sandbox.exec("echo x > a; (sleep 60 &); sleep 60", timeout=1)
    assert r.timed_out and r.killed_reason == "timeout"
    after = await sandbox.exec("cat a; ps -e -o comm= | grep -c sleep", timeout=20)
    assert after.output.split() == ["x", "0"], after


async def test_output_limit_exit_codes_and_signals_match(sandbox):
    flood = await sandbox.exec("yes", timeout=20, max_output=1000)
    assert flood.truncated and flood.killed_reason == "output_limit" and len(flood.output) == 1000
    assert (await sandbox.exec("exit 7", timeout=20)).exit_code == 7
    killed = await sandbox.exec("kill -TERM $$", timeout=20)
    assert killed.exit_code == -signal.SIGTERM and killed.killed_reason == "signal SIGTERM"
    both = await sandbox.exec("echo out; echo err >&2", timeout=20)
    assert both.output == "out\nerr\n"


async def test_concurrent_calls_of_one_sandbox(sandbox):
    results = await asyncio.gather(*(sandbox.exec(f"sleep 0.3; echo {i}", timeout=20) for i in range(4)))
    assert [r.output.strip() for r in results] == ["0", "1", "2", "3"]


async def test_one_long_lived_fork_server_restarted_when_killed(sandbox_config):
    sb = await LocalSandboxBackend(sandbox_config).create()
    try:
        agent = sb.info["agent_pid"]
        await sb.exec("echo a > kept.txt", timeout=20)
        servers = _forkservers(agent)
        assert len(servers) == 1
        await sb.exec("true", timeout=20)
        assert _forkservers(agent) == servers  # the same process serves every call
        os.kill(servers[0], signal.SIGKILL)
        r = await sb.exec("cat kept.txt", timeout=20)
        assert r.ok and r.output == "a\n", r
        restarted = _forkservers(agent)
        assert len(restarted) == 1 and restarted != servers
    finally:
        await sb.close()


def _pids_max(cgroup: str) -> int:
    with open(os.path.join(cgroup, "pids.max")) as f:
        return int(f.read())


def _owners(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            out.add(os.stat(f"/proc/{pid}").st_uid)
        except FileNotFoundError:
            pass
    return out


async def test_fork_server_lives_in_the_cgroups_and_survives_the_sweeps(sandbox_config):
    """Jails are born in the sandbox's cgroups (no per-call join, envs/sandbox/forkserver.py); the
    fork server does not count against max_procs, and the sweep after a killed call spares it (and
    the ready jail it builds afterwards) but leaves nothing of the command."""
    from envs.sandbox.jail import cgroup_pids, descendants

    sb = await LocalSandboxBackend(sandbox_config).create()
    try:
        cgroups = sb.info["jail"]["cgroups"]
        if not cgroups:
            pytest.skip("no writable pids or memory cgroup on this host")
        await sb.exec("true", timeout=20)
        (server,) = _forkservers(sb.info["agent_pid"])
        r = await sb.exec("cat /proc/self/cgroup", timeout=20)
        assert all(cg.rsplit("/", 1)[1] in r.output for cg in cgroups), r
        limits = [_pids_max(cg) for cg in cgroups if os.path.exists(os.path.join(cg, "pids.max"))]
        assert all(n == sandbox_config.max_procs + 1 for n in limits), limits
        killed = await sb.exec("(sleep 60 &); sleep 60", timeout=1)
        assert killed.killed_reason == "timeout"
        assert _forkservers(sb.info["agent_pid"]) == [server]
        for cg in cgroups:
            left = cgroup_pids(cg)
            assert server in left and set(left) <= {server, *descendants(server)}, left
            assert sb.info["uid"] not in _owners(left), left  # ready jails are root until their command
    finally:
        await sb.close()


async def test_ready_jail_is_used_once_and_a_lost_one_is_replaced(sandbox_config):
    """The fork server builds the next command's jail ahead of time (envs/sandbox/forkserver.py):
    each command gets its own; killing a ready jail costs nothing but the head start."""
    from envs.sandbox.jail import descendants

    sb = await LocalSandboxBackend(sandbox_config).create()
    try:
        first = await sb.exec("echo $$ > pid1; touch marker", timeout=20)
        assert first.ok, first
        (server,) = _forkservers(sb.info["agent_pid"])
        for _ in range(100):  # the next jail is built after the reply
            ready = descendants(server)
            if len(ready) == 2:  # the jail and its child waiting for the command
                break
            await asyncio.sleep(0.05)
        assert len(ready) == 2 and _owners(ready) == {0}, ready
        second = await sb.exec("ls; id -u", timeout=20)
        assert second.ok and "marker" in second.output and second.output.split()[-1] == str(sb.info["uid"])
        for pid in ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # the ready jail built after the second call: kill it too
            again = [p for p in descendants(server) if p not in ready]
            if len(again) == 2:
                break
            await asyncio.sleep(0.05)
        for pid in again:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        third = await sb.exec("cat marker && echo ok", timeout=20)
        assert third.ok and third.output == "ok\n", third
    finally:
        await sb.close()


async def test_warm_sandbox_created_with_the_task_snapshot(sandbox_config):
    """A warm pool can start sandboxes that already hold a task's files: no upload at session start."""
    from envs.swe.task import builtin_tasks

    snapshot = builtin_tasks()[0].snapshot_dir
    sb = await LocalSandboxBackend(sandbox_config).create(snapshot=snapshot)
    try:
        assert sb.info["snapshot"] == os.path.realpath(snapshot)
        r = await sb.exec("grep -c tomat inflection/__init__.py; stat -c %u inflection/__init__.py; id -u")
        count, owner, uid = r.output.split()
        assert int(count) > 0 and owner == uid, r
    finally:
        await sb.close()


def _two_requests(port: int, token: str) -> tuple[int, int, bytes]:
    """A refused request with a body, then a good one, over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    body = json.dumps({"command": "echo hi"})
    conn.request("POST", "/exec", body, {"Authorization": "Bearer wrong-token-xxxxxxxxxx"})
    refused = conn.getresponse()
    refused.read()
    conn.request("POST", "/exec", body, {"Authorization": f"Bearer {token}"})
    ok = conn.getresponse()
    return refused.status, ok.status, ok.read()


async def test_refused_body_is_not_read_as_the_next_request(sandbox):
    token = sandbox.client._headers["Authorization"].split(" ", 1)[1]
    refused, ok, data = await asyncio.to_thread(_two_requests, sandbox.info["port"], token)
    assert (refused, ok) == (401, 200) and json.loads(data)["output"] == "hi\n"


@pytest.mark.parametrize("pidfd", [True, False])
def test_process_wait_with_and_without_a_pidfd(pidfd):
    """Process mode waits on a pidfd; without one (Python 3.8 pod images, old kernels) it polls."""
    from envs.sandbox.agent import Process

    proc = Process(subprocess.Popen(["sleep", "0.5"], stdout=subprocess.PIPE))
    if not pidfd:
        os.close(proc._pidfd)
        proc._pidfd = None
    t0 = time.monotonic()
    assert not proc.wait(0.05) and proc.returncode is None
    assert proc.wait(5.0) and proc.returncode == 0
    assert 0.4 < time.monotonic() - t0 < 3.0
    proc.close()
