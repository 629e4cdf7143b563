"""Push the student's weights to rollout engines over SGLang's native HTTP API.

Modes (TrainerConfig.weight_sync):
- tensor: POST /update_weights_from_tensor in buckets of `weight_sync_bucket_mb`. Payload per
  bucket: for the local CPU server `load_format="safetensors"` and each entry base64 of the
  safetensors bytes of HF-named tensors; for real SGLang (colocated GPU) SGLang's own
  MultiprocessingSerializer (lazy import; CUDA IPC handles, same node only). One entry per engine
  TP rank. The last bucket carries flush_cache=True.
- disk: write an HF checkpoint, then POST /update_weights_from_disk {model_path, weight_version}.
  The directory must be visible to the engines (shared filesystem at scale).
- distributed: POST /init_weights_update_group once, then per bucket POST
  /update_weights_from_distributed {names, dtypes, shapes, group_name, weight_version} while
  broadcasting the tensors from trainer rank 0 over NCCL. GPU only, not exercised in CI.
This module talks plain HTTP (urllib) and imports nothing from rollout/.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from trainer.config import TrainerConfig
from trainer.hf_io import save_hf


def post_json(url: str, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST JSON and return the decoded reply; raise with the engine's message on HTTP errors."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"POST {url}{path} -> HTTP {err.code}: {err.read()[:500]!r}") from err
    reply = json.loads(raw) if raw.strip() else {}
    if isinstance(reply, dict) and reply.get("success") is False:
        raise RuntimeError(f"POST {url}{path} failed: {reply.get('message', reply)}")
    return reply if isinstance(reply, dict) else {"reply": reply}


def buckets(named: dict[str, torch.Tensor], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most bucket_bytes (a bigger tensor travels alone)."""
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > bucket_bytes:
            yield current
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        yield current


def serialize_safetensors(bucket: list[tuple[str, torch.Tensor]]) -> str:
    return base64.b64encode(safetensors_save({n: t.detach().cpu().contiguous() for n, t in bucket})).decode()


def serialize_sglang(bucket: list[tuple[str, torch.Tensor]]) -> str:
    from sglang.srt.utils import MultiprocessingSerializer  # GPU clusters only

    return MultiprocessingSerializer.serialize([(n, t.detach().cuda()) for n, t in bucket], output_str=True)


def tensor_format(cfg: TrainerConfig) -> str:
    if cfg.weight_sync_format != "auto":
        return cfg.weight_sync_format
    return "sglang" if torch.cuda.is_available() and cfg.device != "cpu" else "safetensors"


def _to_all(urls: list[str], path: str, body: dict[str, Any], timeout: float) -> None:
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        list(pool.map(lambda u: post_json(u, path, body, timeout), urls))


def push_tensor(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig, *,
                bucket_bytes: int | None = None) -> int:
    """Returns the number of buckets sent (bucket_bytes overrides cfg.weight_sync_bucket_mb)."""
    fmt = tensor_format(cfg)
    serialize = serialize_sglang if fmt == "sglang" else serialize_safetensors
    groups = list(buckets(named, bucket_bytes or cfg.weight_sync_bucket_mb * 2**20))
    for i, bucket in enumerate(groups):
        payload = serialize(bucket)
        body = {"serialized_named_tensors": [payload] * cfg.weight_sync_engine_tp,
                "load_format": "safetensors" if fmt == "safetensors" else None,
                "flush_cache": i == len(groups) - 1, "weight_version": str(version)}
        _to_all(urls, "/update_weights_from_tensor", body, cfg.weight_sync_timeout_s)
    return len(groups)


def push_disk(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig,
              source_dir: str) -> Path:
    root = Path(cfg.weight_sync_dir) if cfg.weight_sync_dir else Path(tempfile.gettempdir()) / "mopd_weight_sync"
    target = save_hf(root / f"v{version}", named, source_dir)
    _to_all(urls, "/update_weights_from_disk", {"model_path": str(target), "weight_version": str(version)},
            cfg.weight_sync_timeout_s)
    return target


class DistributedPusher:
    """NCCL broadcast from trainer rank 0 into the engines' weight-update group (SGLang protocol).

    Unverified here (needs GPUs and SGLang): written against SGLang 0.5's init_weights_update_group /
    update_weights_from_distributed endpoints.
    """

    group_name = "mopd_weight_sync"

    def __init__(self, urls: list[str], cfg: TrainerConfig) -> None:
        from sglang.srt.utils import init_custom_process_group  # GPU clusters only

        from trainer.dist import free_port

        self.urls, self.cfg = urls, cfg
        tp = cfg.weight_sync_engine_tp
        world = 1 + tp * len(urls)
        master_port = free_port()
        import socket

        master = socket.gethostbyname(socket.gethostname())
        bodies = [{"master_address": master, "master_port": master_port, "rank_offset": 1 + i * tp,
                   "world_size": world, "group_name": self.group_name, "backend": "nccl"} for i in range(len(urls))]
        threads = [threading.Thread(target=post_json, args=(u, "/init_weights_update_group", b,
                                                            cfg.weight_sync_timeout_s)) for u, b in zip(urls, bodies)]
        for t in threads:
            t.start()
        self.group = init_custom_process_group(backend="nccl", init_method=f"tcp://{master}:{master_port}",
                                               world_size=world, rank=0, group_name=self.group_name)
        for t in threads:
            t.join()

    def push(self, named: dict[str, torch.Tensor], version: int) -> None:
        import torch.distributed as dist

        groups = list(buckets(named, self.cfg.weight_sync_bucket_mb * 2**20))
        for i, bucket in enumerate(groups):
            body = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                    "weight_version": str(version), "flush_cache": i == len(groups) - 1}
            with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
                futures = [pool.submit(post_json, u, "/update_weights_from_distributed", body,
                                       self.cfg.weight_sync_timeout_s) for u in self.urls]
                for _, tensor in bucket:
                    dist.broadcast(tensor.detach().cuda().contiguous(), src=0, group=self.group)
                for f in futures:
                    f.result()
