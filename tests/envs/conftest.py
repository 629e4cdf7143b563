"""Fixtures for environment and sandbox tests: a local sandbox backend in a private base dir."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import pytest_asyncio

from envs.config import SandboxConfig
from envs.sandbox.local import LocalSandboxBackend


@pytest.fixture
def sandbox_base():
    """A world-searchable base dir (pytest's tmp_path is 0700 and the sandbox uid could not enter it)."""
    path = tempfile.mkdtemp(prefix="mopd-sbtest-", dir="/tmp")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox_config(sandbox_base) -> SandboxConfig:
    return SandboxConfig(
        cpu_time_s=20,
        memory_mb=768,
        wall_timeout_s=30,
        max_output_bytes=65536,
        max_procs=48,
        file_size_mb=16,
        base_dir=sandbox_base,
    )


@pytest.fixture
def backend(sandbox_config) -> LocalSandboxBackend:
    return LocalSandboxBackend(sandbox_config)


@pytest_asyncio.fixture
async def sandbox(backend):
    sb = await backend.create()
    yield sb
    await sb.close()


# -- Kubernetes API emulator (kmock) on 127.0.0.1, with fault injection and a test "kubelet" --------
import asyncio  # noqa: E402
import base64  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import kmock  # noqa: E402
from kmock._internal import apps as kmock_apps  # noqa: E402
from kmock._internal.k8s import KubernetesError  # noqa: E402
from kubernetes import client as k8s  # noqa: E402

from envs.sandbox.isolation import detect  # noqa: E402
from envs.sandbox.jail import RUN  # noqa: E402
from envs.sandbox.local import HIDE, python_spec  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "..", "..", "envs", "sandbox")
JAIL = os.path.join(HERE, "jail.py")
_POD_UIDS = itertools.count(270000 + os.getpid() % 1000 * 50)


def start_pod_agent(pod_dir: str, token: str, args: list[str], sources: dict[str, str] | None = None):
    """Emulate a sandbox pod: the real agent in pod mode (no command jail) inside a "container": its
    own PID, mount and IPC namespaces, a read-only filesystem except the pod dir, a non-root uid (like
    runAsUser), the agent sources copied in (the ConfigMap) and the token in a file (the Secret copy).
    Returns (process, port, uid). Without root/namespaces the agent simply runs as this user."""
    uid = next(_POD_UIDS)
    iso = detect()
    contained = iso.setuid and iso.fs_readonly and iso.pid_ns
    for sub in ("opt", "workspace", "run"):
        os.makedirs(os.path.join(pod_dir, sub), exist_ok=True)
    os.chmod(pod_dir, 0o711)
    for name in ("agent.py", "jail.py", "safe_fs.py", "forkserver.py"):
        dst = os.path.join(pod_dir, "opt", name)
        if sources and name in sources:
            with open(dst, "w") as f:
                f.write(sources[name])
        else:
            shutil.copy(os.path.join(HERE, name), dst)
    token_file = os.path.join(pod_dir, "run", "token")
    with open(token_file, "w") as f:
        f.write(token)
    os.chmod(token_file, 0o400)
    agent = [os.path.join(pod_dir, "opt", "agent.py"), "--host", "127.0.0.1", "--port", "0"]
    agent += ["--root", os.path.join(pod_dir, "workspace"), "--token-file", token_file, *args]
    if contained:
        for sub in ("workspace", "run", "run/token"):
            os.chown(os.path.join(pod_dir, sub), uid, uid)
        os.chmod(os.path.join(pod_dir, "workspace"), 0o700)
        py = python_spec()
        spec = {
            "root": pod_dir,
            "fs_readonly": True,
            "hide": HIDE,
            "expose": [py["prefix"]],
            "python": py,
            "pid_ns": True,
            "ipc_ns": True,
            "uid": uid,
            "gid": uid,
            "env": {
                "PATH": f"{RUN}/venv/bin:{RUN}/python/bin:/usr/local/bin:/usr/bin:/bin",
                "LD_LIBRARY_PATH": f"{RUN}/python/lib",
            },
        }
        python = f"{RUN}/venv/bin/python3" if py.get("site") else f"{RUN}/python/bin/python3"
        cmd = [sys.executable, "-I", "-S", JAIL, json.dumps(spec), "--", python, *agent]
        env = None
    else:
        cmd = [sys.executable, *agent]
        env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    line = proc.stdout.readline()
    if not line.startswith(b"READY "):
        proc.kill()
        raise RuntimeError(f"pod agent did not start: {line!r}")
    return proc, int(line.split()[1]), uid


class FaultyEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus injected failures that happen before any state change (like a real
    apiserver rejecting a request), e.g. ``faults.append(["POST", "/pods", 429, 2])``."""

    faults: list = []

    async def _handle(self, request):
        for fault in self.faults:
            method, path, status, count = fault
            if count > 0 and str(request.method).upper().endswith(method) and path in request.url.path:
                fault[3] -= 1
                return await self._render_error(
                    KubernetesError(status=status, reason="Injected", message=f"injected {status}")
                )
        return await super()._handle(request)


class Emulator:
    def __init__(self) -> None:
        self.url = ""
        self.handler: FaultyEmulator | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    async def _main(self) -> None:
        async with FaultyEmulator() as handler, kmock_apps.Server(handler, host="127.0.0.1") as server:
            handler.faults = []
            handler.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
            handler.resources["v1/configmaps"] = kmock.ResourceInfo(kind="ConfigMap", namespaced=True)
            handler.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True)
            self.handler, self.url = handler, str(server.url).rstrip("/")
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def api(self) -> k8s.CoreV1Api:
        cfg = k8s.Configuration()
        cfg.host = self.url
        return k8s.CoreV1Api(k8s.ApiClient(cfg))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class FakeKubelet:
    """Plays the kubelet: for each new sandbox pod, runs the real agent as a local process on
    127.0.0.1 with the pod's token, then reports the pod Running/Ready with podIP 127.0.0.1."""

    def __init__(self, emulator: Emulator, namespace: str, root: str) -> None:
        self.api, self.namespace, self.root = emulator.api(), namespace, root
        self.agents: dict[str, tuple[subprocess.Popen, int]] = {}
        self.uids: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def endpoint(self, pod) -> str:
        return f"http://{pod.status.pod_ip}:{self.agents[pod.metadata.name][1]}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = {p.metadata.name: p for p in self.api.list_namespaced_pod(self.namespace).items}
            except Exception:  # noqa: BLE001 - injected faults hit the kubelet too; try again
                time.sleep(0.05)
                continue
            for name, pod in pods.items():
                if name not in self.agents:
                    self._start(pod)
            for name in list(self.agents):
                if name not in pods:
                    proc, _ = self.agents.pop(name)
                    proc.kill()
                    proc.wait()
            time.sleep(0.05)

    def _start(self, pod) -> None:
        c = pod.spec.containers[0]
        secret = next(v.secret.secret_name for v in pod.spec.volumes if v.secret)
        for _ in range(100):  # like a kubelet: the pod waits until its Secret exists
            try:
                data = self.api.read_namespaced_secret(secret, self.namespace).data
                break
            except Exception:  # noqa: BLE001 - 404 until the backend has created it
                time.sleep(0.05)
        else:
            return
        token = base64.b64decode(data["token"]).decode()
        cm = self.api.read_namespaced_config_map("mopd-sandbox-agent", self.namespace).data
        args = c.command[c.command.index("--max-output") :]  # the pod's own agent flags
        # the "image": python3 on PATH is this interpreter (it has pytest, like a SWE image)
        proc, port, uid = start_pod_agent(os.path.join(self.root, pod.metadata.name), token, args, cm)
        self.agents[pod.metadata.name] = (proc, port)
        self.uids[pod.metadata.name] = uid
        status = {
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        }
        for _ in range(20):
            try:
                self.api.patch_namespaced_pod_status(pod.metadata.name, self.namespace, status)
                return
            except Exception:  # noqa: BLE001 - retry through injected faults
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for proc, _ in self.agents.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def k8s_env(sandbox_base):
    emulator = Emulator()
    kubelet = FakeKubelet(emulator, "mopd-sandboxes", sandbox_base)
    yield emulator, kubelet
    kubelet.stop()
    emulator.stop()


async def new_pod_sandbox(base_dir: str):
    """A pod-mode agent (see start_pod_agent) as a Sandbox; info has the uid, pod dir and token."""
    import secrets

    from envs.sandbox.base import Sandbox
    from envs.sandbox.client import AgentClient

    token = secrets.token_urlsafe(32)
    pod_dir = os.path.join(base_dir, "pod-" + secrets.token_hex(3))
    proc, port, uid = await asyncio.to_thread(
        start_pod_agent,
        pod_dir,
        token,
        ["--max-output", "65536", "--default-timeout", "30", "--exec-mode", "forkserver"],
    )

    async def closer() -> None:
        proc.kill()
        proc.wait()

    info = {"uid": uid, "dir": pod_dir, "token": token, "agent_pid": proc.pid, "port": port}
    return Sandbox("pod", AgentClient(f"http://127.0.0.1:{port}", token), closer, info)


@pytest.fixture(scope="session")
def pod_sandbox_maker():
    return new_pod_sandbox


@pytest_asyncio.fixture
async def pod_sandbox(sandbox_base):
    sb = await new_pod_sandbox(sandbox_base)
    yield sb
    await sb.close()
