"""Engines as Ray actors: each actor owns one server subprocess (SGLang or the local HF server).

The actor starts the server with the flags an RL job needs, waits until it answers, and kills it
(its whole process group) on shutdown or when the actor dies. A watchdog thread restarts a server
that died, on the same URL, so a step in flight fails over and then comes back to it. A restarted
server loads the latest weights pushed to it, not the original checkpoint: after every push the
trainer records `(model path, weight version)` for each engine URL in Ray's key-value store
(`WEIGHTS_KEY_PREFIX`, the same string in trainer/weight_sync.py), and the restart starts the server
from that path with that `--weight-version`. Teachers (never pushed to) restart from their checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mopd.core.model_shape import read_model_shape
from rollout import speculative
from rollout.config import EngineConfig, RolloutConfig

log = logging.getLogger(__name__)

# Ray KV key (plus the engine URL) under which the trainer records the latest weights pushed to an engine;
# trainer/weight_sync.py writes it with the same prefix (rollout and trainer do not import each other).
WEIGHTS_KEY_PREFIX = "mopd/pushed-weights/"


def latest_pushed_weights(url: str) -> tuple[str, str] | None:
    """(model path, weight version) last pushed to the engine at `url`, if the trainer recorded one."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    raw = internal_kv._internal_kv_get((WEIGHTS_KEY_PREFIX + url.rstrip("/")).encode())
    if not raw:
        return None
    record = json.loads(raw)
    return str(record["path"]), str(record["version"])


ENGINE_PORT_KEY_PREFIX = "mopd/engine-port/"


def _kv_get(key: str) -> str | None:
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    raw = internal_kv._internal_kv_get(key.encode())
    return raw.decode() if raw else None


def _kv_put(key: str, value: str) -> None:
    from ray.experimental import internal_kv

    if internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_put(key.encode(), value.encode(), overwrite=True)


def _wait_port_free(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.2)


def _forget_pushed_weights(url: str) -> None:
    from ray.experimental import internal_kv

    if internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_del((WEIGHTS_KEY_PREFIX + url.rstrip("/")).encode())


def server_command(backend: str, model_path: str, port: int, host: str, cfg: RolloutConfig,
                   routing_replay: bool, weight_version: str | None = None) -> list[str]:
    """The command line of one engine server (`weight_version`: what it reports, after a restart)."""
    cmd = _server_command(backend, model_path, port, host, cfg, routing_replay)
    cmd += speculative.engine_args(cfg, model_path)  # MTP draft flags; none for a checkpoint without MTP
    if weight_version is not None:
        cmd += ["--weight-version", str(weight_version)]
    return cmd


def _server_command(backend: str, model_path: str, port: int, host: str, cfg: RolloutConfig,
                    routing_replay: bool) -> list[str]:
    if backend == "local":
        cmd = [sys.executable, "-m", "rollout.hf_server", "--model-path", model_path, "--host", host,
               "--port", str(port), "--max-batch-size", str(cfg.max_batch_size),
               "--max-context-len", str(cfg.max_context_len),
               "--device", "cuda" if cfg.gpus_per_engine > 0 else "cpu"]
        if routing_replay:
            cmd.append("--enable-return-routed-experts")
        return cmd
    if backend == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host,
               "--port", str(port), "--tp-size", str(max(cfg.gpus_per_engine, 1)),
               "--mem-fraction-static", str(cfg.mem_fraction_static), "--skip-server-warmup",
               "--context-length", str(cfg.max_context_len)]
        if routing_replay:
            cmd.append("--enable-return-routed-experts")
        for key, value in cfg.sglang_args.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is not False and value is not None:
                cmd += [flag, str(value)]
        return cmd
    raise ValueError(f"rollout.backend={backend!r}: expected local or sglang for a launched engine")


def is_moe(model_path: str) -> bool:
    """Routing replay only applies to MoE models; a dense engine is started without capture."""
    try:
        return read_model_shape(model_path).is_moe
    except OSError:  # not readable here (e.g. a hub id resolved on the engine's node)
        return True


def _die_with_parent() -> None:
    """preexec_fn: own process group, and SIGTERM when the actor process dies (Linux prctl)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


ENGINE_ACTOR_RESTARTS = 5  # times Ray brings back a dead engine actor (its server dies with it)


@ray.remote(max_concurrency=4)
class EngineActor:
    """Owns one server process; `start` returns its URL; a watchdog restarts the server when it dies."""

    watch_interval_s = 0.5

    def __init__(self, name: str, backend: str, model_path: str, cfg: RolloutConfig, routing_replay: bool) -> None:
        self.name, self.backend, self.model_path = name, backend, model_path
        self.cfg, self.routing_replay = cfg, routing_replay
        self.host = ray.util.get_node_ip_address()
        context = ray.get_runtime_context()
        # Ray restarts a dead engine actor (max_restarts): the new one serves on the same URL again
        port_key = f"{ENGINE_PORT_KEY_PREFIX}{context.get_job_id()}/{name}"
        reconstructed = context.was_current_actor_reconstructed
        saved = _kv_get(port_key) if reconstructed else None
        self.port = int(saved) if saved else _free_port(self.host)
        self._port_key, self._port_fixed = port_key, bool(saved)  # a URL clients know is never changed
        _kv_put(port_key, str(self.port))
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tempfile.gettempdir(), f"mopd-engine-{name}-{os.getpid()}.log")
        if not reconstructed:
            _forget_pushed_weights(self.url)  # a record left by an earlier engine on this port is not ours
        self.served: tuple[str, str | None] = (model_path, None)  # (weights path, weight version) now served
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.ready = False  # healthy and serving `served` (False while a restart is in progress)
        if reconstructed:
            log.warning("engine actor %s was restarted by Ray; starting its server again on %s", name, self.url)
            _wait_port_free(self.host, self.port, timeout=30.0)  # the old server is still exiting
            self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Start the server from the latest weights pushed to this URL (the checkpoint if none) and wait for it.

        A free port can be taken by another process between choosing it and the server binding it; until
        the URL has been handed out, that start is retried on a new port."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError as e:
                if self._port_fixed or attempt == 2 or "address already in use" not in str(e).lower():
                    raise
                old_url, self.port = self.url, _free_port(self.host)
                log.warning("engine %s: port of %s was taken before the server bound it; retrying on %s",
                            self.name, old_url, self.url)
                _forget_pushed_weights(self.url)
                _kv_put(self._port_key, str(self.port))
        raise AssertionError("unreachable")

    def _start(self) -> str:
        with self._lock:
            self._stopping.clear()
            self.ready = False
            path, version = latest_pushed_weights(self.url) or (self.model_path, None)
            if not os.path.exists(path):  # a snapshot that is gone (cleaned up): say so, serve the checkpoint
                log.error("engine %s: latest pushed weights %s are missing; starting from %s",
                          self.name, path, self.model_path)
                path, version = self.model_path, None
            cmd = server_command(self.backend, path, self.port, self.host, self.cfg, self.routing_replay, version)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=_die_with_parent)
            self._wait_healthy()
            self.served = (path, version)
            self.ready = True
            self._port_fixed = True  # from here on clients hold this URL: restarts keep it
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = threading.Thread(target=self._watch, name=f"watchdog-{self.name}", daemon=True)
                self._watchdog.start()
        return self.url

    def _watch(self) -> None:
        """Restart the server whenever its process exits (unless we stopped it)."""
        failures = 0
        while not self._stopping.wait(self.watch_interval_s):
            if self.proc is None or self.proc.poll() is None:
                continue
            try:
                self.ensure_alive()
                failures = 0
            except Exception:
                failures += 1
                log.exception("engine %s: restart %d failed", self.name, failures)
                self._stopping.wait(min(2.0 ** failures, 30.0))

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"engine {self.name} exited with code {self.proc.returncode} during start-up; "
                                   f"last log lines:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.25)
        self._kill()
        raise TimeoutError(f"engine {self.name} did not become healthy within {self.cfg.startup_timeout_s}s "
                           f"(rollout.startup_timeout_s); last log lines:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def ensure_alive(self) -> str:
        """Restart the server (same URL, latest pushed weights) if its process has exited; returns the URL."""
        with self._lock:
            if self._stopping.is_set():
                return self.url
            if self.proc is None or self.proc.poll() is not None:
                log.warning("engine %s died (code %s); restarting", self.name, self.proc and self.proc.returncode)
                self.start()
        return self.url

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def actor_pid(self) -> int:
        """The actor's own process (to test what happens when it dies)."""
        return os.getpid()

    def status(self) -> dict[str, Any]:
        """What the actor knows: URL, server pid, and the weights it (re)started from."""
        return {"url": self.url, "pid": self.pid(), "served_path": self.served[0],
                "served_version": self.served[1],
                "alive": self.ready and self.proc is not None and self.proc.poll() is None,
                "latest_pushed": latest_pushed_weights(self.url)}

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop watching and kill the server's process group (waits for a restart in progress)."""
        self._stopping.set()
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


@dataclass
class EngineGroup:
    """The engines of one model (the student, or one teacher): their URLs and the actors behind them."""

    urls: list[str]
    actors: list[Any] = field(default_factory=list)
    placement: PlacementGroup | None = None

    def ensure_alive(self) -> list[str]:
        """Restart dead servers; the URLs stay the same."""
        if self.actors:
            self.urls = ray.get([a.ensure_alive.remote() for a in self.actors])
        return self.urls

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the actor may already be gone; kill it regardless
                pass
            ray.kill(actor)
        self.actors = []
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None


def _wait_placed(placement: PlacementGroup, name: str, n: int, cfg: EngineConfig) -> None:
    """A placement group the cluster cannot hold stays pending forever: wait startup_timeout_s, then say why."""
    try:
        ray.get(placement.ready(), timeout=cfg.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(placement)
        free = {k: v for k, v in ray.available_resources().items() if k in ("GPU", "CPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("GPU", "CPU")}
        raise RuntimeError(
            f"{name} engines: {n} x {{GPU: {cfg.gpus_per_engine}, CPU: {cfg.cpus_per_engine}}} (num_engines x "
            f"gpus_per_engine, cpus_per_engine) not placed within {cfg.startup_timeout_s}s (startup_timeout_s); the "
            f"cluster has {total}, free now {free}") from None


def launch_engines(model_path: str, cfg: EngineConfig, *, name: str, num_engines: int | None = None,
                   routing_replay: bool | None = None) -> EngineGroup:
    """Start (or, for backend=remote, attach to) the engines serving `model_path` (the student's rollout
    config or a teacher's, both EngineConfigs; R3 capture defaults to a RolloutConfig's routing_replay)."""
    if cfg.backend == "remote":
        return EngineGroup(urls=list(cfg.urls))
    n = num_engines or cfg.num_engines
    if routing_replay is None:
        routing_replay = isinstance(cfg, RolloutConfig) and cfg.routing_replay
    r3 = routing_replay and is_moe(model_path)
    placement = None
    options: list[dict[str, Any]] = []
    if cfg.gpus_per_engine > 0:
        placement = placement_group([{"GPU": cfg.gpus_per_engine, "CPU": cfg.cpus_per_engine}] * n,
                                    strategy="PACK", name=f"{name}-engines")
        _wait_placed(placement, name, n, cfg)
        options = [{"num_cpus": cfg.cpus_per_engine, "num_gpus": cfg.gpus_per_engine,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(placement, i)} for i in range(n)]
    else:
        options = [{"num_cpus": cfg.cpus_per_engine}] * n
    # Ray restarts an engine actor whose process died; calls made meanwhile wait for it (all are idempotent)
    options = [dict(opt, max_restarts=ENGINE_ACTOR_RESTARTS, max_task_retries=-1) for opt in options]
    actors = [EngineActor.options(**opt).remote(f"{name}-{i}", cfg.backend, model_path, cfg, r3)
              for i, opt in enumerate(options)]
    group = EngineGroup(urls=[], actors=actors, placement=placement)
    try:
        group.urls = ray.get([a.start.remote() for a in actors])
    except BaseException:
        group.shutdown()
        raise
    return group
