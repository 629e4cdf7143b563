"""The weight-update endpoints of SGLang's native HTTP API: request shapes and one client for both sides.

The trainer pushes weights with it (trainer/weight_sync.py); the rollout side may call the same
endpoints (e.g. a scheduler that reloads a checkpoint). Field names follow SGLang 0.5.x
(`io_struct.py`: UpdateWeightFromDiskReqInput, UpdateWeightsFromTensorReqInput,
InitWeightsUpdateGroupReqInput, UpdateWeightsFromDistributedReqInput, Begin/EndWeightUpdateReqInput).
SGLang 0.5.23 refuses tensor and distributed updates outside a session that /begin_weight_update opens and
/end_weight_update closes (managers/scheduler_components/weight_updater.py); a disk update needs none. A reply with
`"success": false`, an HTTP error, or an engine that cannot be reached raises `EngineCallError`
(a RuntimeError) with the engine's URL, the path and its message.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import httpx


class EngineCallError(RuntimeError):
    """An engine endpoint failed: unreachable, HTTP error, or a reply saying `success: false`."""


@dataclass
class UpdateWeightsFromDisk:
    path: ClassVar[str] = "/update_weights_from_disk"
    model_path: str
    weight_version: str


@dataclass
class BeginWeightUpdate:
    """Opens the engine's weight-update session; selector "all" also updates a speculative draft model (the
    MTP layers), which SGLang keeps in a runner of its own."""
    path: ClassVar[str] = "/begin_weight_update"
    selector: str = "all"


@dataclass
class EndWeightUpdate:
    """Closes the session (an engine with a session left open refuses the next one)."""
    path: ClassVar[str] = "/end_weight_update"


@dataclass
class UpdateWeightsFromTensor:
    """One bucket; `serialized_named_tensors` has one entry per engine TP rank (SGLang's serializer output
    on GPU, or base64 safetensors bytes with `load_format="safetensors"` for the local server)."""
    path: ClassVar[str] = "/update_weights_from_tensor"
    serialized_named_tensors: list[str]
    load_format: str | None
    flush_cache: bool
    weight_version: str


@dataclass
class InitWeightsUpdateGroup:
    path: ClassVar[str] = "/init_weights_update_group"
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str = "nccl"


@dataclass
class UpdateWeightsFromDistributed:
    """One bucket broadcast over the group; the tensors themselves travel over NCCL, not HTTP."""
    path: ClassVar[str] = "/update_weights_from_distributed"
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    weight_version: str
    flush_cache: bool


WeightUpdate = (UpdateWeightsFromDisk | UpdateWeightsFromTensor | InitWeightsUpdateGroup | UpdateWeightsFromDistributed
                | BeginWeightUpdate | EndWeightUpdate)


_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _http() -> httpx.Client:
    """One keep-alive client per process. `httpx.post` builds a client per call, and with it an SSL context
    from the CA bundle (~20 ms of CPU each; in the scheduler benchmark a third of the trainer's CPU went
    there with three posts a push); httpx.Client is thread-safe, so the push's threads share this one."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client()
        return _client


def post_weight_update(url: str, request: WeightUpdate, timeout_s: float) -> dict[str, Any]:
    """POST one weight-update request to the engine at `url` and return its decoded reply."""
    return _post(url, request.path, asdict(request), timeout_s)


def weight_version(url: str, timeout_s: float) -> str:
    """The weight_version the engine reports in /model_info (raises EngineCallError if it does not answer)."""
    try:
        reply = _http().get(url.rstrip("/") + "/model_info", timeout=timeout_s)
        reply.raise_for_status()
        return str(reply.json().get("weight_version", ""))
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise EngineCallError(f"GET {url}/model_info: {type(e).__name__}: {e}") from e


def _post(url: str, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    target = url.rstrip("/") + path
    try:
        resp = _http().post(target, json=body, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise EngineCallError(f"POST {target}: {type(e).__name__}: {e}") from e
    if resp.status_code >= 400:
        raise EngineCallError(f"POST {target} -> HTTP {resp.status_code}: {resp.text[:500]!r}")
    try:
        reply = resp.json() if resp.content.strip() else {}
    except ValueError:
        raise EngineCallError(f"POST {target}: the reply is not JSON: {resp.text[:200]!r}") from None
    if isinstance(reply, dict) and reply.get("success") is False:
        raise EngineCallError(f"POST {target} failed: {reply.get('message', reply)}")
    return reply if isinstance(reply, dict) else {"reply": reply}
