"""Engines as Ray actors: each actor owns one server subprocess (SGLang or the local HF server).

The actor starts the server with the flags an RL job needs, waits until it answers, restarts it
when it has died, and kills it (its whole process group) on shutdown or when the actor dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.config import RolloutConfig

log = logging.getLogger(__name__)


def server_command(backend: str, model_path: str, port: int, host: str, cfg: RolloutConfig,
                   routing_replay: bool) -> list[str]:
    """The command line of one engine server."""
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
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(model_path), "num_experts_per_tok", 0) or 0) > 0
    except (OSError, ValueError):  # not readable here (e.g. a hub id resolved on the engine's node)
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


@ray.remote(max_concurrency=4)
class EngineActor:
    """Owns one server process; `start` returns its URL."""

    def __init__(self, name: str, backend: str, model_path: str, cfg: RolloutConfig, routing_replay: bool) -> None:
        self.name, self.backend, self.model_path = name, backend, model_path
        self.cfg, self.routing_replay = cfg, routing_replay
        self.host = ray.util.get_node_ip_address()
        self.port = _free_port(self.host)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tempfile.gettempdir(), f"mopd-engine-{name}-{os.getpid()}.log")
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        cmd = server_command(self.backend, self.model_path, self.port, self.host, self.cfg, self.routing_replay)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=_die_with_parent)
        self._wait_healthy()
        return self.url

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"engine {self.name} exited with code {self.proc.returncode} during start-up; "
                                   f"last log lines:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"engine {self.name} did not become healthy within {self.cfg.startup_timeout_s}s "
                           f"(rollout.startup_timeout_s); last log lines:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def ensure_alive(self) -> str:
        """Restart the server (same URL) if its process has exited; returns the URL."""
        if self.proc is None or self.proc.poll() is not None:
            log.warning("engine %s died (code %s); restarting", self.name, self.proc and self.proc.returncode)
            self.restarts += 1
            self.start()
        return self.url

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
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


def launch_engines(model_path: str, cfg: RolloutConfig, *, name: str, num_engines: int | None = None,
                   routing_replay: bool | None = None) -> EngineGroup:
    """Start (or, for backend=remote, attach to) the engines serving `model_path`."""
    if cfg.backend == "remote":
        return EngineGroup(urls=list(cfg.urls))
    n = num_engines or cfg.num_engines
    r3 = (cfg.routing_replay if routing_replay is None else routing_replay) and is_moe(model_path)
    placement = None
    options: list[dict[str, Any]] = []
    if cfg.gpus_per_engine > 0:
        placement = placement_group([{"GPU": cfg.gpus_per_engine, "CPU": cfg.cpus_per_engine}] * n,
                                    strategy="PACK", name=f"{name}-engines")
        ray.get(placement.ready())
        options = [{"num_cpus": cfg.cpus_per_engine, "num_gpus": cfg.gpus_per_engine,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(placement, i)} for i in range(n)]
    else:
        options = [{"num_cpus": cfg.cpus_per_engine}] * n
    actors = [EngineActor.options(**opt).remote(f"{name}-{i}", cfg.backend, model_path, cfg, r3)
              for i, opt in enumerate(options)]
    group = EngineGroup(urls=[], actors=actors, placement=placement)
    try:
        group.urls = ray.get([a.start.remote() for a in actors])
    except BaseException:
        group.shutdown()
        raise
    return group
