"""In-sandbox agent: a small authenticated HTTP server (standard library only, any Python 3.8+ image).

The same file runs as a local process (started by ``envs.sandbox.local``) and as the main process
of a Kubernetes sandbox pod. The trainer side talks to it with ``envs.sandbox.client.AgentClient``.

Endpoints (JSON in/out, ``Authorization: Bearer <token>`` except ``/health``):
  GET  /health                       readiness (no secrets)
  POST /exec    {command, timeout, max_output, cwd?, env?}
  POST /read    {path}               -> {content_b64}
  POST /write   {path, content_b64, mode?}   no mode: keep the replaced file's mode (new: 0644)
  POST /upload  (body: tar) ?dest=   extracted with the tarfile "data" filter (no escapes)
  POST /shutdown

Commands start through ``jail.py`` (its sibling file): own session, rlimits, and, when ``--jail``
asks for them, namespaces, a read-only filesystem, an unprivileged uid and cgroups. By default a
``--exec-mode forkserver`` (what the local backend and sandbox pods ask for) keeps one long-lived
fork server (``forkserver.py``) that forks a fresh jail per command, which saves starting an
interpreter per call; ``process`` (the default) starts ``python jail.py`` per command. Either way
every command gets the same fresh confinement. After a command ends, times out or floods output,
everything it left running is killed.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hmac
import importlib.util
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 256 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
JAIL = os.path.join(HERE, "jail.py")


def _sibling(name: str):
    """Load a sibling file by path: the agent runs as a lone ``python -I -S`` script (and in pods)."""
    spec = importlib.util.spec_from_file_location(f"mopd_sandbox_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


safe_fs = _sibling("safe_fs")
jail = _sibling("jail")
uid_pids, kill_uid = jail.uid_pids, jail.kill_uid  # kill_uid below; uid_pids for tests
PR_SET_DUMPABLE = 4


class AgentError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Process:
    """A command started as its own ``python jail.py`` process (``--exec-mode process``)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stdout_fd = proc.stdout.fileno()
        try:  # a pidfd wakes us the moment it ends; Popen.wait(timeout) polls with growing sleeps
            self._pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # Python < 3.9 (pod images) or Linux < 5.3
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait(self, timeout: float | None) -> bool:
        if timeout is not None and self._pidfd is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
        elif timeout is not None and not select.select([self._pidfd], [], [], timeout)[0]:
            return False
        self.proc.wait()
        return True

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
        self.proc.stdout.close()


class Agent:
    """State and operations; the HTTP handler only decodes requests and encodes replies."""

    def __init__(self, args: argparse.Namespace, token: str) -> None:
        self.root = os.path.realpath(args.root)
        self.token = token.encode()
        self.args = args
        self.jail = dict(json.loads(args.jail) if args.jail else {}, root=self.root)
        self.jail["rlimits"] = dict(args.rlimits or {}, **self.jail.get("rlimits", {}))
        if getattr(args, "command_uid", None) is not None and os.geteuid() == 0 and "uid" not in self.jail:
            # pod mode as root: commands run as another uid, so they cannot read or signal the agent
            self.jail.update(uid=args.command_uid, gid=args.command_uid)
            os.chown(self.root, args.command_uid, args.command_uid)
            os.chmod(self.root, 0o700)
        self.uid = self.jail.get("uid")
        self.gid = self.jail.get("gid")
        self.active: set[int] = set()  # pids of jails of commands in flight
        self.lock = threading.Lock()
        self.shell = next((s for s in ("/bin/bash", "/usr/bin/bash", "/bin/sh") if os.path.exists(s)), "sh")
        # the jail starts privileged: it gets a clean environment (no LD_PRELOAD & co. from the
        # request); the command's environment travels in the spec and is set at exec time
        self.jail_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.forkserver = (
            _sibling("forkserver").ForkServer(self.jail_env, self.jail.get("cgroups"))
            if args.exec_mode == "forkserver"
            else None
        )

    # -- paths: every file operation goes through safe_fs (no link, FIFO or device is followed) ----
    @property
    def owner(self) -> tuple[int, int] | None:
        if self.uid is None:
            return None
        return self.uid, self.gid if self.gid is not None else -1

    # -- operations --------------------------------------------------------------------------------
    def read(self, body: dict) -> dict:
        limit = _int_field(body, "max_bytes", 16 << 20, 0, MAX_BODY)
        data = safe_fs.read_file(self.root, body.get("path"), limit)
        return {"content_b64": base64.b64encode(data).decode()}

    def write(self, body: dict) -> dict:
        try:
            data = base64.b64decode(body.get("content_b64", ""), validate=True)
        except (ValueError, TypeError):
            raise AgentError(400, "field `content_b64` must be base64") from None
        mode = None if body.get("mode") is None else _int_field(body, "mode", 0o644, 0, 0o777)
        safe_fs.write_file(self.root, body.get("path"), data, mode, self.owner)
        return {"bytes": len(data)}

    def upload(self, dest: str, data: bytes) -> dict:
        target = safe_fs.make_dirs(self.root, dest or ".", self.owner)
        rel = os.path.relpath(target, self.root)

        def guarded(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
            safe_fs.check_extract_target(self.root, rel, member.name, member.isdir())
            return tarfile.data_filter(member, path)

        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = tar.getnames()
                tar.extractall(target, filter=guarded)
        except (tarfile.TarError, OSError) as exc:
            raise AgentError(400, f"bad tar upload: {exc}") from None
        if self.uid is not None:
            for dirpath, dirnames, filenames in os.walk(target):
                for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                    os.chown(name, *self.owner, follow_symlinks=False)
        return {"files": len(names)}

    def exec(self, body: dict) -> dict:
        command = body.get("command")
        if not isinstance(command, str):
            raise AgentError(400, "field `command` must be a string")
        timeout = _float_field(body, "timeout", self.args.default_timeout, 0.0, self.args.max_timeout)
        cap = min(_int_field(body, "max_output", self.args.max_output, 0, 1 << 40), self.args.max_output)
        cwd = safe_fs.existing_dir(self.root, body.get("cwd") or ".")
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": self.root,
            "TMPDIR": os.path.join(self.root, ".tmp"),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.update(self.jail.get("base_env") or {})
        safe_fs.make_dirs(self.root, ".tmp", self.owner)
        env.update({str(k): str(v) for k, v in (body.get("env") or {}).items()})
        start = time.monotonic()
        spec, argv = dict(self.jail, cwd=cwd, env=env), [self.shell, "-c", command]
        with self.lock:
            proc = self._start(spec, argv)
            self.active.add(proc.pid)
        result = None
        try:
            result = self._run(proc, cap, timeout, start)
            return result
        finally:
            with self.lock:
                self.active.discard(proc.pid)
            proc.close()
            if result is None or result["killed_reason"] is not None:
                self.kill_orphans()  # a jail that exited by itself had killed everything below it

    def prepare_next(self) -> None:
        """Have the fork server build the next command's jail while nothing runs (its namespaces and
        mounts then cost the next call nothing: forkserver.py). Never while a command runs: the
        sweeps after a command must not meet a ready jail (it is in the sandbox's cgroups)."""
        if self.forkserver is None:
            return
        with self.lock:
            if not self.active:
                self.forkserver.prepare(self.jail)

    def _start(self, spec: dict, argv: list[str]) -> Any:
        """A started command (``Process``, or the fork server's ``Started``: same attributes)."""
        if self.forkserver is not None:
            return self.forkserver.spawn(spec, argv)
        return Process(
            subprocess.Popen(
                [sys.executable, "-I", "-S", JAIL, json.dumps(spec), "--", *argv],
                cwd=spec["cwd"],
                env=self.jail_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _run(self, proc: Any, cap: int, timeout: float, start: float) -> dict:
        chunks: list[bytes] = []
        state = {"size": 0, "flood": False}

        def pump() -> None:
            while True:
                chunk = os.read(proc.stdout_fd, 65536)
                if not chunk:
                    return
                if state["size"] < cap:
                    chunks.append(chunk[: cap - state["size"]])
                state["size"] += len(chunk)
                if state["size"] > cap and not state["flood"]:
                    state["flood"] = True
                    self.kill_group(proc.pid)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = not proc.wait(timeout)
        # the command's leftovers (background jobs, fork bombs) go too; below a jail that was already
        # reaped there is no tree left (its orphans went to a subreaper: kill_orphans' business)
        self.kill_group(proc.pid, tree=timed_out)
        proc.wait(None)
        reader.join(timeout=2.0)
        code = proc.returncode
        reason = "timeout" if timed_out else "output_limit" if state["flood"] else None
        if reason is None and code is not None and code < 0:
            reason = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else "signal"
        return {
            "exit_code": code,
            "output": b"".join(chunks).decode("utf-8", "replace"),
            "truncated": state["size"] > cap,
            "output_bytes": state["size"],
            "timed_out": timed_out,
            "killed_reason": reason,
            "duration_s": round(time.monotonic() - start, 4),
        }

    def kill_group(self, pgid: int, tree: bool = True) -> None:
        """Kill a command's process tree and group, its cgroups and (jailed) the sandbox uid's processes."""
        if tree:
            jail.kill_descendants(pgid, reap=False)  # daemons that left the group still hang below the jail
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with self.lock:
            others = self.active - {pgid}
        if others:  # sweeping the cgroups or the uid would kill a concurrent command of this sandbox
            return
        server = self.forkserver.pid if self.forkserver is not None else None
        for cg in self.jail.get("cgroups", []):
            jail.kill_cgroup(cg, spare=server)  # the fork server lives in them (forkserver.py)
        if self.uid is not None and self.uid != os.getuid():
            kill_uid(self.uid)

    def kill_orphans(self) -> None:
        """Kill what reparented to the agent or its fork server (both subreapers) from a command
        whose jail died first; the fork server reaps its own."""
        me = os.getpid()
        server = self.forkserver.pid if self.forkserver is not None else None
        for _ in range(200):
            with self.lock:
                tree = jail._children()
                mine = [p for p in tree.get(me, []) if p not in self.active and p != server]
                strays = mine + [p for p in tree.get(server, []) if p not in self.active]
                for pid in strays:
                    jail.kill_descendants(pid, reap=False)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                for pid in mine:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
            if not strays:
                return


def _int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise AgentError(400, f"field `{name}` must be an integer in [{low}, {high}], got {value!r}")
    return value


def _float_field(body: dict, name: str, default: float, low: float, high: float) -> float:
    """A finite number in (low, high]: NaN or 1e400 must never switch a limit off."""
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AgentError(400, f"field `{name}` must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = float("inf")
    if not (low < value <= high):  # also False for NaN
        raise AgentError(400, f"field `{name}` must be a finite number in ({low:g}, {high:g}], got {value!r}")
    return value


class Handler(BaseHTTPRequestHandler):
    agent: Agent
    server_version = "mopd-sandbox-agent/1"
    protocol_version = "HTTP/1.1"  # keep-alive: no connection (and handler thread) per request
    disable_nagle_algorithm = True  # else a reply's body waits on the client's delayed ACK (40 ms)

    def log_message(self, fmt: str, *args: object) -> None:  # quiet; errors go back to the caller
        pass

    def _reply(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        expected = b"Bearer " + self.agent.token
        return hmac.compare_digest(got.encode("utf-8", "replace"), expected)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"ok": True, "jail": sorted(k for k, v in self.agent.jail.items() if v)})
        else:
            self._reply(404, {"error": f"unknown endpoint {self.path}"})

    def do_POST(self) -> None:
        if not self._authorized():
            # close: the unread body must not be parsed as the next request on this connection
            self._reply(401, {"error": "missing or wrong sandbox token"}, close=True)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, {"error": f"request body larger than {MAX_BODY} bytes"}, close=True)
            return
        raw = self.rfile.read(length)
        route, _, query = self.path.partition("?")
        try:
            if route == "/upload":
                dest = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("dest", ".")
                self._reply(200, self.agent.upload(dest, raw))
                return
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise AgentError(400, "request body must be a JSON object")
            if route == "/exec":
                self._reply(200, self.agent.exec(body))
                self.agent.prepare_next()  # after the reply: off the caller's critical path
            elif route == "/read":
                self._reply(200, self.agent.read(body))
            elif route == "/write":
                self._reply(200, self.agent.write(body))
            elif route == "/shutdown":
                self._reply(200, {"ok": True})
                threading.Thread(target=self.server.shutdown, daemon=True).start()
            else:
                self._reply(404, {"error": f"unknown endpoint {route}"})
        except (AgentError, safe_fs.Refused) as exc:
            self._reply(exc.status, {"error": str(exc)})
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            self._reply(400, {"error": f"bad request: {exc}"})
        except OSError as exc:
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})


def _read_token(args: argparse.Namespace) -> str:
    """The token from a file (deleted once read, so commands never find it) or the environment."""
    token = os.environ.pop(args.token_env, "")
    if args.token_file == "-":
        token = sys.stdin.readline().strip()
    elif args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            sys.stderr.write(f"agent: cannot read --token-file: {exc}\n")
            sys.exit(2)
        try:
            os.unlink(args.token_file)
        except OSError:
            pass
    return token


def _watch_parent(parent: int, server: ThreadingHTTPServer) -> None:
    """Exit when the process that started us is gone (local mode): no orphaned sandboxes."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            server.shutdown()
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root", default=os.getcwd())
    p.add_argument("--token-env", default="MOPD_SANDBOX_TOKEN", help="env var holding the token")
    p.add_argument("--token-file", default="", help="file holding the token, removed once read ('-': stdin)")
    p.add_argument("--command-uid", type=int, default=None, help="run commands as this uid (agent as root)")
    p.add_argument("--max-output", type=int, default=65536)
    p.add_argument("--default-timeout", type=float, default=120.0)
    p.add_argument("--max-timeout", type=float, default=3600.0, help="largest per-call timeout accepted")
    p.add_argument("--rlimits", type=json.loads, default={}, help='e.g. {"RLIMIT_CPU": 60}')
    p.add_argument("--jail", default="", help="JSON spec for jail.py (local backend)")
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument(
        "--exec-mode",
        choices=("forkserver", "process"),
        default="process",
        help="forkserver: one long-lived fork server forks each command's jail; process: python jail.py per command",
    )
    args = p.parse_args(argv)
    token = _read_token(args)
    libc = ctypes.CDLL(None, use_errno=True)
    # not dumpable: commands of the same uid cannot read /proc/<agent>/{environ,mem} or ptrace it
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(jail.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of commands come back to us
    if len(token) < 16:
        sys.stderr.write(f"agent: ${args.token_env} must hold a token of >= 16 characters\n")
        sys.exit(2)
    os.makedirs(args.root, exist_ok=True)
    Handler.agent = Agent(args, token)
    if Handler.agent.forkserver is not None:
        Handler.agent.forkserver.ensure()  # it starts up while we bind and report READY
        threading.Thread(target=Handler.agent.prepare_next, daemon=True).start()  # the first jail
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if Handler.agent.forkserver is not None:
            Handler.agent.forkserver.close()
        if Handler.agent.uid is not None and Handler.agent.uid != os.getuid():
            kill_uid(Handler.agent.uid)
        shutil.rmtree(os.path.join(Handler.agent.root, ".tmp"), ignore_errors=True)


if __name__ == "__main__":
    main()
