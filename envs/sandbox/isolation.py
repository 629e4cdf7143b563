"""Detect which confinement mechanisms work on this host, by trying each one for real.

A probe runs ``jail.py`` (the very code that confines sandbox commands) with one mechanism at a time,
so the report says what is enforced, not what a kernel version suggests.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
PROBE_UID = 65533


@dataclass(frozen=True)
class Isolation:
    root: bool  # running as root (needed for uid switch, namespaces without userns, cgroups)
    setuid: bool  # commands run as a per-sandbox unprivileged uid
    no_network: bool  # network namespace with only a down loopback
    fs_readonly: bool  # mount namespace: whole filesystem read-only except the sandbox dir
    pids_cgroup: str | None  # parent cgroup dir for pids.max, or None
    memory_cgroup: str | None  # parent cgroup dir for memory.limit_in_bytes / memory.max, or None
    cgroup_v2: bool
    pid_ns: bool = False  # PID namespace with a fresh /proc: siblings and the host are invisible
    ipc_ns: bool = False  # IPC namespace per command: SysV/POSIX IPC objects die with the command
    disk_quota: bool = False  # size-limited tmpfs as the sandbox's work dir (a real disk quota)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


def _try_jail(spec: dict) -> bool:
    spec = {"root": "/", **spec}
    spec["cwd"] = spec["root"]
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-S", JAIL, json.dumps(spec), "--", "/bin/sh", "-c", "exit 0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _try_tmpfs() -> bool:
    """Can we mount a size-limited tmpfs (the per-sandbox disk quota)? Mounted and removed for real."""
    import ctypes
    import tempfile

    libc = ctypes.CDLL(None, use_errno=True)
    path = tempfile.mkdtemp(prefix="mopd-quota-probe-")
    try:
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(6), b"size=1m,mode=0700") != 0:
            return False
        libc.umount2(path.encode(), 2)
        return True
    finally:
        os.rmdir(path)


def _own_cgroup(controller: str) -> str:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if controller in ctrls.split(","):
                    return path
    except OSError:
        pass
    return "/"


def _cgroup_parent(controller: str, limit_file: str) -> str | None:
    """A writable cgroup directory under which we can create per-sandbox children, or None."""
    candidates = [os.path.join("/sys/fs/cgroup", controller) + _own_cgroup(controller)]
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2 unified
        candidates.append("/sys/fs/cgroup" + _own_cgroup(""))
    for base in candidates:
        parent = os.path.join(base.rstrip("/"), "mopd")
        probe = os.path.join(parent, f"probe-{os.getpid()}")
        try:
            os.makedirs(probe, exist_ok=True)
            ok = os.path.exists(os.path.join(probe, limit_file))
            os.rmdir(probe)
            if ok:
                return parent
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def detect() -> Isolation:
    root = os.geteuid() == 0
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    return Isolation(
        root=root,
        setuid=root and _try_jail({"uid": PROBE_UID, "gid": PROBE_UID}),
        no_network=_try_jail({"no_network": True}),
        fs_readonly=root and _try_jail({"fs_readonly": True, "root": "/tmp"}),
        pids_cgroup=_cgroup_parent("pids", "pids.max") if root else None,
        memory_cgroup=(
            _cgroup_parent("memory", "memory.limit_in_bytes")
            or (_cgroup_parent("", "memory.max") if v2 else None)
        )
        if root
        else None,
        cgroup_v2=v2,
        pid_ns=root and _try_jail({"fs_readonly": True, "root": "/tmp", "pid_ns": True}),
        ipc_ns=_try_jail({"ipc_ns": True}),
        disk_quota=root and _try_tmpfs(),
    )


if __name__ == "__main__":
    print(detect().summary())
