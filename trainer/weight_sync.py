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
The requests and the HTTP calls are mopd/core/engine_api.py's (shared with the rollout side); this module
imports nothing from rollout/.

Restarted engines: before every push the new weights are on disk (disk mode: the pushed directory;
tensor/distributed: a snapshot the trainer keeps, the last two versions) and recorded per engine URL
in Ray's key-value store under `WEIGHTS_KEY_PREFIX` (the same string as rollout/engines.py). An
engine actor that restarts a dead server starts it from that record, so it serves the latest
weights with the right weight_version. An engine that dies during a push is waited for and checked
(its /model_info weight_version), and pushed to again if it came back with older weights.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from mopd.core.engine_api import (
    EngineCallError,
    InitWeightsUpdateGroup,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromTensor,
    WeightUpdate,
    post_weight_update,
    weight_version,
)
from trainer.config import TrainerConfig
from trainer.hf_io import save_hf

log = logging.getLogger(__name__)

# Ray KV key (plus engine URL) of the latest weights pushed to that engine: {"path", "version"}.
# rollout/engines.py reads it with the same prefix when it restarts a dead server.
WEIGHTS_KEY_PREFIX = "mopd/pushed-weights/"


def record_pushed_weights(urls: list[str], path: str | Path, version: int) -> None:
    """Tell the engines' actors (through Ray's KV store) which weights a restarted server must load."""
    try:
        from ray.experimental import internal_kv
    except ImportError:  # pragma: no cover - Ray is a dependency
        return
    if not internal_kv._internal_kv_initialized():
        return  # not under Ray (unit tests pushing to bare servers): nobody restarts engines
    value = json.dumps({"path": str(path), "version": str(version)}).encode()
    for url in urls:
        internal_kv._internal_kv_put((WEIGHTS_KEY_PREFIX + url.rstrip("/")).encode(), value, overwrite=True)


class WeightSnapshots:
    """The last pushed weights on disk, for engines that restart (tensor / distributed modes); keeps two."""

    def __init__(self, cfg: TrainerConfig) -> None:
        root = Path(cfg.weight_sync_dir) if cfg.weight_sync_dir else Path(tempfile.gettempdir()) / "mopd_weight_sync"
        root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="snapshots-", dir=root))
        self.kept: list[Path] = []

    def write(self, named: dict[str, torch.Tensor], version: int, source_dir: str) -> Path:
        path = save_hf(self.dir / f"v{version}", named, source_dir)
        self.kept.append(path)
        while len(self.kept) > 2:  # an engine restarting right now may still be reading the previous one
            shutil.rmtree(self.kept.pop(0), ignore_errors=True)
        return path

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def engine_weight_version(url: str, timeout: float) -> str | None:
    """The weight_version an engine reports, or None if it does not answer (yet)."""
    try:
        return weight_version(url, min(timeout, 10.0))
    except EngineCallError:
        return None


def lagging_engines(urls: list[str], version: int, timeout: float) -> list[str]:
    """Engines that do not report `version` once they answer; waits up to `timeout` for dead ones to return."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    lagging: list[str] = []
    delay = 0.2
    while pending:
        still = []
        for url in pending:
            got = engine_weight_version(url, timeout)
            if got is None:
                still.append(url)
            elif got != str(version):
                lagging.append(url)
        pending = still
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"weight push v{version}: engine(s) {pending} did not answer again within "
                               f"{timeout}s (trainer.weight_sync_timeout_s)")
        if pending:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    return lagging


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


def _to_all(urls: list[str], request: WeightUpdate, timeout: float) -> None:
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        list(pool.map(lambda u: post_weight_update(u, request, timeout), urls))


def push_tensor(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig, *,
                bucket_bytes: int | None = None) -> int:
    """Returns the number of buckets sent (bucket_bytes overrides cfg.weight_sync_bucket_mb)."""
    fmt = tensor_format(cfg)
    serialize = serialize_sglang if fmt == "sglang" else serialize_safetensors
    groups = list(buckets(named, bucket_bytes or cfg.weight_sync_bucket_mb * 2**20))
    for i, bucket in enumerate(groups):
        payload = serialize(bucket)
        request = UpdateWeightsFromTensor(serialized_named_tensors=[payload] * max(cfg.weight_sync_engine_tp, 1),
                                          load_format="safetensors" if fmt == "safetensors" else None,
                                          flush_cache=i == len(groups) - 1, weight_version=str(version))
        _to_all(urls, request, cfg.weight_sync_timeout_s)
    return len(groups)


def push_disk(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig,
              source_dir: str) -> Path:
    root = Path(cfg.weight_sync_dir) if cfg.weight_sync_dir else Path(tempfile.gettempdir()) / "mopd_weight_sync"
    target = save_hf(root / f"v{version}", named, source_dir)
    record_pushed_weights(urls, target, version)
    _to_all(urls, UpdateWeightsFromDisk(model_path=str(target), weight_version=str(version)),
            cfg.weight_sync_timeout_s)
    return target


def push_recoverable(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig,
                     source_dir: str, snapshots: WeightSnapshots | None = None) -> None:
    """Tensor or disk push that survives an engine dying: the weights are on disk and recorded first (a
    restarted server loads them), and an engine that came back with older weights is pushed to again."""
    if cfg.weight_sync == "tensor":
        if snapshots is None:
            raise ValueError("push_recoverable: tensor mode needs a WeightSnapshots for restarted engines")
        record_pushed_weights(urls, snapshots.write(named, version, source_dir), version)

    def push(targets: list[str]) -> None:
        if cfg.weight_sync == "tensor":
            push_tensor(named, targets, version, cfg)
        else:
            push_disk(named, targets, version, cfg, source_dir)

    try:
        push(urls)
    except (OSError, RuntimeError) as e:
        log.warning("weight push v%d failed (%s); waiting for the engines to answer again", version, e)
        lagging = lagging_engines(urls, version, cfg.weight_sync_timeout_s)
        if lagging:
            push(lagging)


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
        tp = max(cfg.weight_sync_engine_tp, 1)
        world = 1 + tp * len(urls)
        master_port = free_port()
        import socket

        master = socket.gethostbyname(socket.gethostname())
        requests = [InitWeightsUpdateGroup(master_address=master, master_port=master_port, rank_offset=1 + i * tp,
                                           world_size=world, group_name=self.group_name) for i in range(len(urls))]
        threads = [threading.Thread(target=post_weight_update, args=(u, r, cfg.weight_sync_timeout_s))
                   for u, r in zip(urls, requests)]
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
            request = UpdateWeightsFromDistributed(
                names=[n for n, _ in bucket], dtypes=[str(t.dtype).replace("torch.", "") for _, t in bucket],
                shapes=[list(t.shape) for _, t in bucket], group_name=self.group_name,
                weight_version=str(version), flush_cache=i == len(groups) - 1)
            with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
                futures = [pool.submit(post_weight_update, u, request, self.cfg.weight_sync_timeout_s)
                           for u in self.urls]
                for _, tensor in bucket:
                    dist.broadcast(tensor.detach().cuda().contiguous(), src=0, group=self.group)
                for f in futures:
                    f.result()
