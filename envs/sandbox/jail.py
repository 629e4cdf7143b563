"""Confine one sandbox command, then exec it (standard library only; Linux).

The agent runs ``python3 jail.py '<json spec>' -- bash -c CMD`` instead of the command itself, so the
confinement is applied in a fresh single-threaded process (no ``preexec_fn`` inside the threaded
agent). In order: new session, cgroup membership, namespaces (network cut; mount namespace with the
whole filesystem read-only except the sandbox directory and ``/root`` hidden), resource limits, drop
to the sandbox's own unprivileged uid/gid, ``no_new_privs``, parent-death signal, exec.

Every step that is requested but fails aborts with exit code 126 and a message on stderr: a command
never runs with less confinement than the backend reported.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}
AT_RECURSIVE, MOUNT_ATTR_RDONLY = 0x8000, 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(step: str) -> None:
    err = ctypes.get_errno()
    sys.stderr.write(f"sandbox jail: {step} failed: {os.strerror(err) if err else 'error'}\n")
    os._exit(126)


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    return _libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _readonly_everything() -> None:
    """Make every mount read-only in this mount namespace (mount_setattr, else remount one by one)."""
    nr = SYS_MOUNT_SETATTR.get(os.uname().machine)
    if nr is not None:
        attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        if _libc.syscall(nr, -100, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
            return
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if not _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV):
            if not _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY):
                _fail(f"read-only remount of {point}")


def _hide(path: str, expose: list[str]) -> None:
    """Cover `path` with an empty tmpfs, re-exposing only the given sub-paths (e.g. the Python install)."""
    keep = []
    for sub in expose:
        if sub.startswith(path.rstrip("/") + "/") and os.path.exists(sub):
            keep.append((sub, os.open(sub, os.O_PATH)))
    if not _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m"):
        _fail(f"hiding {path}")
    for sub, fd in keep:
        os.makedirs(sub, exist_ok=True)
        if not _mount(f"/proc/self/fd/{fd}", sub, None, MS_BIND | MS_REC):
            _fail(f"re-exposing {sub}")
        os.close(fd)


def _filesystem(root: str, hide: list[str], expose: list[str]) -> None:
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE):
        _fail("making / private")
    for path in hide:
        if os.path.isdir(path):
            _hide(path, expose)
    if not _mount(root, root, None, MS_BIND | MS_REC):
        _fail("binding the sandbox directory")
    root_fd = os.open(root, os.O_PATH)
    _readonly_everything()
    if not _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV):
        _fail("making the sandbox directory writable")
    os.close(root_fd)


def confine(spec: dict) -> None:
    """Apply `spec` to the current process (see module docstring for the order)."""
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader
    for cg in spec.get("cgroups", []):
        try:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            _fail(f"joining cgroup {cg}")
    flags = (CLONE_NEWNET if spec.get("no_network") else 0) | (CLONE_NEWNS if spec.get("fs_readonly") else 0)
    if flags and _libc.unshare(flags) != 0:
        _fail("unshare (network/mount namespace)")
    if spec.get("fs_readonly"):
        _filesystem(spec["root"], spec.get("hide", []), spec.get("expose", []))
    for name, value in spec.get("rlimits", {}).items():
        res = getattr(resource, name)
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            _fail(f"setrlimit {name}={value}")
    uid, gid = spec.get("uid"), spec.get("gid")
    if gid is not None:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
        except OSError:
            _fail(f"setgid {gid}")
    if uid is not None:
        try:
            os.setresuid(uid, uid, uid)
        except OSError:
            _fail(f"setuid {uid}")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("no_new_privs")
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    os.chdir(spec.get("cwd") or spec["root"])


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: jail.py '<json spec>' -- PROGRAM [ARGS...]\n")
        os._exit(2)
    spec = json.loads(argv[0])
    confine(spec)
    env = spec.get("env") or dict(os.environ)
    try:
        os.execvpe(argv[2], argv[2:], env)
    except OSError as exc:
        sys.stderr.write(f"sandbox jail: cannot run {argv[2]}: {exc}\n")
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
