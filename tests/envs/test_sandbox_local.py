"""Local sandbox backend + agent: real processes, real HTTP on 127.0.0.1, real cleanup."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time

import aiohttp
import pytest

from envs.config import EnvConfig, SandboxConfig
from envs.sandbox.agent import uid_pids
from envs.sandbox.client import AgentClient, SandboxError
from envs.sandbox.local import sweep_stale
from mopd.core.errors import ConfigError

pytestmark = pytest.mark.asyncio


async def test_exec_files_and_upload(sandbox, tmp_path):
    r = await sandbox.exec("echo hello; echo err >&2; exit 3")
    assert r.exit_code == 3 and "hello" in r.output and "err" in r.output and not r.timed_out
    await sandbox.write_file("pkg/mod.py", "X = 41\n")
    r = await sandbox.exec(
        "python3 -c 'import sys; sys.path.insert(0, \"pkg\"); import mod; print(mod.X + 1)'"
    )
    assert r.output.strip() == "42", r
    assert await sandbox.read_file("pkg/mod.py") == "X = 41\n"
    (tmp_path / "snap" / "sub").mkdir(parents=True)
    (tmp_path / "snap" / "sub" / "a.txt").write_text("from tar")
    assert await sandbox.upload(str(tmp_path / "snap")) >= 2
    assert (await sandbox.exec("cat sub/a.txt")).output == "from tar"


async def test_token_is_required_and_paths_stay_inside(sandbox):
    bad = AgentClient(sandbox.client.base_url, "x" * 40)
    with pytest.raises(SandboxError) as exc:
        await bad.call("/exec", {"command": "true"})
    assert exc.value.status == 401
    await bad.close()
    for path in ("../../etc/passwd", "/etc/passwd"):
        with pytest.raises(SandboxError) as exc:
            await sandbox.read_file(path)
        assert exc.value.status == 403
    await sandbox.exec("ln -s /etc sneaky")
    with pytest.raises(SandboxError) as exc:
        await sandbox.read_file("sneaky/hostname")
    assert exc.value.status == 403
    with pytest.raises(SandboxError) as exc:
        await sandbox.client.call("/exec", {"command": 5})
    assert exc.value.status == 400 and "command" in str(exc.value)


async def test_tar_upload_cannot_escape(sandbox, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"pwned"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SandboxError) as exc:
        await sandbox.client.upload(buf.getvalue())
    assert exc.value.status in (400, 403)
    assert not os.path.exists(os.path.join(os.path.dirname(sandbox.info["dir"]), "..", "escaped.txt"))


async def test_timeout_and_output_cap_are_reported(sandbox):
    t0 = time.monotonic()
    r = await sandbox.exec("sleep 60", timeout=1.0)
    assert r.timed_out and r.killed_reason == "timeout" and time.monotonic() - t0 < 10
    r = await sandbox.exec("yes", timeout=20, max_output=4096)
    assert r.truncated and r.killed_reason == "output_limit" and len(r.output) == 4096
    r = await sandbox.exec("sleep 300 & echo started")  # leftovers are killed with the command
    assert "started" in r.output
    if sandbox.info["jail"].get("uid"):
        assert uid_pids(sandbox.info["uid"]) == []


async def test_close_removes_processes_and_files(backend):
    sb = await backend.create()
    await sb.exec("true")
    pid, d = sb.info["agent_pid"], os.path.dirname(sb.info["dir"])
    await sb.close()
    assert not os.path.exists(d)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_owner_death_cleans_up(tmp_path, sandbox_config):
    """SIGKILL the process owning a sandbox: the agent exits and the next backend sweeps the dir."""
    script = textwrap.dedent(f"""
        import asyncio, json, sys
        from envs.config import SandboxConfig
        from envs.sandbox.local import LocalSandboxBackend
        async def main():
            b = LocalSandboxBackend(SandboxConfig(base_dir={sandbox_config.base_dir!r}))
            sb = await b.create()
            await sb.exec("sleep 120 &")
            print(json.dumps(sb.info), flush=True)
            await asyncio.sleep(120)
        asyncio.run(main())
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd())
    info = json.loads(owner.stdout.readline())
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(info["agent_pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("agent survived its owner")
    assert os.path.isdir(os.path.dirname(info["dir"]))
    assert sweep_stale(sandbox_config.base_dir) == 1
    assert not os.path.exists(os.path.dirname(info["dir"]))
    if info["jail"].get("uid"):
        assert uid_pids(info["uid"]) == []


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="sandbox.isolation"):
        SandboxConfig(isolation="maybe").validate()
    with pytest.raises(ConfigError, match="sandbox.ready_timeout_s"):
        SandboxConfig(ready_timeout_s=0).validate()
    with pytest.raises(ConfigError, match="sandbox.wall_timeout_s"):
        SandboxConfig(wall_timeout_s=-1).validate()
    with pytest.raises(ConfigError, match="env.sandbox.memory_mb"):
        EnvConfig(sandbox=SandboxConfig(memory_mb=0)).validate()


async def test_health_is_public_but_reveals_no_token(sandbox):
    async with aiohttp.ClientSession() as s:
        async with s.get(sandbox.client.base_url + "/health") as resp:
            body = await resp.text()
    assert resp.status == 200 and sandbox.client._headers["Authorization"].split()[1] not in body


async def test_request_env_reaches_the_command_not_the_privileged_jail(sandbox):
    await sandbox.write_file("evil.so", b"not an elf")
    r = await sandbox.client.call(
        "/exec", {"command": "echo $GREETING", "env": {"GREETING": "hi", "LD_PRELOAD": "./evil.so"}}
    )
    assert r["output"].strip().endswith("hi") and r["exit_code"] == 0, r
    # ld.so complains once, for the command's bash; the jail (still root at that point) never loaded it
    assert r["output"].count("evil.so") == 1, r["output"]


def _copy_distributions(root: str, site: str) -> None:
    """Copy distribution `root` and everything it requires (markers evaluated here) into `site`."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo, seen = [root], set()
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        dist = metadata.distribution(name)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for rel in dist.files or []:
            if str(rel).startswith(".."):  # console scripts outside site-packages
                continue
            src = dist.locate_file(rel)
            if os.path.isfile(src):
                dst = os.path.join(site, str(rel))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)


def test_checkout_under_a_0700_directory_still_scores(sandbox_base):
    """A fresh clone in `mktemp -d` (0700) with its own venv there: the sandbox uid cannot traverse
    that directory, yet the SWE gold patch must still score 1 (the jail exposes the interpreter at
    fixed paths). The venv borrows this venv's packages through a .pth file, so no install is needed."""
    import sysconfig

    private = tempfile.mkdtemp(prefix="mopd-0700-")  # mode 0700, like `mktemp -d`
    try:
        repo = os.path.join(private, "mopd")
        subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{os.getcwd()}", repo], check=True)
        for rel in ("envs/sandbox", "envs/config.py"):  # the code under test (maybe uncommitted)
            src = os.path.join(os.getcwd(), rel)
            dst = os.path.join(repo, rel)
            if os.path.isdir(src):
                shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, dst)
        venv = os.path.join(repo, ".venv")
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", venv], check=True)
        site = subprocess.run(
            [f"{venv}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with open(os.path.join(site, "borrowed.pth"), "w") as f:  # the host side imports mopd's deps from here
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        # what the sandbox itself runs (pytest) lies in the new venv: the borrowed path may be under a 0700
        # directory too (CI's own clone is), which the sandbox uid can no more reach than this one
        _copy_distributions("pytest", site)
        script = textwrap.dedent(f"""
            import asyncio, sys
            assert sys.prefix == {venv!r}, sys.prefix
            from envs.config import SandboxConfig
            from envs.sandbox.local import LocalSandboxBackend
            from envs.swe.env import SWEEnv
            from envs.swe.grading import apply_patch
            from envs.swe.task import builtin_tasks
            from envs.tool_parsing import ToolCall
            async def main():
                backend = LocalSandboxBackend(SandboxConfig(base_dir={sandbox_base!r}))
                task = builtin_tasks()[0]
                env = SWEEnv(backend.create, max_turns=3)
                await env.reset(task)
                r = await env.sandbox.exec(env.python + " -c 'import pytest; print(7 * 6)'")
                print("PY", r.output.strip())
                await apply_patch(env.sandbox, task.patch, "gold")
                res = await env.step(ToolCall("finish", {{}}))
                await env.close()
                print("REWARD", res.reward)
            asyncio.run(main())
        """)
        out = subprocess.run(
            [f"{venv}/bin/python", "-c", script], cwd=repo, capture_output=True, text=True, timeout=240
        )
        assert "REWARD 1.0" in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])
        assert "PY 42" in out.stdout
    finally:
        shutil.rmtree(private, ignore_errors=True)


async def test_concurrent_commands_of_one_sandbox_do_not_kill_each_other(sandbox):
    """A command ending (and its leftovers being killed) must not take down another command of the
    same sandbox that is still running; once both are done nothing is left."""
    long = asyncio.ensure_future(sandbox.exec("sleep 2; echo long-done", timeout=20))
    await asyncio.sleep(0.5)
    short = await sandbox.exec("sleep 600 & echo short-done", timeout=10)
    assert short.output.strip() == "short-done"
    r = await long
    assert r.output.strip() == "long-done" and r.exit_code == 0, r
    if sandbox.info["jail"].get("uid"):
        assert uid_pids(sandbox.info["uid"]) == []


async def test_agent_death_mid_command_leaves_nothing(backend):
    """SIGKILL the agent while a command runs (a crashed sandbox): the command and what it started
    die with it (parent-death signals down the jail, the PID namespace), not only at close()."""
    sb = await backend.create()
    try:
        running = asyncio.ensure_future(sb.exec("setsid sleep 300 & sleep 300", timeout=60))
        await asyncio.sleep(1.0)
        if sb.info["jail"].get("uid"):
            assert uid_pids(sb.info["uid"]), "the command did not start"
        os.kill(sb.info["agent_pid"], signal.SIGKILL)
        with pytest.raises(SandboxError):
            await running
        if sb.info["jail"].get("uid"):
            deadline = time.monotonic() + 5
            while uid_pids(sb.info["uid"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert uid_pids(sb.info["uid"]) == []
    finally:
        await sb.close()


def test_without_mount_namespace_an_unreachable_interpreter_is_refused(sandbox_base, monkeypatch):
    """On a host with a uid switch but no mount namespace (simulated by the detection result), a
    venv the sandbox uid cannot reach is refused at start-up with what to do, not scored 0 later."""
    import dataclasses

    import envs.sandbox.local as local

    iso = dataclasses.replace(local.detect(), fs_readonly=False, setuid=True)
    monkeypatch.setattr(local, "detect", lambda: iso)
    private = tempfile.mkdtemp(prefix="mopd-0700-")
    os.makedirs(os.path.join(private, "bin"))
    monkeypatch.setattr(sys, "executable", os.path.join(private, "bin", "python3"))
    try:
        with pytest.raises(SandboxError, match="cannot enter"):
            local.LocalSandboxBackend(SandboxConfig(base_dir=sandbox_base))
    finally:
        shutil.rmtree(private)
