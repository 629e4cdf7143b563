"""Confine one sandbox command and run it (standard library only; Linux).

The agent runs ``python3 jail.py '<json spec>' -- bash -c CMD`` instead of the command itself, so the
confinement is applied in a fresh single-threaded process (no ``preexec_fn`` inside the threaded
agent). In order: new session, cgroup membership, namespaces (network cut; IPC, UTS and PID
namespaces; mount namespace with the whole filesystem read-only except the sandbox directory, and
``/root``, ``/home``, ``/tmp``, ``/run``, ``/dev/shm`` replaced by empty or private mounts, a fresh
``/proc``), then a fork: the jail stays behind as a child subreaper that waits for the command and
kills every process the command left behind; the child takes resource limits, drops to the
sandbox's own unprivileged uid/gid, ``no_new_privs``, a parent-death signal, and execs.

With a PID namespace the child is the namespace's init: it forks the command, reaps, and when the
command ends it exits, which makes the kernel kill everything else in the namespace. Without one
(a pod, where the agent runs the jail without privileges) the subreaper kills the leftovers.

The interpreter is exposed at fixed paths (``/run/mopd/python`` for ``sys.base_prefix``,
``/run/mopd/venv`` for a venv's site-packages), so a checkout under a 0700 directory still gives the
sandbox a Python it can execute.

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
import time
from typing import Callable

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}
AT_RECURSIVE, MOUNT_ATTR_RDONLY = 0x8000, 0x1
RUN = "/run/mopd"  # the interpreter's fixed home inside the jail

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


def _bind_fd(fd: int, dst: str) -> None:
    """Bind what `fd` (an O_PATH descriptor opened before anything was covered) refers to onto `dst`."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    if not _mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC):
        _fail(f"binding onto {dst}")


def _hide(path: str, keep: list[tuple[str, int]]) -> None:
    """Cover `path` with an empty tmpfs, re-exposing the kept sub-paths (the sandbox dir, Python)."""
    if not _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m"):
        _fail(f"hiding {path}")
    for sub, fd in keep:
        if sub.startswith(path.rstrip("/") + "/"):
            _bind_fd(fd, sub)


def _python(py: dict, fds: dict[str, int]) -> None:
    """/run/mopd/python = the interpreter's prefix; /run/mopd/venv = a venv over its site-packages."""
    _bind_fd(fds["prefix"], f"{RUN}/python")
    if py.get("site"):
        venv = f"{RUN}/venv"
        os.makedirs(f"{venv}/bin")
        with open(f"{venv}/pyvenv.cfg", "w") as f:
            f.write(f"home = {RUN}/python/bin\ninclude-system-site-packages = {py.get('system', 'false')}\n")
        for name in ("python3", "python"):
            os.symlink(f"{RUN}/python/bin/{py.get('exe', 'python3')}", f"{venv}/bin/{name}")
        _bind_fd(fds["site"], f"{venv}/lib/{py['version']}/site-packages")


def _filesystem(spec: dict, new_proc: bool) -> None:
    root = spec["root"]
    py = spec.get("python") or {}
    sources = {"root": root, "prefix": py.get("prefix"), "site": py.get("site")}
    sources.update({f"expose:{p}": p for p in spec.get("expose", [])})
    fds = {k: os.open(v, os.O_PATH) for k, v in sources.items() if v and os.path.exists(v)}
    keep = [(root, fds["root"])] + [(k[7:], fd) for k, fd in fds.items() if k.startswith("expose:")]
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE):
        _fail("making / private")
    for path in spec.get("hide", []):
        if os.path.isdir(path) and not os.path.islink(path):
            _hide(path, keep)
    if os.path.isdir("/run") and not os.path.islink("/run"):
        _hide("/run", keep)  # a fresh /run: also hides the host's unix sockets (docker, dbus, ...)
        if py.get("prefix"):
            _python(py, fds)
    for fd in fds.values():
        os.close(fd)
    shm = spec.get("shm_mb")
    if shm and os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm"):
        if not _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={int(shm)}m"):
            _fail("private /dev/shm")
    if new_proc and not _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC):
        _fail("mounting /proc for the PID namespace")
    if not _mount(root, root, None, MS_BIND | MS_REC):
        _fail("binding the sandbox directory")
    _readonly_everything()
    if not _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV):
        _fail("making the sandbox directory writable")
    if shm and os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm"):
        if not _mount(None, "/dev/shm", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV):
            _fail("making /dev/shm writable")


def _drop(spec: dict) -> None:
    """Resource limits, then the sandbox's own uid/gid, no_new_privs and a parent-death signal."""
    for name, value in spec.get("rlimits", {}).items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            _fail(f"setrlimit {name}={value}")
    uid, gid = spec.get("uid"), spec.get("gid")
    if uid is not None and os.geteuid() == 0:
        for cap in range(64):  # empty bounding set: nothing (file caps, setuid) can hand caps back
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
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


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc; orphans of a subreaper are its children)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_descendants(pid: int, reap: bool) -> None:
    """SIGKILL everything below `pid` until nothing is left (forkers race; each round catches up)."""
    for _ in range(200):
        found = descendants(pid)
        for p in found:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        while reap:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not found:
            return
        os.sched_yield()


def _kill_until_gone(list_pids: Callable[[], list[int]], rounds: int = 50) -> None:
    """SIGKILL what `list_pids` names until it names nothing (loops to win races against forkers)."""
    for _ in range(rounds):
        pids = list_pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def kill_cgroup(path: str, rounds: int = 50, spare: int | None = None) -> None:
    """SIGKILL every process in a cgroup until it is empty (but for ``spare``: the fork server)."""
    _kill_until_gone(lambda: [p for p in cgroup_pids(path) if p != spare], rounds)


def uid_pids(uid: int) -> list[int]:
    """Live (non-zombie) processes owned by `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    with open(f"/proc/{entry}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                            pids.append(int(entry))
            except (OSError, IndexError):
                pass
    return pids


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (unique per sandbox)."""
    _kill_until_gone(lambda: uid_pids(uid))


def _wait_for(pid: int) -> int:
    """Reap children (orphans come to us as a subreaper/init) until `pid` ends; its raw status."""
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if got == pid:
            return status


def _exec(argv: list[str], env: dict) -> None:
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        sys.stderr.write(f"sandbox jail: cannot run {argv[0]}: {exc}\n")
        os._exit(127)


def _init(argv: list[str], env: dict, report: int) -> None:
    """PID 1 of the sandbox's PID namespace: run the command, report its status, exit (kills the rest)."""
    pid = os.fork()
    if pid == 0:
        os.close(report)
        _exec(argv, env)
    status = _wait_for(pid)
    os.write(report, str(status).encode())
    os._exit(0)


def _relay(status: int) -> None:
    """Exit like the command did: same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def run(
    spec: dict, argv: list[str], standby: Callable[[], tuple[list[str], dict, str]] | None = None
) -> None:
    """Confine and run `argv` as described in the module docstring; never returns.

    With ``standby`` (forkserver.py's ready jails), the jail is built before its command is known:
    the child calls ``standby()`` once namespaces and mounts are in place, still root, and gets the
    command's (argv, env, cwd) from it; resource limits, the uid switch and ``exec`` follow as usual.
    """
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the agent dies: so do we, and the command
    if os.getppid() != parent:
        os._exit(126)
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader
    for cg in spec.get("cgroups", []):
        if os.getpid() in cgroup_pids(cg):
            continue  # born in it (forked by a fork server that joined it): joining costs ~13 ms
        try:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            _fail(f"joining cgroup {cg}")
    fs, pid_ns = bool(spec.get("fs_readonly")), bool(spec.get("pid_ns"))
    flags = (CLONE_NEWNET if spec.get("no_network") else 0) | (CLONE_NEWNS if fs else 0)
    flags |= (CLONE_NEWIPC if spec.get("ipc_ns") else 0) | (CLONE_NEWPID | CLONE_NEWUTS if pid_ns else 0)
    if flags and _libc.unshare(flags) != 0:
        _fail("unshare (namespaces)")
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _fail("child subreaper")
    report_r, report_w = os.pipe() if pid_ns else (-1, -1)
    pid = os.fork()
    if pid == 0:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # again after setuid, in _drop
        if fs:
            _filesystem(spec, new_proc=pid_ns)
        if pid_ns:
            _libc.sethostname(b"sandbox", 7)
        argv, env, cwd = (
            standby() if standby else (argv, spec.get("env") or dict(os.environ), spec.get("cwd"))
        )
        _drop(spec)
        os.chdir(cwd or spec["root"])
        if pid_ns:
            os.close(report_r)
            _init(argv, env, report_w)
        _exec(argv, env)
    status = _wait_for(pid)
    if pid_ns:
        os.close(report_w)
        with os.fdopen(report_r, "rb") as f:
            reported = f.read()
        status = int(reported) if reported.strip().isdigit() else status
    if not pid_ns:  # with one, the namespace died with its init: nothing of the command is left
        kill_descendants(os.getpid(), reap=True)  # daemons (setsid, double fork) of the command
    _relay(status)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: jail.py '<json spec>' -- PROGRAM [ARGS...]\n")
        os._exit(2)
    run(json.loads(argv[0]), argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
