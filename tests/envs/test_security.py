"""Containment of hostile code in local sandboxes. Each attack runs only when the mechanism that
contains it is proven active (probe + a harmless check first); otherwise it is skipped with why.
Limits are tight and timeouts short so the shared 2-core host is never at risk."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from envs.config import SandboxConfig
from envs.sandbox.agent import uid_pids
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
        r = await sb.exec(":(){ :|:& };:; sleep 3", timeout=4)  # the shell stays while the bomb grows
        assert time.monotonic() - t0 < 20
        assert r.timed_out or "Resource temporarily unavailable" in r.output or "retry" in r.output, r
        assert uid_pids(sb.info["uid"]) == []  # nothing of the bomb outlives the call
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


@pytest.mark.skipif(not ISO.ipc_ns, reason="IPC namespaces are not permitted on this host")
async def test_ipc_objects_neither_shared_nor_surviving(backend):
    """SysV shm and message queues made by a command are invisible to other sandboxes and to the host,
    and gone after the call (each command has its own IPC namespace)."""
    a, b = await backend.create(), await backend.create()
    try:
        r = await a.exec("ipcmk -M 4096 && ipcmk -Q && ipcs -m -q | grep -c '^0x'", timeout=10)
        assert r.output.strip().endswith("2"), r.output
        again = await a.exec("ipcs -m -q | grep -c '^0x'", timeout=10)
        other = await b.exec("ipcs -m -q | grep -c '^0x'", timeout=10)
        assert again.output.strip() == "0" and other.output.strip() == "0", (again, other)
        host = subprocess.run(["ipcs", "-m", "-q"], capture_output=True, text=True).stdout
        assert str(a.info["uid"]) not in host
    finally:
        await a.close()
        await b.close()


@pytest.mark.skipif(not (ISO.pid_ns and ISO.setuid), reason="no PID namespace or no uid switch here")
async def test_sandbox_cannot_see_or_read_another(backend):
    """No sibling's processes or command lines (PID namespace), and no way into its files (the work
    dir is 0700 and owned by that sandbox's uid), even knowing the path."""
    a, b = await backend.create(), await backend.create()
    try:
        await a.write_file("secret.txt", "MOPD-SECRET-A\n")
        running = asyncio.ensure_future(a.exec("sleep 5 # MARKER-A-CMDLINE", timeout=10))
        await asyncio.sleep(0.5)
        r = await b.exec(
            f"cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '; ps -eo args; cat {a.info['dir']}/secret.txt;"
            f" ls {a.info['dir']} {os.path.dirname(a.info['dir'])};"
            " find / -name 'secr*' -exec cat {} + 2>/dev/null",
            timeout=15,
        )
        assert "MARKER-A-CMDLINE" not in r.output and "MOPD-SECRET-A" not in r.output, r.output
        mode = os.stat(a.info["dir"]).st_mode & 0o777
        assert mode == 0o700 and os.stat(a.info["dir"]).st_uid == a.info["uid"]
        await running
    finally:
        await a.close()
        await b.close()


@pytest.mark.skipif(not ISO.disk_quota, reason="cannot mount a size-limited tmpfs here (not root)")
async def test_disk_quota_for_the_whole_work_dir(sandbox_base):
    """Many files, each under RLIMIT_FSIZE, cannot fill the host disk: the work dir holds disk_mb."""
    backend = LocalSandboxBackend(SandboxConfig(base_dir=sandbox_base, disk_mb=24, file_size_mb=16))
    sb = await backend.create()
    try:
        r = await sb.exec(
            "for i in 1 2 3 4; do dd if=/dev/zero of=f$i bs=1M count=10 2>&1; done; du -sm . | cut -f1",
            timeout=20,
        )
        assert "No space left" in r.output, r.output
        assert int(r.output.split()[-1]) <= 24
        r = await sb.exec(
            "rm -f f*; for i in $(seq 6000); do : > n$i || break; done 2>&1 | tail -1", timeout=30
        )
        assert "No space left" in r.output, r.output  # the inode cap too
    finally:
        await sb.close()


def _host_procs_matching(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read().replace(b"\0", b" "):
                        found.append(int(entry))
            except OSError:
                pass
    return found


async def test_pod_mode_kills_daemons_that_left_the_group(pod_sandbox):
    """Pod mode (no namespaces, agent and commands may share a uid): setsid, double fork, nohup and
    disown children are still killed with the call (the jail is a child subreaper; the agent too)."""
    tag = f"31{os.getpid() % 97:02d}"
    r = await pod_sandbox.exec(
        f"setsid sleep {tag}1 & (sleep {tag}2 &); (setsid sh -c 'sleep {tag}3 &' &);"
        f" nohup sleep {tag}4 >/dev/null 2>&1 & disown; echo started",
        timeout=10,
    )
    assert "started" in r.output
    r = await pod_sandbox.exec(f"setsid sleep {tag}5 & sleep 60", timeout=1)
    assert r.timed_out
    await asyncio.sleep(0.3)
    assert _host_procs_matching(f"sleep {tag}") == []


async def test_pod_mode_token_is_unreadable_to_commands(pod_sandbox):
    """The token never sits in the agent's environment or in a file, and the agent is not dumpable:
    /proc/<agent>/environ and /mem and ptrace are refused to commands of the same uid."""
    token, pod_dir = pod_sandbox.info["token"], pod_sandbox.info["dir"]
    probe = (
        "import ctypes, os\n"
        "for p in [d for d in os.listdir('/proc') if d.isdigit()]:\n"
        "    try: cmd = open(f'/proc/{p}/cmdline','rb').read()\n"
        "    except OSError: continue\n"
        "    if b'agent.py' in cmd and b'jail.py' not in cmd and int(p) != os.getpid():\n"
        "        try: open(f'/proc/{p}/mem','rb'); print('MEMOPEN')\n"
        "        except OSError as e: print('mem refused', e.errno)\n"
        "        libc = ctypes.CDLL(None, use_errno=True)\n"
        "        if libc.ptrace(16, int(p), 0, 0) == 0: print('PTRACED')\n"
    )
    await pod_sandbox.write_file("probe.py", probe)
    r = await pod_sandbox.exec(
        "for p in /proc/[0-9]*; do cat $p/environ $p/cmdline 2>/dev/null | tr '\\0' '\\n'; done;"
        f" cat {pod_dir}/run/token /run/mopd/token 2>&1; id; python3 probe.py",
        timeout=15,
    )
    assert token not in r.output and "MEMOPEN" not in r.output and "PTRACED" not in r.output, r.output
    assert "mem refused" in r.output, r.output  # the probe found the agent


@pytest.mark.skipif(not ISO.setuid, reason="not root: no pod running as root to emulate")
async def test_pod_mode_as_root_runs_commands_as_another_uid(sandbox_base):
    """An agent running as root without a jail (a pod that runs as root) gives commands
    `--command-uid`: they cannot read the agent's /proc entries or signal it."""
    import secrets as _secrets

    from envs.sandbox.client import AgentClient
    from envs.sandbox.local import AGENT

    token, uid = _secrets.token_urlsafe(32), 265432
    root = os.path.join(sandbox_base, "rootpod")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            AGENT,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--root",
            root,
            "--token-file",
            "-",
            "--command-uid",
            str(uid),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=True,
    )
    proc.stdin.write(token.encode() + b"\n")
    proc.stdin.close()
    port = int(proc.stdout.readline().split()[1])
    client = AgentClient(f"http://127.0.0.1:{port}", token)
    try:
        r = await client.call(
            "/exec",
            {
                "command": f"id -u; cat /proc/{proc.pid}/environ /proc/{proc.pid}/mem;"
                f" kill -9 {proc.pid}; echo x > f"
            },
        )
        assert r["output"].splitlines()[0] == str(uid) and token not in r["output"], r
        assert proc.poll() is None and os.stat(os.path.join(root, "f")).st_uid == uid
        assert uid_pids(uid) == []
    finally:
        await client.close()
        proc.kill()
        proc.wait()
