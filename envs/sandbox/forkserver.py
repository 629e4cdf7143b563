"""Fork server for sandbox commands: the jail's confinement without a new interpreter per call.

The agent starts this file once per sandbox (``python -I -S forkserver.py FD``, single-threaded, with
the same privileges the agent would give ``jail.py``) and sends it one request per command over the
unix socket ``FD``. For each request it forks, and the child runs ``jail.run`` exactly as a fresh
``python jail.py SPEC -- bash -c CMD`` would: new session, cgroups, fresh namespaces (network, IPC,
PID, mount), a fresh ``/proc``, ``/dev/shm`` and empty read-only ``/tmp``, rlimits, the sandbox uid,
no_new_privs. So isolation and what persists between calls are unchanged (files in the sandbox
directory persist; processes, cwd, environment, ``/dev/shm`` and IPC objects do not); what a call
saves is the interpreter start and imports.

The server joins the sandbox's cgroups once, at start (``forkserver.py FD [CGROUP_DIR...]``), so every
jail is born in them and ``jail.run`` skips the join: moving a process into a cgroup waits for an
RCU grace period (~13 ms per call on a cgroup-v1 host, most of a no-op call), a fork into one does
not. The agent spares the server when it sweeps the cgroups after a command (``Agent.kill_group``),
and the local backend adds one to ``pids.max`` for it. A server that cannot join leaves the join to
each jail, which fails the command if it cannot join either.

Ready jails: while no command runs, the agent asks for the next command's jail ahead of time
(``{"prepare": spec}``, ``Agent.prepare_next``). The server forks a jail that builds everything
that does not depend on the command (session, namespaces, mounts, hostname) and waits, still root,
on a socket only the server holds; the next command with the same spec is handed to it (argv, env,
cwd and its output pipe), and the jail goes on exactly as a fresh one: rlimits, the sandbox uid,
no_new_privs, ``exec``. A command never shares a jail: one is made per command, ahead of time or on
demand (when none is ready, or the ready one is gone). Sweeps after a command never meet a ready jail
(none is made while a command runs, and the next command takes it).

Protocol (standard library only, like ``agent.py`` and ``jail.py``): a request is a 4-byte
big-endian length and a JSON ``{"spec": ..., "argv": [...]}``, sent with two descriptors (SCM_RIGHTS):
the write end of the command's output pipe and the write end of a status pipe. The reply is the
jail's pid (4 bytes, signed; ``-errno`` when the fork failed). When that process ends, its raw wait
status is written to the status pipe as text and the pipe is closed; a status pipe that closes
without a status means this server died (and, by the parent-death signal, the command with it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = struct.Struct("!I")
PID = struct.Struct("!i")
MAX_REQUEST = 64 << 20
HANDOVER_TIMEOUT_S = 10.0  # a ready jail waits in recvmsg: it answers at once unless it is gone


def _jail():
    """Load ``jail.py`` by path: this file runs as a lone ``python -I -S`` script."""
    spec = importlib.util.spec_from_file_location("mopd_sandbox_jail", os.path.join(HERE, "jail.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jail = _jail()


def _send(sock: socket.socket, obj: dict, fds: list[int]) -> None:
    """One length-prefixed JSON message, with `fds` attached (SCM_RIGHTS)."""
    payload = json.dumps(obj).encode()
    data = HEADER.pack(len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    sock.sendall(data[sent:])


def send_request(sock: socket.socket, request: dict, fds: list[int]) -> int:
    """Ask the server to start a command (``{"spec", "argv"}`` with its output and status pipes) or to
    build a ready jail (``{"prepare": spec}``, no descriptors); a pid (negative: -errno)."""
    _send(sock, request, fds)
    reply = _recv_exact(sock, PID.size)
    if reply is None:
        raise ConnectionError("the sandbox fork server closed its socket")
    return PID.unpack(reply)[0]


class Started:
    """A command the fork server started: its jail's pid, its output pipe, its exit when it ends."""

    def __init__(self, pid: int, stdout_fd: int, status_fd: int) -> None:
        self.pid = pid
        self.stdout_fd = stdout_fd
        self._status_fd = status_fd
        self.returncode: int | None = None

    def wait(self, timeout: float | None) -> bool:
        """True once the jail ended (``returncode`` set), False if `timeout` seconds passed first."""
        if self.returncode is not None:
            return True
        ready, _, _ = select.select([self._status_fd], [], [], timeout)
        if not ready:
            return False
        data = b""
        while chunk := os.read(self._status_fd, 64):
            data += chunk
        if not data.isdigit():  # the server died, and the jail with it (its parent-death signal)
            self.returncode = -signal.SIGKILL
        else:  # as Popen.returncode (os.waitstatus_to_exitcode needs Python 3.9)
            status = int(data)
            self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return True

    def close(self) -> None:
        for fd in (self.stdout_fd, self._status_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class ForkServer:
    """The agent's side: starts the server (again, if it died) and asks it for commands."""

    def __init__(self, env: dict[str, str], cgroups: list[str] | None = None) -> None:
        self.env = env
        self.cgroups = list(cgroups or [])
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def ensure(self) -> None:
        """Start the server unless it runs (it imports in the background while the agent goes on).

        From a thread that outlives it: the server's parent-death signal follows the starting thread.
        """
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()

    def _start(self) -> None:
        self._close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno()), *self.cgroups],
                pass_fds=[theirs.fileno()],
                env=self.env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours

    def spawn(self, spec: dict, argv: list[str]) -> Started:
        """Start `argv` in a fresh jail; a server that died is restarted once, transparently."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            with self._lock:
                for attempt in (0, 1):
                    if self.proc is None or self.proc.poll() is not None:
                        self._start()
                    try:
                        pid = send_request(self._sock, {"spec": spec, "argv": argv}, [out_w, status_w])
                        break
                    except OSError:
                        if attempt:
                            raise
                        self._kill()
        except BaseException:
            os.close(out_r)
            os.close(status_r)
            raise
        finally:
            os.close(out_w)
            os.close(status_w)
        if pid < 0:
            os.close(out_r)
            os.close(status_r)
            raise OSError(-pid, f"the sandbox fork server could not fork: {os.strerror(-pid)}")
        return Started(pid, out_r, status_r)

    def prepare(self, spec: dict) -> None:
        """Have the server build a ready jail for `spec` now, so the next command skips that work.

        Call it only while no command of this sandbox runs: a ready jail is root, in the sandbox's
        cgroups, and the sweeps after a command (``Agent.kill_group``, ``kill_orphans``) would kill it.
        """
        with self._lock:
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                send_request(self._sock, {"prepare": spec}, [])
            except OSError:  # ConnectionError included: never an error for the caller's reply
                pass  # the next command's jail is built from scratch, as without one

    def _kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
            except OSError:
                pass
            self.proc.wait()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Stop the server: it exits when its socket closes, and its commands die with it."""
        with self._lock:
            self._close()
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    self._kill()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv_request(sock: socket.socket) -> tuple[dict, list[int]] | None:
    """One request and its two descriptors, or None when the agent closed the socket."""
    data, anc, _, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(2 * 4))
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) - len(raw) % 4]))
    if not data:
        return None
    rest = _recv_exact(sock, HEADER.size - len(data)) if len(data) < HEADER.size else b""
    if rest is None:
        return None
    (size,) = HEADER.unpack(data + rest)
    payload = _recv_exact(sock, size) if size <= MAX_REQUEST else None
    request = json.loads(payload) if payload is not None else None
    if not isinstance(request, dict) or len(fds) != (0 if "prepare" in request else 2):
        for fd in fds:
            os.close(fd)
        return None  # a broken request from our own agent: stop rather than guess
    return request, fds


def _base(spec: dict) -> str:
    """What a ready jail is built for: the spec without the command's cwd and environment."""
    return json.dumps({k: v for k, v in spec.items() if k not in ("cwd", "env")}, sort_keys=True)


def _await_command(sock: socket.socket) -> tuple[list[str], dict, str]:
    """In a ready jail: wait for the command, make its output pipe stdout and stderr."""
    data, anc, _, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(4))
    fds = [struct.unpack("i", raw[:4])[0] for lvl, kind, raw in anc if kind == socket.SCM_RIGHTS]
    rest = _recv_exact(sock, HEADER.size - len(data)) if data and len(data) < HEADER.size else b""
    payload = _recv_exact(sock, HEADER.unpack(data + rest)[0]) if data and rest is not None else None
    if payload is None or len(fds) != 1:
        os._exit(0)  # the server closed the socket (it died, or it retired this jail)
    os.dup2(fds[0], 1)
    os.dup2(fds[0], 2)
    os.close(fds[0])
    sock.sendall(b"\x01")  # taken: from here on the command's fate is this jail's
    sock.close()
    msg = json.loads(payload)
    return msg["argv"], msg["env"] or dict(os.environ), msg["cwd"]


def _ready_jail(spec: dict, keep_closed: list[int]) -> tuple[int, socket.socket]:
    """Fork a jail that builds its confinement now and waits for its command (``jail.run`` standby)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in [*keep_closed, ours.fileno()]:
                os.close(fd)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            os.chdir(spec["root"])
            jail.run(spec, [], standby=lambda: _await_command(theirs))
        finally:
            os._exit(126)
    theirs.close()
    return pid, ours


def _hand_over(ready: tuple[int, socket.socket], request: dict, out_fd: int) -> bool:
    """Give a ready jail its command and wait until it has taken it; False (and the jail killed) if
    it is gone or does not answer: the caller then starts one from scratch, so a ready jail that died
    meanwhile never turns into a command that did not run."""
    pid, sock = ready
    spec = request["spec"]
    try:
        _send(sock, {"argv": request["argv"], "env": spec.get("env"), "cwd": spec.get("cwd")}, [out_fd])
        sock.settimeout(HANDOVER_TIMEOUT_S)
        if sock.recv(1) == b"\x01":
            return True
    except OSError:  # socket.timeout included
        pass
    finally:
        sock.close()
    try:
        os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid cannot have been reused
    except ProcessLookupError:
        pass
    return False


def _child(request: dict, out_fd: int, keep_closed: list[int]) -> None:
    """In the forked child: plain signal state, the output pipe as stdout/stderr, then the jail."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in keep_closed:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(null)
        os.close(out_fd)
        spec = request["spec"]
        os.chdir(spec.get("cwd") or spec["root"])
        jail.run(spec, request["argv"])
    finally:
        os._exit(126)  # jail.run never returns; anything that gets here failed before confinement


def _join(cgroups: list[str]) -> None:
    """Enter the sandbox's cgroups, best effort: a jail outside one joins it itself (or fails)."""
    for cg in cgroups:
        try:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass


def serve(sock_fd: int, cgroups: list[str]) -> None:
    """Answer requests until the agent closes the socket or dies (the parent-death signal)."""
    parent = os.getppid()
    jail._libc.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)
    _join(cgroups)
    jail._libc.prctl(jail.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a killed jail come here
    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    waiting: dict[int, int] = {}  # jail pid -> write end of its status pipe
    ready: dict[str, tuple[int, socket.socket]] = {}  # at most one ready jail: base spec -> (pid, socket)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                _drain(wake_r)
                continue
            got = _recv_request(sock)
            if got is None:
                os._exit(0)  # our children die with us (their parent-death signal)
            request, fds = got
            ours = [sock.fileno(), wake_r, wake_w, *waiting.values()]
            if "prepare" in request:
                sock.sendall(PID.pack(_prepare(ready, request["prepare"], ours)))
                continue
            out_fd, status_fd = fds
            pid = 0
            taken = ready.pop(_base(request["spec"]), None)
            if taken is not None and _hand_over(taken, request, out_fd):
                pid = taken[0]
            if pid == 0:
                for other in ready.values():
                    ours.append(other[1].fileno())
                try:
                    pid = os.fork()
                except OSError as exc:
                    pid = -(exc.errno or 1)
                if pid == 0:
                    _child(request, out_fd, [*ours, status_fd])
            os.close(out_fd)
            if pid > 0:
                waiting[pid] = status_fd
            else:
                os.close(status_fd)
            sock.sendall(PID.pack(pid))
        _reap(waiting, ready)


def _prepare(ready: dict[str, tuple[int, socket.socket]], spec: dict, keep_closed: list[int]) -> int:
    """Keep one ready jail for `spec` (replacing one for another spec); its pid, or -errno."""
    key = _base(spec)
    if key in ready:
        return ready[key][0]
    for pid, old in ready.values():
        old.close()  # it exits when it sees the socket close; _reap collects it
    ready.clear()
    try:
        pid, ours = _ready_jail(spec, keep_closed)
    except OSError as exc:
        return -(exc.errno or 1)
    ready[key] = (pid, ours)
    return pid


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _reap(waiting: dict[int, int], ready: dict[str, tuple[int, socket.socket]]) -> None:
    """Collect every ended child; report the jails' statuses on their status pipes, forget a ready
    jail that died before it got a command."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for key, (ready_pid, ready_sock) in list(ready.items()):
            if ready_pid == pid:
                ready_sock.close()
                del ready[key]
        fd = waiting.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, str(status).encode())
            except OSError:
                pass  # the agent stopped waiting for it
            os.close(fd)


if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        sys.stderr.write("usage: forkserver.py SOCKET_FD [CGROUP_DIR...]\n")
        os._exit(2)
    serve(int(sys.argv[1]), sys.argv[2:])
