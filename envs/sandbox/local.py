"""Local sandbox backend: one agent process per sandbox, confined with what this host supports.

Per sandbox: its own directory (``<base>/sb-<uid>/work``), its own unprivileged uid (claimed
atomically by the directory name), its own pids and memory cgroups when writable, and commands that
start through ``jail.py`` (no network, read-only filesystem except the sandbox, rlimits).

Cleanup happens on ``close()``, at interpreter exit (atexit), when the owner dies (the agent
watches its parent pid and kills the sandbox uid's processes), and for anything left behind by a
killed owner via ``sweep_stale`` (run at backend start-up).
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import uuid
from typing import Any

from envs.config import SandboxConfig
from envs.sandbox.base import MAX_CALL_TIMEOUT_S, Sandbox
from envs.sandbox.client import AgentClient, SandboxError
from envs.sandbox.isolation import Isolation, detect
from envs.sandbox.jail import RUN, kill_cgroup, kill_uid

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")
UID_RANGE = (200000, 260000)
STRICT = ("setuid", "no_network", "fs_readonly", "pids_cgroup", "pid_ns", "ipc_ns", "disk_quota")
HIDE = ["/root", "/home", "/tmp", "/var/tmp"]  # covered by empty tmpfs in the jail (sandbox dir kept)
_libc = ctypes.CDLL(None, use_errno=True)
_LIVE: dict[str, dict[str, Any]] = {}  # sandbox dir -> meta, for atexit


def default_base_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "mopd-sandboxes")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_cgroup_dir(path: str) -> None:
    kill_cgroup(path, rounds=100)
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def python_spec() -> dict[str, Any]:
    """This interpreter, for the jail to expose at fixed paths (a 0700 checkout stays executable)."""
    prefix = os.path.realpath(sys.base_prefix)
    real = os.path.realpath(sys.executable)
    exe = os.path.basename(real) if os.path.dirname(real) == os.path.join(prefix, "bin") else "python3"
    spec: dict[str, Any] = {
        "prefix": prefix,
        "exe": exe,
        "version": f"python{sys.version_info[0]}.{sys.version_info[1]}",
    }
    if os.path.realpath(sys.prefix) != prefix:  # a venv: expose its site-packages as /run/mopd/venv
        spec["site"] = os.path.realpath(sysconfig.get_paths()["purelib"])
        try:
            with open(os.path.join(sys.prefix, "pyvenv.cfg")) as f:
                cfg = dict(line.split("=", 1) for line in f if "=" in line)
            spec["system"] = cfg.get("include-system-site-packages ", "false").strip()
        except OSError:
            pass
    return spec


def _mount_quota(work: str, size_mb: int, uid: int | None) -> None:
    """The work dir as a tmpfs of `size_mb` (bytes and inodes capped): a real per-sandbox disk quota."""
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    opts = f"size={size_mb}m,nr_inodes={max(4096, size_mb * 128)},mode=0700{owner}"
    if _libc.mount(b"tmpfs", work.encode(), b"tmpfs", ctypes.c_ulong(2 | 4), opts.encode()) != 0:
        raise SandboxError(
            f"cannot mount the sandbox's disk quota on {work}: {os.strerror(ctypes.get_errno())}"
        )


def _unmount(path: str) -> None:
    for _ in range(3):
        if _libc.umount2(path.encode(), 2) != 0:  # MNT_DETACH: live jails drop their copy on exit
            return


def destroy(meta: dict[str, Any]) -> None:
    """Kill everything a sandbox started and remove its files and cgroups (sync; safe to repeat)."""
    agent_pid = meta.get("agent_pid")
    if agent_pid:
        try:
            os.killpg(agent_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if meta.get("uid") is not None and meta.get("setuid"):
        kill_uid(meta["uid"])
    for cg in meta.get("cgroups", []):
        _kill_cgroup_dir(cg)
    for mount in meta.get("mounts", []):
        _unmount(mount)
    shutil.rmtree(meta["dir"], ignore_errors=True)
    _LIVE.pop(meta["dir"], None)


@atexit.register
def _cleanup_at_exit() -> None:
    for meta in list(_LIVE.values()):
        destroy(meta)


def sweep_stale(base_dir: str | None = None) -> int:
    """Remove sandboxes whose owner process is gone (the owner was SIGKILLed or crashed)."""
    base = base_dir or default_base_dir()
    removed = 0
    if not os.path.isdir(base):
        return 0
    for name in os.listdir(base):
        path = os.path.join(base, name)
        meta_path = os.path.join(path, "meta.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            if name.startswith("sb-") and time.time() - os.path.getmtime(path) > 300:
                _unmount(os.path.join(path, "work"))
                shutil.rmtree(path, ignore_errors=True)  # half-created and abandoned
                removed += 1
            continue
        if not _pid_alive(int(meta.get("owner_pid", 0))):
            destroy(meta)
            removed += 1
    return removed


def _check_traversable(path: str) -> None:
    """Sandbox uids are unprivileged: every parent of the base dir must be searchable by others."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & 0o001:
            raise SandboxError(
                f"sandbox.base_dir: {path!r} is not searchable by other users (mode "
                f"{oct(os.stat(path).st_mode & 0o777)}); sandboxed commands run as their own "
                "uid and could not enter it; choose a base_dir under a world-searchable path"
            )
        if path == "/":
            return
        path = os.path.dirname(path)


def _check_interpreter() -> None:
    """Without a mount namespace the sandbox runs the host's interpreter by its path: refuse to start
    (saying what to do) when the sandbox uid could not execute it, instead of scoring every task 0."""
    for path in {os.path.realpath(sys.executable), os.path.realpath(sys.prefix)}:
        parent = os.path.dirname(path)
        while parent != "/":
            if not os.stat(parent).st_mode & 0o001:
                raise SandboxError(
                    f"sandbox: the interpreter {path!r} is under {parent!r} (mode "
                    f"{oct(os.stat(parent).st_mode & 0o777)}), which sandbox uids cannot enter, and this "
                    "host has no mount namespace to expose it; use a Python installed under "
                    "world-searchable directories (e.g. /usr/bin/python3, or a venv under /opt)"
                )
            parent = os.path.dirname(parent)


class LocalSandboxBackend:
    """Creates confined local sandboxes. ``isolation`` is the detected (and enforced) mechanism set."""

    def __init__(
        self, config: SandboxConfig | None = None, run_id: str | None = None, exec_mode: str = "forkserver"
    ) -> None:
        """``exec_mode``: "forkserver" (a fork server per sandbox forks each command's jail) or
        "process" (a ``python jail.py`` process per command; slower, kept for comparison)."""
        if exec_mode not in ("forkserver", "process"):
            raise ValueError(f"exec_mode must be 'forkserver' or 'process', got {exec_mode!r}")
        self.exec_mode = exec_mode
        self.config = config or SandboxConfig()
        self.config.validate("sandbox")
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.base_dir = self.config.base_dir or default_base_dir()
        os.makedirs(self.base_dir, mode=0o711, exist_ok=True)
        self.isolation: Isolation = (
            detect()
            if self.config.isolation != "none"
            else Isolation(os.geteuid() == 0, False, False, False, None, None, False)
        )
        if self.config.isolation == "strict":
            missing = [k for k in STRICT if not getattr(self.isolation, k)]
            if missing:
                raise SandboxError(
                    f"sandbox.isolation=strict but {missing} cannot be enforced on this host "
                    f"({self.isolation.summary()})"
                )
        if self.isolation.setuid:
            _check_traversable(self.base_dir)
            if not self.isolation.fs_readonly:  # no mount namespace: no /run/mopd/python either
                _check_interpreter()
        self.python = python_spec()
        sweep_stale(self.base_dir)

    def _claim_dir(self) -> tuple[str, int]:
        for _ in range(1000):
            uid = random.randrange(*UID_RANGE)
            path = os.path.join(self.base_dir, f"sb-{uid}")
            try:
                os.mkdir(path, 0o711)
                return path, uid
            except FileExistsError:
                continue
        raise SandboxError(f"no free sandbox uid in {UID_RANGE}")

    def _cgroups(self, name: str) -> list[str]:
        out = []
        iso, cfg = self.isolation, self.config
        server = int(self.exec_mode == "forkserver")  # the fork server lives in them (forkserver.py)
        for parent, files in (
            (iso.pids_cgroup, {"pids.max": str(cfg.max_procs + server)}),
            (
                iso.memory_cgroup,
                {"memory.max" if iso.cgroup_v2 else "memory.limit_in_bytes": str(cfg.memory_mb << 20)},
            ),
        ):
            if parent is None:
                continue
            path = os.path.join(parent, name)
            os.makedirs(path, exist_ok=True)
            for fname, value in files.items():
                with open(os.path.join(path, fname), "w") as f:
                    f.write(value)
            out.append(path)
        return out

    def _jail_spec(self, uid: int, work: str, cgroups: list[str]) -> dict[str, Any]:
        iso, cfg = self.isolation, self.config
        py_home = os.path.realpath(sys.base_prefix)
        spec: dict[str, Any] = {
            "rlimits": {
                "RLIMIT_CPU": cfg.cpu_time_s,
                "RLIMIT_AS": cfg.memory_mb << 20,
                "RLIMIT_FSIZE": cfg.file_size_mb << 20,
                "RLIMIT_NPROC": cfg.max_procs,
                "RLIMIT_NOFILE": 4096,
                "RLIMIT_CORE": 0,
            },
            "cgroups": cgroups,
        }
        if iso.setuid:
            spec.update(uid=uid, gid=uid)
        if iso.no_network and cfg.no_network:
            spec["no_network"] = True
        if iso.ipc_ns:
            spec["ipc_ns"] = True
        if iso.fs_readonly:
            spec.update(
                fs_readonly=True,
                hide=HIDE,
                expose=[py_home],  # its lib/ is libpython's RUNPATH (pyenv builds under /root)
                python=self.python,
                shm_mb=min(64, cfg.disk_mb),
                pid_ns=iso.pid_ns,
            )
            lib = os.path.join(self.python["prefix"], "lib")
            if os.path.isdir(lib) and any(n.startswith("libpython") for n in os.listdir(lib)):
                spec["base_env"] = {"LD_LIBRARY_PATH": f"{RUN}/python/lib"}
        return spec

    def _path(self, spec: dict[str, Any]) -> str:
        """Commands' PATH: the exposed interpreter first (the host's venv may be unreachable)."""
        host = os.environ.get("PATH", "/usr/bin:/bin")
        if not spec.get("python"):
            return host
        return f"{RUN}/venv/bin:{RUN}/python/bin:{host}"

    async def create(self, snapshot: str | None = None) -> Sandbox:
        """Start a sandbox; ``snapshot`` is a local directory copied into its workspace before the
        agent starts (``info["snapshot"]`` names it), so a warm sandbox can hold a task's files."""
        path, uid = self._claim_dir()
        work = os.path.join(path, "work")
        os.mkdir(work, 0o700)  # other sandbox uids never enter another sandbox's files
        name = f"mopd-{self.run_id}-{uid}"
        meta: dict[str, Any] = {
            "dir": path,
            "uid": uid,
            "owner_pid": os.getpid(),
            "run_id": self.run_id,
            "created": time.time(),
            "setuid": self.isolation.setuid,
            "cgroups": [],
            "mounts": [],
        }
        _LIVE[path] = meta
        try:
            meta["cgroups"] = self._cgroups(name)
            if self.isolation.disk_quota:
                meta["mounts"].append(work)
                _mount_quota(work, self.config.disk_mb, uid if self.isolation.setuid else None)
            with open(os.path.join(path, "meta.json"), "w") as f:
                json.dump(meta, f)  # from here on, sweep_stale can undo everything (mounts included)
            if self.isolation.setuid:
                os.chown(work, uid, uid)
            if snapshot is not None:
                await asyncio.to_thread(
                    shutil.copytree,
                    snapshot,
                    work,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"),
                )
                if self.isolation.setuid:
                    for d, dirs, files in os.walk(work):
                        for n in [d] + [os.path.join(d, x) for x in dirs + files]:
                            os.chown(n, uid, uid, follow_symlinks=False)
            spec = self._jail_spec(uid, work, meta["cgroups"])
            token = secrets.token_urlsafe(32)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                AGENT,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--root",
                work,
                "--max-output",
                str(self.config.max_output_bytes),
                "--default-timeout",
                str(self.config.wall_timeout_s),
                "--max-timeout",
                str(MAX_CALL_TIMEOUT_S),
                "--jail",
                json.dumps(spec),
                "--parent-pid",
                str(os.getpid()),
                "--exec-mode",
                self.exec_mode,
                "--token-file",
                "-",  # the token comes on stdin: never in the agent's environment
                env={"PATH": self._path(spec)},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            meta["agent_pid"] = proc.pid
            proc.stdin.write(token.encode() + b"\n")
            await proc.stdin.drain()
            proc.stdin.close()
            with open(os.path.join(path, "meta.json"), "w") as f:
                json.dump(meta, f)
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=30.0)
            except asyncio.TimeoutError:
                raise SandboxError("sandbox agent did not start within 30s") from None
            if not line.startswith(b"READY "):
                raise SandboxError(f"sandbox agent failed to start: {line[:200]!r}")
            port = int(line.split()[1])
        except BaseException:
            destroy(meta)
            raise

        async def closer() -> None:
            await asyncio.to_thread(destroy, meta)
            try:
                await asyncio.wait_for(proc.wait(), timeout=5.0)
            except (asyncio.TimeoutError, ProcessLookupError):
                pass

        client = AgentClient(f"http://127.0.0.1:{port}", token)
        info = {
            "backend": "local",
            "dir": work,
            "uid": uid,
            "port": port,
            "agent_pid": proc.pid,
            "isolation": self.isolation.as_dict(),
            "jail": spec,
            "disk_mb": self.config.disk_mb if self.isolation.disk_quota else None,
            "snapshot": os.path.realpath(snapshot) if snapshot is not None else None,
        }
        if spec.get("python"):
            info["python"] = (
                f"{RUN}/venv/bin/python3" if self.python.get("site") else f"{RUN}/python/bin/python3"
            )
        return Sandbox(name, client, closer, info)
