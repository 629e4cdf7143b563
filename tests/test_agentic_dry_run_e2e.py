"""The agentic dry run through the real CLI: a multi-turn tool domain (episodes in sandboxes through the
ToolManager -> Toolbox) mixed with a single-turn one, trained with MOPD; then the same loop on pods of the
Kubernetes emulator (tests/envs/conftest.py)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.envs.conftest import Emulator, FakeKubelet, start_pod_agent
from tests.rollout.conftest import free_port

pytestmark = pytest.mark.slow

SHORT = ["experiment=agentic_dry_run", "logger.progress=false"]
STEP_METRICS = ("agent/turns", "agent/tool_calls", "agent/tool_errors", "agent/tool_latency_p50_s",
                "agent/tool_latency_p99_s", "rollout/prefill_tokens", "rollout/cached_tokens",
                "rollout/reward/arith", "rollout/reward/tool", "mopd/reverse_kl/arith", "mopd/reverse_kl/tool")
# the toy chat template's tool message (mopd/toy/tokenizer.py) and the glue before the next model turn
TOOL_MESSAGE = "<|im_start|>user\n<tool_response>\n"
NEXT_TURN = "</tool_response><|im_end|>\n<|im_start|>assistant\n"


def _train(*overrides: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mopd.train", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rows(run_dir: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples" / f"step_{step}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("agentic") / "run"
    start = time.monotonic()
    proc = _train(*SHORT, f"run_dir={run_dir}", timeout=1500)  # 164 s measured alone, 9 min on a busy machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (run_dir.parent / "seconds").write_text(f"{time.monotonic() - start:.0f}")
    return run_dir


def test_every_step_logs_agent_cache_reward_and_kl_metrics(run_dir: Path):
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(20))
    for m in metrics:
        for key in STEP_METRICS:
            assert isinstance(m.get(key), (int, float)), (key, m)
        assert m["agent/turns"] >= 1 and m["agent/tool_calls"] > 0, m
        assert 0 <= m["agent/tool_latency_p50_s"] <= m["agent/tool_latency_p99_s"], m
        assert m["rollout/prefill_tokens"] > 0
    # turns after the first re-send the conversation so far: the request-level prefix cache serves it
    # (measured: 700-1800 cached tokens per step). A step whose episodes all ended after one turn (the model
    # answered without a tool call) has nothing to serve from the cache.
    cached = [(m["agent/turns"], m["rollout/cached_tokens"]) for m in metrics]
    assert all(tokens > 0 for turns, tokens in cached if turns > 1), cached
    assert sum(tokens > 0 for _, tokens in cached) >= len(cached) // 2, cached
    # issue 13's budget: >= 20 steps from a fresh toy world in <= 5 minutes on the 2-core CPU (recorded, not
    # asserted: timings belong to benchmarks/)
    print(f"agentic dry run: {(run_dir.parent / 'seconds').read_text()} s")


def test_tool_domain_reverse_kl_falls(run_dir: Path):
    kl = [m["mopd/reverse_kl/tool"] for m in _metrics(run_dir)]
    first = sum(kl[:5]) / 5
    lowest = min(sum(kl[i:i + 5]) / 5 for i in range(5, len(kl) - 4))
    # measured (2026-11-30, 3 runs of 20 steps on the loaded 2-core machine): the first-5 mean is 5.6-5.7 nats; it
    # stays there for 10-15 steps, then falls (lowest 5-step mean 3.1-3.9, a fall of 1.8-2.6). When the fall
    # starts varies between runs of the same seed, and where it starts late the last 5 steps catch only its
    # beginning (one CI run's last-5 mean fell 0.6); the lowest window is the robust reading. Step-to-step noise ~0.4 (0.2 on a 5-step mean); the tool domain's
    # reward stays 0: the toy student never finds the value in 20 steps
    assert lowest < first - 0.5, kl


def test_sample_dumps_show_whole_conversations(run_dir: Path):
    rows = [r for step in range(20) for r in _rows(run_dir, step)]
    tool = [r for r in rows if r["domain"] == "tool"]
    assert tool and any(r["domain"] == "arith" for r in rows)
    assert not any(TOOL_MESSAGE in r["response"] for r in rows if r["domain"] == "arith")
    # a tool episode's dumped response is the whole conversation after the prompt: the model's call, the
    # sandbox's answer in the template's tool message, and the model's next turn
    whole = [r for r in tool if TOOL_MESSAGE in r["response"]]
    assert len(whole) >= len(tool) // 10, [r["response"] for r in tool[:3]]
    for r in whole:
        first_turn = r["response"].split(TOOL_MESSAGE)[0]
        assert "tool_call>" in first_turn, r["response"]  # an answer without a call would end the episode
        assert r["response"].count(TOOL_MESSAGE) == r["response"].count(NEXT_TURN), r["response"]
    assert any(r["response"].split(NEXT_TURN)[-1] for r in whole)


def test_checkpoints_and_resume_two_more_steps(run_dir: Path):
    for step in (10, 20):
        assert (run_dir / "checkpoints" / f"step_{step}" / "driver.json").is_file()
    proc = _train(*SHORT, f"run_dir={run_dir}", "num_steps=22", "resume=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(22))
    assert metrics[-1]["rollout/weight_version"] == 22 and metrics[-1]["agent/tool_calls"] > 0
    positions = [r["prompt_index"] for step in (20, 21) for r in _rows(run_dir, step)]
    earlier = {r["prompt_index"] for step in range(20) for r in _rows(run_dir, step)}
    assert positions and not set(positions) & earlier  # resumed data stream: no prompt repeated


# -- the same loop on Kubernetes pods ------------------------------------------------------------------
NAMESPACE = "mopd-sandboxes"


class PodNetworkKubelet(FakeKubelet):
    """The test kubelet, but each pod gets its own loopback address (127.0.N.M) with the agent on the
    backend's `agent_port`, so the backend's default endpoint (podIP:agent_port) reaches it from the
    Toolbox's own processes. `started` records every pod that ran."""

    def __init__(self, emulator: Emulator, root: str, port: int) -> None:
        self.port = port
        self.started: list[str] = []
        self._addresses = (f"127.0.{i // 250}.{i % 250 + 2}" for i in itertools.count(250))
        super().__init__(emulator, NAMESPACE, root)

    def _start(self, pod) -> None:
        secret = next(v.secret.secret_name for v in pod.spec.volumes if v.secret)
        for _ in range(100):
            try:
                token = base64.b64decode(self.api.read_namespaced_secret(secret, self.namespace).data["token"])
                break
            except Exception:  # noqa: BLE001 - 404 until the backend has created it
                time.sleep(0.05)
        else:
            return
        cm = self.api.read_namespaced_config_map("mopd-sandbox-agent", self.namespace).data
        command = pod.spec.containers[0].command
        ip = next(self._addresses)
        args = [*command[command.index("--max-output"):], "--host", ip, "--port", str(self.port)]
        proc, port, uid = start_pod_agent(os.path.join(self.root, pod.metadata.name), token.decode(), args, cm)
        assert port == self.port
        self.agents[pod.metadata.name] = (proc, port)
        self.uids[pod.metadata.name] = uid
        self.started.append(pod.metadata.name)
        status = {"status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}
        self.api.patch_namespaced_pod_status(pod.metadata.name, self.namespace, status)


@dataclass
class PodRun:
    run_dir: Path
    proc: subprocess.CompletedProcess
    pod_base: Path
    started: list[str]  # pods the kubelet ran
    left: list[str]  # pods still in the API after mopd-train exited


@pytest.fixture(scope="module")
def pod_run(run_dir: Path, tmp_path_factory) -> Iterator[PodRun]:
    """Two agentic steps with env.sandbox.backend=kubernetes against the emulator, reusing the toy world.
    The kubelet's pod dirs are world-searchable (pytest's tmp dirs are 0700, a pod's uid could not enter)."""
    pod_base = Path(tempfile.mkdtemp(prefix="mopd-pods-", dir="/tmp"))
    os.chmod(pod_base, 0o711)
    emulator = Emulator()
    kubelet = PodNetworkKubelet(emulator, str(pod_base), free_port())
    kubeconfig = tmp_path_factory.mktemp("k8s") / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": emulator.url}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}]}))
    k8s_run = kubeconfig.parent / "run"
    try:
        proc = _train(*SHORT, f"run_dir={k8s_run}", f"toy.dir={run_dir / 'toy'}", "num_steps=2",
                      "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
                      "env.sandbox.backend=kubernetes", f"env.sandbox.namespace={NAMESPACE}",
                      f"env.sandbox.agent_port={kubelet.port}", "env.sandbox.ready_timeout_s=60",
                      env={"KUBECONFIG": str(kubeconfig)})
        left = [p.metadata.name for p in emulator.api().list_namespaced_pod(NAMESPACE).items]
    finally:
        kubelet.stop()
        emulator.stop()
    yield PodRun(k8s_run, proc, pod_base, list(kubelet.started), left)
    shutil.rmtree(pod_base, ignore_errors=True)


def test_agentic_steps_on_kubernetes_pods(pod_run: PodRun):
    assert pod_run.proc.returncode == 0, pod_run.proc.stdout[-3000:] + pod_run.proc.stderr[-6000:]
    metrics = _metrics(pod_run.run_dir)
    assert [m["step"] for m in metrics] == [0, 1]
    episodes = [r for step in (0, 1) for r in _rows(pod_run.run_dir, step) if r["domain"] == "tool"]
    assert episodes and all(m["agent/tool_calls"] > 0 for m in metrics), metrics
    # one pod per episode, each through the emulator's API and the agent the kubelet ran
    assert len(pod_run.started) >= len(episodes), (pod_run.started, len(episodes))
    assert any(TOOL_MESSAGE in r["response"] for r in episodes)
    # every episode's task file (its value is the label) was written into a pod's workspace through its agent
    written = {f.read_text() for pod in pod_run.started for f in (pod_run.pod_base / pod / "workspace").iterdir()}
    assert {str(r["label"]) for r in episodes} <= written, (written, [r["label"] for r in episodes])


def test_no_pod_outlives_the_job(pod_run: PodRun):
    assert pod_run.proc.returncode == 0
    workspaces = {pod: sorted(p.name for p in (pod_run.pod_base / pod / "workspace").iterdir())
                  for pod in pod_run.left if (pod_run.pod_base / pod / "workspace").is_dir()}
    assert pod_run.left == [], workspaces
