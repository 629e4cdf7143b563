"""Kubernetes backend with the official client against kmock's API emulator on 127.0.0.1.
A test kubelet runs the real agent locally, so the same agent-client code path is exercised."""

from __future__ import annotations

import asyncio
import time

import pytest
from kubernetes.client.rest import ApiException

from envs.config import SandboxConfig
from envs.sandbox.kubernetes import LABEL_RUN, KubernetesSandboxBackend, pod_manifest
from toolbox.worker import SandboxWorker

pytestmark = pytest.mark.asyncio
NS = "mopd-sandboxes"


def _backend(emulator, kubelet, **kw) -> KubernetesSandboxBackend:
    cfg = SandboxConfig(backend="kubernetes", namespace=NS, ready_timeout_s=20, **kw)
    return KubernetesSandboxBackend(cfg, api=emulator.api(), run_id="run42", endpoint=kubelet.endpoint)


async def test_pod_lifecycle_through_agent(k8s_env):
    emulator, kubelet = k8s_env
    backend = _backend(emulator, kubelet)
    sb = await backend.create()
    pod = emulator.api().read_namespaced_pod(sb.id, NS)
    spec = pod.spec
    assert spec.restart_policy == "Never" and spec.automount_service_account_token is False
    sc = spec.containers[0].security_context
    assert sc.allow_privilege_escalation is False and sc.capabilities.drop == ["ALL"] and sc.run_as_non_root
    assert set(spec.containers[0].resources.limits) == {"cpu", "memory", "ephemeral-storage"}
    assert pod.metadata.labels[LABEL_RUN] == "run42"
    r = await sb.exec("echo from-pod > f.txt; cat f.txt")
    assert r.ok and r.output.strip() == "from-pod"
    assert await sb.read_file("f.txt") == "from-pod\n"
    await sb.close()
    with pytest.raises(ApiException) as exc:
        emulator.api().read_namespaced_pod(sb.id, NS)
    assert exc.value.status == 404


async def test_retries_on_429_and_500_and_adopts_on_409(k8s_env):
    emulator, kubelet = k8s_env
    backend = _backend(emulator, kubelet)
    emulator.handler.faults.extend([["POST", "/pods", 429, 2], ["GET", "/pods/", 500, 2]])
    sb = await backend.create()
    assert backend.api_retries >= 4
    assert (await sb.exec("echo ok")).output.strip() == "ok"
    # a create that landed but whose reply was lost: the retry sees 409 and adopts our own pod
    pod = pod_manifest(backend.config, "mopd-sb-run42-adopt", "run42")
    emulator.api().create_namespaced_pod(NS, pod)
    await backend._create_pod(pod)  # no exception: same run label
    foreign = pod_manifest(backend.config, "mopd-sb-other", "other-run")
    emulator.api().create_namespaced_pod(NS, foreign)
    with pytest.raises(Exception, match="another run"):
        await backend._create_pod(foreign)
    emulator.handler.faults.append(["POST", "/pods", 403, 1])
    with pytest.raises(ApiException) as exc:  # not retryable
        await backend.create()
    assert exc.value.status == 403
    await sb.close()
    assert await backend.sweep() == 1  # the adopted pod; the foreign one is left alone
    names = [p.metadata.name for p in emulator.api().list_namespaced_pod(NS).items]
    assert names == ["mopd-sb-other"]


async def test_warm_pool_per_image(k8s_env):
    emulator, kubelet = k8s_env
    backend = _backend(emulator, kubelet)
    assert await backend.prewarm(2) == 2
    warm_names = {sb.id for sb in backend.warm[backend.config.image]}
    sb = await backend.create()
    assert sb.id in warm_names and len(backend.warm[backend.config.image]) == 1
    other = await backend.create(image="python:3.12-slim")  # other image: cold start
    assert other.id not in warm_names
    await sb.close()
    await other.close()
    assert await backend.sweep() == 1


async def test_swe_episode_on_a_pod(k8s_env):
    """The SWE env is backend-agnostic: gold patch -> reward 1 with the sandbox in a (test) pod."""
    from envs.swe.env import SWEEnv
    from envs.swe.grading import apply_patch
    from envs.swe.task import builtin_tasks
    from envs.tool_parsing import ToolCall

    emulator, kubelet = k8s_env
    backend = _backend(emulator, kubelet)
    task = builtin_tasks()[0]
    env = SWEEnv(backend.create, max_turns=3)
    await env.reset(task)
    assert env.python == "python3"
    await apply_patch(env.sandbox, task.patch, "gold")
    result = await env.step(ToolCall("finish", {}))
    await env.close()
    assert result.reward == 1.0, result.info
    assert await backend.sweep() == 0


def _slow_create(backend, before: float, after: float) -> None:
    """The pod POST takes a while, landing ``before`` s after the call and returning ``after`` s later."""
    create = backend.api.create_namespaced_pod

    def slow(*args, **kwargs):
        time.sleep(before)
        pod = create(*args, **kwargs)
        time.sleep(after)
        return pod

    backend.api.create_namespaced_pod = slow


def _pods(emulator) -> list[str]:
    return [p.metadata.name for p in emulator.api().list_namespaced_pod(NS).items]


async def test_create_cancelled_mid_post_leaves_no_pod(k8s_env):
    emulator, kubelet = k8s_env
    backend = _backend(emulator, kubelet)
    await backend._ensure_configmap()
    _slow_create(backend, before=0.0, after=0.5)  # the pod exists while the POST is still "running"
    task = asyncio.ensure_future(backend.create())
    await asyncio.sleep(0.25)
    assert len(_pods(emulator)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _pods(emulator) == []


async def test_refill_cancelled_by_worker_shutdown_leaves_no_pod(k8s_env):
    """Shutdown waits for the cancelled refill (the actor is killed right after), whose create waits
    for its POST to land and then deletes the pod."""
    emulator, kubelet = k8s_env
    worker = SandboxWorker("swe")
    worker.backend = _backend(emulator, kubelet)
    await worker.backend._ensure_configmap()
    _slow_create(worker.backend, before=0.4, after=0.0)  # lands after shutdown cancelled the refill
    worker.target_warm = 1
    worker._top_up()
    await asyncio.sleep(0.1)
    await worker.shutdown()
    assert worker._refill.done() and _pods(emulator) == []
    await asyncio.sleep(0.5)  # past the moment the POST would land
    assert _pods(emulator) == []
