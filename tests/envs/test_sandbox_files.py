"""File work the agent does on the model's behalf never follows what the model planted.

Each row: shell commands the model runs first (as the sandbox uid, inside the jail), then one file
operation the agent carries out (outside the jail, as root on this backend), and what must happen.
A host "victim" file outside the sandbox must keep its content and mode whatever the outcome.
"""

from __future__ import annotations

import os
import stat

import pytest

from envs.sandbox.client import SandboxError

pytestmark = pytest.mark.asyncio

# (case id, setup commands ({victim} is the host file), operation, path, expected: "ok" or HTTP status:
# 403 for a link or a path outside the sandbox, 400 for what is not a regular file or directory)
CASES = [
    (
        "write-through-tmp-symlink",
        "echo X > notes.py; ln -s {victim} notes.py.mopd-tmp",
        "write",
        "notes.py",
        "ok",
    ),
    ("write-symlink-target", "ln -s {victim} notes.py", "write", "notes.py", "ok"),
    ("write-under-symlinked-dir", "ln -s {victim_dir} d", "write", "d/x.py", 403),
    ("write-under-symlinked-deep-dir", "mkdir -p a/b; ln -s {victim_dir} a/b/c", "write", "a/b/c/x.py", 403),
    (
        "write-mopd-patch-tmp-link",
        "mkdir -p .mopd; ln -s {victim} .mopd/test_patch.diff.mopd-tmp",
        "write",
        ".mopd/test_patch.diff",
        "ok",
    ),
    ("write-mopd-dir-symlink", "ln -s {victim_dir} .mopd", "write", ".mopd/test_patch.diff", 403),
    ("write-dotdot", "", "write", "../escape.txt", 403),
    ("write-absolute-outside", "", "write", "{victim}", 403),
    ("write-over-directory", "mkdir sub", "write", "sub", 400),
    ("write-onto-fifo", "mkfifo f", "write", "f", "ok"),
    ("write-nul-in-path", "", "write", "a\x00b", 400),
    ("read-symlink", "ln -s {victim} link", "read", "link", 403),
    ("read-symlinked-dir", "ln -s {victim_dir} d", "read", "d/victim.txt", 403),
    ("read-fifo", "mkfifo f", "read", "f", 400),
    ("read-device-link", "ln -s /dev/zero z", "read", "z", 403),
    ("read-dev-absolute", "", "read", "/dev/zero", 403),
    ("read-hardlink", "echo a > a; ln a b", "read", "b", 400),
    ("read-directory", "mkdir sub", "read", "sub", 400),
    ("read-proc", "", "read", "/proc/self/environ", 403),
    ("exec-cwd-symlink", "ln -s {victim_dir} d", "exec", "d", 403),
    ("upload-into-symlinked-dir", "ln -s {victim_dir} d", "upload", "d", 403),
    ("upload-over-symlink", "ln -s {victim} notes.py", "upload", ".", 403),
]


@pytest.fixture
def victim(sandbox_base):
    """A host file outside the sandbox that the sandbox uid can name (but must never get written)."""
    d = os.path.join(sandbox_base, "host")
    os.makedirs(d)
    os.chmod(d, 0o755)
    path = os.path.join(d, "victim.txt")
    with open(path, "w") as f:
        f.write("HOST SECRET\n")
    os.chmod(path, 0o600)
    return path


async def _attempt(sandbox, tmp_path, op: str, path: str) -> None:
    if op == "write":
        await sandbox.write_file(path, "pwned\n")
    elif op == "read":
        await sandbox.read_file(path)
    elif op == "exec":
        await sandbox.exec("echo pwned > x", cwd=path, timeout=10)
    elif op == "upload":
        src = tmp_path / "upload"
        src.mkdir()
        (src / "notes.py").write_text("pwned\n")
        await sandbox.upload(str(src), path)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_agent_file_work_stays_inside(case, sandbox, victim, tmp_path):
    _, setup, op, path, expected = case
    fmt = {"victim": victim, "victim_dir": os.path.dirname(victim)}
    if setup:
        r = await sandbox.exec(setup.format(**fmt), timeout=10)
        assert r.ok, r.output
    before = os.stat(victim)
    if expected == "ok":
        await _attempt(sandbox, tmp_path, op, path.format(**fmt))
    else:
        with pytest.raises(SandboxError) as err:
            await _attempt(sandbox, tmp_path, op, path.format(**fmt))
        assert err.value.status == expected, err.value
    with open(victim) as f:
        assert f.read() == "HOST SECRET\n"
    after = os.stat(victim)
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_uid == before.st_uid
    assert not os.path.exists(os.path.join(os.path.dirname(victim), "x.py"))
    # the agent still serves, and a write it accepted landed as a fresh regular file in the sandbox
    if expected == "ok" and op == "write":
        assert (await sandbox.read_file(path)) == "pwned\n"
        r = await sandbox.exec(f"stat -c %F {path}", timeout=10)
        assert r.output.strip() == "regular file"


async def test_write_keeps_mode_and_owner_and_leaves_no_temp_files(sandbox):
    await sandbox.write_file("pkg/run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    r = await sandbox.exec("./pkg/run.sh; ls -a pkg; stat -c '%a %u' pkg/run.sh; id -u", timeout=10)
    lines = r.output.split()
    assert lines[0] == "hi" and not any(n.startswith(".mopd-tmp") for n in lines)
    assert lines[-3] == "755" and lines[-2] == lines[-1]  # owned by the sandbox uid


async def test_overwrite_without_mode_keeps_the_files_mode(sandbox):
    """str_replace rewrites a file without a mode: an executable script must stay executable."""
    await sandbox.write_file("run.sh", "#!/bin/sh\necho one\n", mode=0o750)
    await sandbox.write_file("run.sh", "#!/bin/sh\necho two\n")
    await sandbox.write_file("new.txt", "x")
    r = await sandbox.exec("./run.sh; stat -c %a run.sh new.txt", timeout=10)
    assert r.output.split() == ["two", "750", "644"]


@pytest.mark.parametrize("mode", [-1, 0o4755, "0644", 1.5, True])
async def test_bad_write_mode_is_400(sandbox, mode):
    with pytest.raises(SandboxError) as err:
        await sandbox.client.call("/write", {"path": "a", "content_b64": "", "mode": mode})
    assert err.value.status == 400 and "mode" in str(err.value)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"command": "sleep 20", "timeout": float("nan")}, "timeout"),
        ({"command": "true", "timeout": 1e400}, "timeout"),
        ({"command": "true", "timeout": -1}, "timeout"),
        ({"command": "true", "timeout": "5"}, "timeout"),
        ({"command": "true", "max_output": -5}, "max_output"),
        ({"command": "true", "max_output": 1.5}, "max_output"),
    ],
)
async def test_exec_limits_cannot_be_switched_off(sandbox, body, field):
    # the client's JSON encoder writes NaN/Infinity literals, as a hostile caller would send them
    with pytest.raises(SandboxError) as err:
        await sandbox.client.call("/exec", body)
    assert err.value.status == 400 and field in str(err.value)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1, 3601, True])
async def test_client_side_exec_refuses_timeouts_that_would_switch_a_limit_off(sandbox, timeout):
    with pytest.raises(ValueError, match="timeout"):
        await sandbox.exec("true", timeout=timeout)


def test_swe_env_command_timeout_within_the_agent_ceiling():
    from envs.config import MAX_CALL_TIMEOUT_S
    from envs.swe.env import SWEEnv

    with pytest.raises(ValueError, match="command_timeout"):
        SWEEnv(lambda: None, command_timeout=MAX_CALL_TIMEOUT_S + 1)
