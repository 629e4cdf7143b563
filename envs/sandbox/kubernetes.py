"""Kubernetes sandbox backend: one pod per sandbox, spoken to only through the in-pod agent.

The Kubernetes API is used for the pod lifecycle only (create, wait Ready, delete, label sweep);
commands and files go over HTTP to ``<podIP>:<agent_port>`` (no exec/port-forward streams, which
are not thread-safe in the official client). API calls retry with exponential backoff on 429, 5xx
and connection errors; a 409 on create (a retried create that had landed) adopts the existing pod
when it carries our run label. A warm pool keeps ready pods per image.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import hashlib
import os
import secrets
import uuid
from typing import Any, Callable

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from urllib3.exceptions import HTTPError as Urllib3Error

from envs.config import SandboxConfig
from envs.sandbox.base import MAX_CALL_TIMEOUT_S, Sandbox
from envs.sandbox.client import AgentClient, SandboxError

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT_CONFIGMAP = "mopd-sandbox-agent"
TOKEN_DIR, SECRET_DIR = "/run/mopd", "/var/run/mopd-secret"
# the init container copies the token from the Secret into a memory emptyDir; the agent reads it and
# deletes the copy, so no file or environment variable a command can read ever holds it
COPY_TOKEN = f"import shutil; shutil.copyfile('{SECRET_DIR}/token', '{TOKEN_DIR}/token')"
LABEL_APP, LABEL_RUN, LABEL_IMAGE = "app.kubernetes.io/name", "mopd.io/run-id", "mopd.io/image"
Endpoint = Callable[[k8s.V1Pod], str]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, (Urllib3Error, ConnectionError))


def _image_label(image: str) -> str:
    return hashlib.sha1(image.encode()).hexdigest()[:16]


def agent_configmap(namespace: str) -> k8s.V1ConfigMap:
    """The agent, jail and fork server sources, mounted read-only into every sandbox pod."""
    data = {}
    for name in ("agent.py", "jail.py", "safe_fs.py", "forkserver.py"):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            data[name] = f.read()
    return k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(
            name=AGENT_CONFIGMAP, namespace=namespace, labels={LABEL_APP: "mopd-sandbox"}
        ),
        data=data,
    )


def token_secret_name(pod_name: str) -> str:
    return f"{pod_name}-token"


def secret_manifest(cfg: SandboxConfig, pod: k8s.V1Pod, run_id: str, token: str) -> k8s.V1Secret:
    """The pod's token as a Secret owned by the pod (garbage-collected with it)."""
    meta = pod.metadata
    owner = (
        [k8s.V1OwnerReference(api_version="v1", kind="Pod", name=meta.name, uid=meta.uid)]
        if meta.uid
        else None
    )
    return k8s.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=k8s.V1ObjectMeta(
            name=token_secret_name(meta.name),
            namespace=cfg.namespace,
            owner_references=owner,
            labels={LABEL_APP: "mopd-sandbox", LABEL_RUN: run_id},
        ),
        type="Opaque",
        data={"token": base64.b64encode(token.encode()).decode()},
    )


def pod_manifest(
    cfg: SandboxConfig,
    name: str,
    run_id: str,
    image: str | None = None,
    owner: k8s.V1OwnerReference | None = None,
) -> k8s.V1Pod:
    """The sandbox pod (also rendered to k8s/sandbox-pod-template.yaml); its token is a Secret."""
    image = image or cfg.image
    resources = {"cpu": cfg.cpu, "memory": f"{cfg.memory_mb}Mi", "ephemeral-storage": cfg.ephemeral_storage}
    rlimits = '{"RLIMIT_CPU": %d, "RLIMIT_FSIZE": %d, "RLIMIT_CORE": 0}' % (
        cfg.cpu_time_s,
        cfg.file_size_mb << 20,
    )
    small = {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "16Mi"}
    container = k8s.V1Container(
        name="agent",
        image=image,
        image_pull_policy="IfNotPresent",
        command=[
            "python3",
            "/opt/mopd/agent.py",
            "--host",
            "0.0.0.0",
            "--port",
            str(cfg.agent_port),
            "--root",
            "/workspace",
            "--token-file",
            f"{TOKEN_DIR}/token",
            "--max-output",
            str(cfg.max_output_bytes),
            "--default-timeout",
            str(cfg.wall_timeout_s),
            "--max-timeout",
            str(MAX_CALL_TIMEOUT_S),
            "--rlimits",
            rlimits,
            "--exec-mode",
            "forkserver",
        ],
        ports=[k8s.V1ContainerPort(container_port=cfg.agent_port, name="agent")],
        resources=k8s.V1ResourceRequirements(requests=dict(resources), limits=dict(resources)),
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/health", port=cfg.agent_port),
            period_seconds=1,
            failure_threshold=120,
        ),
        security_context=_container_security(),
        volume_mounts=[
            k8s.V1VolumeMount(name="agent", mount_path="/opt/mopd", read_only=True),
            k8s.V1VolumeMount(name="run", mount_path=TOKEN_DIR),
            k8s.V1VolumeMount(name="workspace", mount_path="/workspace"),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
    )
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=cfg.namespace,
            owner_references=[owner] if owner else None,
            labels={LABEL_APP: "mopd-sandbox", LABEL_RUN: run_id, LABEL_IMAGE: _image_label(image)},
        ),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            enable_service_links=False,
            runtime_class_name=cfg.runtime_class,
            termination_grace_period_seconds=0,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=65532,
                run_as_group=65532,
                fs_group=65532,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            init_containers=[
                k8s.V1Container(
                    name="token",
                    image=image,
                    image_pull_policy="IfNotPresent",
                    command=["python3", "-c", COPY_TOKEN],
                    resources=k8s.V1ResourceRequirements(requests=dict(small), limits=dict(small)),
                    security_context=_container_security(),
                    volume_mounts=[
                        k8s.V1VolumeMount(name="token", mount_path=SECRET_DIR, read_only=True),
                        k8s.V1VolumeMount(name="run", mount_path=TOKEN_DIR),
                    ],
                )
            ],
            containers=[container],
            volumes=[
                k8s.V1Volume(
                    name="token",
                    secret=k8s.V1SecretVolumeSource(secret_name=token_secret_name(name), default_mode=0o400),
                ),
                k8s.V1Volume(
                    name="run", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="1Mi")
                ),
                k8s.V1Volume(name="agent", config_map=k8s.V1ConfigMapVolumeSource(name=AGENT_CONFIGMAP)),
                k8s.V1Volume(
                    name="workspace", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=cfg.ephemeral_storage)
                ),
                k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="256Mi")),
            ],
        ),
    )


def _container_security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False,
        privileged=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
    )


class KubernetesSandboxBackend:
    """Pods as sandboxes. ``endpoint`` maps a Ready pod to the agent's base URL (default podIP:port)."""

    def __init__(
        self,
        config: SandboxConfig,
        api: k8s.CoreV1Api | None = None,
        run_id: str | None = None,
        owner: k8s.V1OwnerReference | None = None,
        endpoint: Endpoint | None = None,
        max_attempts: int = 6,
    ) -> None:
        config.validate("sandbox")
        self.config = config
        self.api = api or k8s.CoreV1Api()
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.owner = owner
        self.endpoint = endpoint or (lambda pod: f"http://{pod.status.pod_ip}:{config.agent_port}")
        self.max_attempts = max_attempts
        self.warm: dict[str, list[Sandbox]] = {}
        self.api_retries = 0
        self._configmap_ready = False
        atexit.register(self.sweep_sync)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call in a thread (the official client is blocking), with backoff on 429/5xx."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            reraise=True,
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential(multiplier=0.05, max=2.0),
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.api_retries += 1
                return await asyncio.to_thread(fn, *args, **kwargs)

    async def _ensure_configmap(self) -> None:
        if self._configmap_ready:
            return
        try:
            await self._call(
                self.api.create_namespaced_config_map,
                self.config.namespace,
                agent_configmap(self.config.namespace),
            )
        except ApiException as exc:
            if exc.status != 409:  # 409: already there (another trainer or an earlier run)
                raise
        self._configmap_ready = True

    async def _create_pod(self, pod: k8s.V1Pod) -> k8s.V1Pod:
        try:
            return await self._call(self.api.create_namespaced_pod, self.config.namespace, pod)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = await self._call(
                self.api.read_namespaced_pod, pod.metadata.name, self.config.namespace
            )
            if (existing.metadata.labels or {}).get(LABEL_RUN) != self.run_id:
                raise SandboxError(
                    f"pod {pod.metadata.name} already exists and belongs to another run", 409
                ) from exc
            return existing

    async def _create_secret(self, pod: k8s.V1Pod, token: str) -> str:
        """Create the pod's token Secret; on 409 (a retried create that landed) use the stored token."""
        try:
            await self._call(
                self.api.create_namespaced_secret,
                self.config.namespace,
                secret_manifest(self.config, pod, self.run_id, token),
            )
            return token
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = await self._call(
                self.api.read_namespaced_secret, token_secret_name(pod.metadata.name), self.config.namespace
            )
            if (existing.metadata.labels or {}).get(LABEL_RUN) != self.run_id:
                raise SandboxError(f"secret for {pod.metadata.name} belongs to another run", 409) from exc
            return base64.b64decode(existing.data["token"]).decode()

    async def _wait_ready(self, name: str) -> k8s.V1Pod:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout_s
        delay = 0.05
        while True:
            pod = await self._call(self.api.read_namespaced_pod, name, self.config.namespace)
            status = pod.status
            if status is not None and status.phase in ("Failed", "Succeeded"):
                raise SandboxError(f"sandbox pod {name} ended in phase {status.phase} before becoming ready")
            ready = (
                any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
                if status
                else False
            )
            if ready and status.pod_ip:
                return pod
            if loop.time() > deadline:
                raise SandboxError(f"sandbox pod {name} not ready after {self.config.ready_timeout_s:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def delete_pod(self, name: str) -> None:
        """Delete the pod and its token Secret (ownerReferences would also collect the Secret)."""
        for delete, obj in (
            (self.api.delete_namespaced_pod, name),
            (self.api.delete_namespaced_secret, token_secret_name(name)),
        ):
            try:
                await self._call(delete, obj, self.config.namespace, grace_period_seconds=0)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    async def _start(self, image: str) -> Sandbox:
        await self._ensure_configmap()
        name = f"mopd-sb-{self.run_id}-{secrets.token_hex(4)}"
        post = asyncio.ensure_future(
            self._create_pod(pod_manifest(self.config, name, self.run_id, image, self.owner))
        )
        try:
            created = await asyncio.shield(post)
        except asyncio.CancelledError:
            # the request runs on in its thread and may still create the pod: wait, then delete it
            await asyncio.gather(post, return_exceptions=True)
            await self.delete_pod(name)
            raise
        except SandboxError:
            raise  # the name is another run's pod: not ours to delete
        except BaseException:
            await self.delete_pod(name)  # a failed request may still have created it
            raise
        try:
            token = await self._create_secret(created, secrets.token_urlsafe(32))
            pod = await self._wait_ready(name)
            agent = AgentClient(self.endpoint(pod), token)
            await agent.wait_ready(timeout=self.config.ready_timeout_s)
        except BaseException:
            await self.delete_pod(name)
            raise
        return Sandbox(
            name,
            agent,
            lambda: self.delete_pod(name),
            {"backend": "kubernetes", "pod": name, "image": image, "python": "python3"},
        )

    async def prewarm(self, n: int, image: str | None = None) -> int:
        """Keep ``n`` ready pods for ``image``."""
        image = image or self.config.image
        pool = self.warm.setdefault(image, [])
        missing = n - len(pool)
        if missing > 0:
            pool.extend(await asyncio.gather(*(self._start(image) for _ in range(missing))))
        return len(pool)

    async def create(self, image: str | None = None) -> Sandbox:
        image = image or self.config.image
        pool = self.warm.get(image, [])
        while pool:
            sb = pool.pop()
            if await sb.alive():
                return sb
            await sb.close()
        return await self._start(image)

    async def sweep(self) -> int:
        """Delete every pod labelled with this run id (labels re-checked client-side)."""
        pods = await self._call(
            self.api.list_namespaced_pod, self.config.namespace, label_selector=f"{LABEL_RUN}={self.run_id}"
        )
        mine = [p for p in pods.items if (p.metadata.labels or {}).get(LABEL_RUN) == self.run_id]
        await asyncio.gather(*(self.delete_pod(p.metadata.name) for p in mine))
        tokens = await self._call(
            self.api.list_namespaced_secret,
            self.config.namespace,
            label_selector=f"{LABEL_RUN}={self.run_id}",
        )
        for sec in tokens.items:  # Secrets of pods that are already gone
            if (sec.metadata.labels or {}).get(LABEL_RUN) == self.run_id:
                try:
                    await self._call(
                        self.api.delete_namespaced_secret, sec.metadata.name, self.config.namespace
                    )
                except ApiException as exc:
                    if exc.status != 404:
                        raise
        self.warm.clear()
        return len(mine)

    def sweep_sync(self) -> None:
        """atexit: one quick attempt, since the API server may already be unreachable."""
        self.max_attempts = 1
        try:
            asyncio.run(self.sweep())
        except Exception:  # noqa: BLE001 - best effort at interpreter exit (API may be gone)
            pass
