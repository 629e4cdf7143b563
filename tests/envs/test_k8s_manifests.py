"""k8s/ manifests against the real Kubernetes JSON schemas (kubernetes-validate, strict).

KubeRay's RayJob CRD is not in the core schemas: its pod templates are validated as real core
``PodTemplate`` objects, and the RayJob envelope against a structural schema written from the
KubeRay v1 CRD fields this project uses (required fields and types)."""

from __future__ import annotations

import glob
import os

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from envs.config import SandboxConfig
from envs.sandbox.kubernetes import pod_manifest, secret_manifest

K8S = os.path.join(os.path.dirname(__file__), "..", "..", "k8s")
VERSION = "1.30.0"
CORE_FILES = ["namespace.yaml", "rbac.yaml", "networkpolicy.yaml", "sandbox-pod-template.yaml"]


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
        CORE_FILES + ["rayjob.yaml"]
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
    cluster = _docs("rayjob.yaml")[0]["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for tpl in templates:
        assert tpl["metadata"]["labels"]["mopd.io/sandbox-client"] == "true"


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


def test_rayjob_structure_and_embedded_pod_templates():
    job = _docs("rayjob.yaml")[0]
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
