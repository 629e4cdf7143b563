"""k8s/ manifests against the real Kubernetes JSON schemas (kubernetes-validate, strict).

KubeRay's RayJob CRD is not in the core schemas: its pod templates are validated as real core
``PodTemplate`` objects, and the RayJob envelope against a structural schema written from the
KubeRay v1 CRD fields this project uses (required fields and types)."""

from __future__ import annotations

import copy
import glob
import os
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from envs.config import SandboxConfig
from envs.sandbox.kubernetes import pod_manifest, secret_manifest
from mopd import job as job_lib

K8S = os.path.join(os.path.dirname(__file__), "..", "..", "k8s")
VERSION = "1.30.0"
CORE_FILES = ["namespace.yaml", "rbac.yaml", "networkpolicy.yaml", "sandbox-pod-template.yaml"]
RAYJOBS = ["rayjob.yaml", "rayjob-multinode.yaml"]


def _docs(name: str) -> list[dict]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.mark.parametrize("name", CORE_FILES)
def test_core_manifests_match_real_schemas(name):
    for doc in _docs(name):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_validation_is_not_vacuous():
    bad = _docs("sandbox-pod-template.yaml")[0]
    bad["spec"]["restartPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_every_manifest_file_is_covered():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(K8S, "*.yaml"))) == sorted(
        CORE_FILES + RAYJOBS
    )


def test_sandbox_template_is_what_the_backend_creates():
    pod = pod_manifest(SandboxConfig(backend="kubernetes"), "mopd-sandbox-template", "RUN_ID")
    assert client.ApiClient().sanitize_for_serialization(pod) == _docs("sandbox-pod-template.yaml")[0]
    spec = pod.spec
    assert spec.automount_service_account_token is False and spec.restart_policy == "Never"
    c = spec.containers[0]
    assert (
        c.security_context.allow_privilege_escalation is False
        and c.security_context.capabilities.drop == ["ALL"]
    )
    assert spec.security_context.run_as_non_root and c.resources.requests == c.resources.limits


def test_rbac_grants_exactly_pod_lifecycle():
    role = next(d for d in _docs("rbac.yaml") if d["kind"] == "Role")
    pods = next(r for r in role["rules"] if r["resources"] == ["pods"])
    assert sorted(pods["verbs"]) == ["create", "delete", "get", "list", "watch"]
    secrets = next(r for r in role["rules"] if r["resources"] == ["secrets"])
    assert sorted(secrets["verbs"]) == ["create", "delete", "get", "list"]
    policy = _docs("networkpolicy.yaml")[0]
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"]


def test_token_is_a_secret_never_in_the_pod_spec():
    """The token is not an env value (anyone who can `get pods` would see it): it is a Secret owned by
    the pod, mounted only into the init container that copies it for the agent to read and delete."""
    pod = pod_manifest(SandboxConfig(backend="kubernetes"), "p", "RUN_ID")
    agent, init = pod.spec.containers[0], pod.spec.init_containers[0]
    assert not agent.env and not init.env and not agent.env_from and not init.env_from
    assert "--token-file" in agent.command
    mounted = {m.name for m in agent.volume_mounts}
    assert "token" not in mounted and "token" in {m.name for m in init.volume_mounts}
    secret_vol = next(v for v in pod.spec.volumes if v.name == "token")
    assert secret_vol.secret.secret_name == "p-token" and secret_vol.secret.default_mode == 0o400
    pod.metadata.uid = "0a1b"
    sec = secret_manifest(SandboxConfig(backend="kubernetes"), pod, "RUN_ID", "s3cret-token-value")
    assert sec.metadata.owner_references[0].uid == "0a1b" and sec.metadata.owner_references[0].kind == "Pod"
    kubernetes_validate.validate(client.ApiClient().sanitize_for_serialization(sec), VERSION, strict=True)


def test_network_policy_admits_only_labelled_clients():
    """Ingress to the agent from labelled sandbox clients of the mopd namespace only (one `from` entry
    with both selectors = AND), and every Ray pod that may host a Toolbox actor carries the label."""
    policy = _docs("networkpolicy.yaml")[0]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "mopd"}
    assert peer["podSelector"]["matchLabels"] == {"mopd.io/sandbox-client": "true"}
    for name in RAYJOBS:
        cluster = _docs(name)[0]["spec"]["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for tpl in templates:
            assert tpl["metadata"]["labels"]["mopd.io/sandbox-client"] == "true", name


_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object"}}}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string", "pattern": "^mopd-train( |$)"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "properties": {
                                "rayStartParams": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "template": _POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer"},
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                    "rayStartParams": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_structure_and_embedded_pod_templates(name):
    job = _docs(name)[0]
    jsonschema.validate(job, RAYJOB_SCHEMA)
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job["metadata"]}, VERSION, strict=True
    )  # metadata is a real ObjectMeta
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, tpl in enumerate(templates):
        kubernetes_validate.validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"t{i}", "namespace": "mopd"},
                "template": tpl,
            },
            VERSION,
            strict=True,
        )
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    sa = {t["spec"]["serviceAccountName"] for t in templates}
    assert sa == {"mopd-trainer"}


def test_rayjob_schema_rejects_wrong_structure():
    job = _docs("rayjob.yaml")[0]
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)


def _entrypoint_job(job: dict):
    """The RayJob's `mopd-train` command line, composed and validated as mopd-train does it (Hydra + schema)."""
    from mopd.config import to_job_config
    from mopd.train import compose_config

    return to_job_config(compose_config(shlex.split(job["spec"]["entrypoint"])[1:]))


def _quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


def _layout_problems(job: dict) -> list[str]:
    """What the entrypoint's layout asks of the worker pods that they cannot give (empty: it fits).

    GPU actors are whole units on one node: an engine (gpus_per_engine, SGLang's --tp-size) and a trainer TP
    group (tp_size ranks, one GPU each; trainer/placement.py packs it onto one node). They are packed first-fit
    by size onto the GPU pods; CPUs fit wherever GPUs do when no GPU actor asks for more CPUs per GPU than a pod
    has; and all actors together (mopd.job.cpus_requested) fit the workers' CPUs."""
    cfg = _entrypoint_job(job)
    problems = [] if cfg.ray_address else ["ray_address is not set: the driver would not join the RayJob's cluster"]
    pods = []
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        if res["requests"] != res["limits"]:
            problems.append(f"{g['groupName']}: requests differ from limits (Ray sizes itself from the limits)")
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        pods += [(g["groupName"], gpus, _quantity(res["limits"]["cpu"]))] * g["replicas"]
    units = []  # (what, GPUs, CPUs) of each GPU actor that must sit on one node
    for what, engines in [("rollout", cfg.rollout), *[(f"teachers.{n}", t) for n, t in cfg.teachers.items()]]:
        if engines.backend != "remote" and engines.gpus_per_engine > 0:
            units += [(f"{what} engine", engines.gpus_per_engine, engines.cpus_per_engine)] * engines.num_engines
    t = cfg.trainer
    if t.device == "cuda":
        units += [("trainer TP group", t.tp_size, t.tp_size * t.cpus_per_rank)] * (t.world_size // t.tp_size)
        for name, gpus, _ in pods:
            if gpus and gpus % t.tp_size:
                problems.append(f"trainer.tp_size={t.tp_size} does not divide the {gpus} GPUs of a {name} pod")
    free = [[name, gpus] for name, gpus, _ in pods if gpus]
    for what, gpus, cpus in sorted(units, key=lambda u: -u[1]):
        pod = next((p for p in free if p[1] >= gpus), None)
        if pod is None:
            problems.append(f"no GPU pod has {gpus} free GPUs for a {what} (free: {[p[1] for p in free]})")
            continue
        pod[1] -= gpus
        if any(cpus / gpus > pc / pg for name, pg, pc in pods if name == pod[0]):
            problems.append(f"a {what} asks for {cpus / gpus:g} CPUs per GPU, more than a {pod[0]} pod has per GPU")
    if job_lib.cpus_requested(cfg) > sum(cpus for _, _, cpus in pods):  # the head runs no actor (num-cpus 0)
        problems.append(f"the job's actors ask for {job_lib.cpus_requested(cfg):g} CPUs; the workers have "
                        f"{sum(cpus for _, _, cpus in pods):g}")
    return problems


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_pods_cover_the_entrypoint_layout(name):
    """The resources the RayJob's pods request hold every engine, teacher and trainer rank its command line
    asks for, each TP group on one node; GPU pods have a memory-backed /dev/shm (NCCL, SGLang)."""
    job = _docs(name)[0]
    assert _layout_problems(job) == []
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        spec = g["template"]["spec"]
        if "nvidia.com/gpu" in spec["containers"][0]["resources"]["limits"]:
            shm = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in spec["containers"][0]["volumeMounts"])


def test_multinode_rayjob_uses_every_gpu_with_tp_and_pp():
    job = _docs("rayjob-multinode.yaml")[0]
    cfg = _entrypoint_job(job)
    (gpu,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    asked = (cfg.trainer.world_size + cfg.rollout.num_engines * cfg.rollout.gpus_per_engine
             + sum(t.num_engines * t.gpus_per_engine for t in cfg.teachers.values()))
    assert asked == gpu["replicas"] * int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.trainer.tp_size > 1 and cfg.trainer.pp_size > 1 and cfg.trainer.device == "cuda"


def test_layout_check_is_not_vacuous():
    """One pod fewer, a TP size that does not divide a node, or a missing ray_address: each is reported."""
    job = _docs("rayjob-multinode.yaml")[0]
    fewer = copy.deepcopy(job)
    fewer["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 1
    assert any("free GPUs" in p for p in _layout_problems(fewer))
    odd = copy.deepcopy(job)
    odd["spec"]["entrypoint"] = odd["spec"]["entrypoint"].replace("trainer.tp_size=4 trainer.pp_size=2",
                                                                  "trainer.tp_size=8 trainer.pp_size=1")
    odd["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] = {
        "requests": {"cpu": "96", "memory": "512Gi", "nvidia.com/gpu": "12"},
        "limits": {"cpu": "96", "memory": "512Gi", "nvidia.com/gpu": "12"}}
    assert any("does not divide the 12 GPUs" in p for p in _layout_problems(odd))
    local = copy.deepcopy(job)
    local["spec"]["entrypoint"] = local["spec"]["entrypoint"].replace("ray_address=auto ", "")
    assert any("ray_address" in p for p in _layout_problems(local))
    greedy = copy.deepcopy(job)
    greedy["spec"]["entrypoint"] = greedy["spec"]["entrypoint"].replace("trainer.cpus_per_rank=8", "trainer.cpus_per_rank=9")
    assert any("CPUs per GPU" in p for p in _layout_problems(greedy))
