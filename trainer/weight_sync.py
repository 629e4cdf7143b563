"""Push the student's weights to rollout engines over SGLang's native HTTP API.

The weights arrive as a stream of buckets (`BucketStream`): on a trainer, trainer/weight_gather.py
gathers them from the TP / PP / EP shards one bucket at a time, and every step below handles one bucket
and lets it go before the next is gathered, so a push needs about one bucket of extra memory, not the
whole model. The engines get full HF tensors, so an engine of any TP loads them.

Modes (TrainerConfig.weight_sync):
- tensor: POST /update_weights_from_tensor in buckets of `weight_sync_bucket_mb`. Payload per
  bucket: for the local CPU server `load_format="safetensors"` and each entry base64 of the
  safetensors bytes of HF-named tensors; for real SGLang (colocated GPU) SGLang's own
  MultiprocessingSerializer (lazy import; CUDA IPC handles, same node only). One entry per engine
  TP rank. The last bucket carries flush_cache=True.
- disk: write an HF sharded checkpoint (a file per bucket, trainer/hf_shards.py), then POST
  /update_weights_from_disk {model_path, weight_version}.
  The directory must be visible to the engines (shared filesystem at scale).
- distributed: POST /init_weights_update_group once, then per bucket POST
  /update_weights_from_distributed {names, dtypes, shapes, group_name, weight_version} while
  broadcasting the tensors from trainer rank 0 over NCCL (trainer/weight_sync_nccl.py). GPU only, not
  exercised in CI.
The requests and the HTTP calls are mopd/core/engine_api.py's (shared with the rollout side); this module
imports nothing from rollout/.

Restarted engines: every push's weights are written to disk (disk mode: the pushed directory;
tensor/distributed: a snapshot the trainer keeps, the last two versions, written bucket by bucket as
they are sent) and recorded per engine URL in Ray's key-value store under `WEIGHTS_KEY_PREFIX` (the
same string as rollout/engines.py). An engine actor that restarts a dead server starts it from that
record, so it serves the latest weights with the right weight_version. An engine that fails during a
push gets no more of its buckets; it is then waited for and checked (its /model_info weight_version),
and sent the recorded snapshot if it came back with older weights.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save as safetensors_save

from mopd.core.engine_api import (
    BeginWeightUpdate,
    EndWeightUpdate,
    EngineCallError,
    UpdateWeightsFromDisk,
    UpdateWeightsFromTensor,
    WeightUpdate,
    post_weight_update,
    weight_version,
)
from trainer.config import TrainerConfig
from trainer.hf_shards import Bucket, CheckpointBuckets, ShardWriter, write_sharded

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
    """The last pushed weights on disk, for engines that restart (tensor / distributed modes); keeps two.
    Written bucket by bucket as the push streams (trainer/hf_shards.py), never the whole model at once."""

    def __init__(self, cfg: TrainerConfig) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="snapshots-", dir=_sync_root(cfg)))
        self.kept: list[Path] = []

    def begin(self, version: int, num_buckets: int) -> ShardWriter:
        return ShardWriter(self.dir / f"v{version}", num_buckets)

    def finish(self, writer: ShardWriter, source_dir: str) -> Path:
        path = writer.finish(source_dir)
        self.kept.append(path)
        while len(self.kept) > 2:  # an engine restarting right now may still be reading the previous one
            shutil.rmtree(self.kept.pop(0), ignore_errors=True)
        return path

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _sync_root(cfg: TrainerConfig) -> Path:
    root = Path(cfg.weight_sync_dir) if cfg.weight_sync_dir else Path(tempfile.gettempdir()) / "mopd_weight_sync"
    root.mkdir(parents=True, exist_ok=True)
    return root


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


class BucketStream(Protocol):
    """Buckets of HF-named tensors with their number known up front (the last one flushes the engines'
    caches): a list from `buckets`, trainer/weight_gather.py's GatheredBuckets, hf_shards.CheckpointBuckets."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Bucket]: ...


@dataclass
class PushTimes:
    """Where one push's time went, in seconds (benchmarks/weight_push reads them)."""

    gather_s: float = 0.0  # waiting for the next bucket (gathered from the shards, or read from disk)
    write_s: float = 0.0  # snapshot / disk-mode files
    send_s: float = 0.0  # serialize and HTTP (tensor), NCCL broadcast (distributed), or the disk load
    paused_s: float = 0.0  # first bucket sent -> last one acknowledged: the engines hold mixed weights
    buckets: int = 0
    nbytes: int = 0


def buckets(named: dict[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Consecutive groups of tensors of at most bucket_bytes (a bigger tensor travels alone)."""
    out: list[Bucket] = []
    size = 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        if not out or (out[-1] and size + nbytes > bucket_bytes):
            out.append([])
            size = 0
        out[-1].append((name, tensor))
        size += nbytes
    return out


def serialize_safetensors(bucket: Bucket) -> str:
    return base64.b64encode(safetensors_save({n: t.detach().cpu().contiguous() for n, t in bucket})).decode()


def serialize_sglang(bucket: Bucket) -> str:
    from sglang.srt.utils import MultiprocessingSerializer  # GPU clusters only

    return MultiprocessingSerializer.serialize([(n, t.detach().cuda()) for n, t in bucket], output_str=True)


def tensor_format(cfg: TrainerConfig) -> str:
    if cfg.weight_sync_format != "auto":
        return cfg.weight_sync_format
    return "sglang" if torch.cuda.is_available() and cfg.device != "cpu" else "safetensors"


def _to_all(urls: list[str], request: WeightUpdate, timeout: float) -> None:
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        list(pool.map(lambda u: post_weight_update(u, request, timeout), urls))


def post_each(pool: ThreadPoolExecutor, urls: list[str], request: WeightUpdate, timeout: float,
              ) -> dict[str, Exception]:
    """POST to every engine at once; the engines whose request failed, with their error."""
    def one(url: str) -> Exception | None:
        try:
            post_weight_update(url, request, timeout)
        except (OSError, RuntimeError) as e:
            return e
        return None

    return {u: e for u, e in zip(urls, pool.map(one, urls)) if e is not None}


def _drop(errors: dict[str, Exception], live: list[str], failed: list[str], *, strict: bool, what: str,
          version: int) -> None:
    """Engines whose `what` failed leave `live` for the rest of this push (strict: raise the first error)."""
    if errors and strict:
        raise next(iter(errors.values()))
    for url, err in errors.items():
        log.warning("weight push v%d: engine %s failed %s (%s); it gets no more buckets of this push",
                    version, url, what, err)
        live.remove(url)
        failed.append(url)


def send_tensor_buckets(stream: BucketStream, urls: list[str], version: int, cfg: TrainerConfig, *,
                        writer: ShardWriter | None = None, strict: bool = True,
                        times: PushTimes | None = None) -> list[str]:
    """POST /update_weights_from_tensor per bucket to every engine, inside the engines' weight-update session
    (/begin_weight_update .. /end_weight_update, which SGLang requires), each bucket written to `writer` first
    and released before the next one is asked for. Returns the engines whose request failed (they get no
    later bucket of this push); strict: raise the first failure instead."""
    fmt = tensor_format(cfg)
    serialize = serialize_sglang if fmt == "sglang" else serialize_safetensors
    times = times if times is not None else PushTimes()
    live, failed = list(urls), []
    last, first_sent, i = len(stream) - 1, None, -1
    # one thread per engine for the whole push: a new thread per bucket would add malloc arenas that keep
    # the freed payloads (seen as tens of MiB of peak RSS)
    timeout = cfg.weight_sync_timeout_s
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        begun = post_each(pool, live, BeginWeightUpdate(), timeout)
        opened = [u for u in live if u not in begun]
        try:
            _drop(begun, live, failed, strict=strict, what="to open its weight-update session", version=version)
            mark = time.perf_counter()
            for bucket in stream:  # not enumerate(): its cached result tuple would keep the bucket alive a round longer
                i += 1
                now = time.perf_counter()
                times.gather_s += now - mark
                times.buckets += 1
                times.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                if writer is not None:
                    writer.add(bucket)
                    times.write_s += time.perf_counter() - now
                if live:
                    sent = time.perf_counter()
                    first_sent = sent if first_sent is None else first_sent
                    payload = [serialize(bucket)] * max(cfg.weight_sync_engine_tp, 1)  # one entry per engine TP rank
                    request = UpdateWeightsFromTensor(serialized_named_tensors=payload,
                                                      load_format="safetensors" if fmt == "safetensors" else None,
                                                      flush_cache=i == last, weight_version=str(version))
                    del bucket, payload
                    errors = post_each(pool, live, request, timeout)
                    del request
                    _drop(errors, live, failed, strict=strict, what="a bucket", version=version)
                    mark = time.perf_counter()
                    times.send_s += mark - sent
                    times.paused_s = mark - first_sent
                else:
                    del bucket
                    mark = time.perf_counter()
        except BaseException:
            post_each(pool, opened, EndWeightUpdate(), timeout)  # best effort: a session left open refuses the next
            raise
        closed = post_each(pool, opened, EndWeightUpdate(), timeout)  # also the engines that failed a bucket
        _drop({u: e for u, e in closed.items() if u in live}, live, failed, strict=strict,
              what="to close its weight-update session", version=version)
    return failed


def push_tensor(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig, *,
                bucket_bytes: int | None = None) -> int:
    """Returns the number of buckets sent (bucket_bytes overrides cfg.weight_sync_bucket_mb)."""
    groups = buckets(named, bucket_bytes or cfg.weight_sync_bucket_mb * 2**20)
    send_tensor_buckets(groups, urls, version, cfg)
    return len(groups)


def push_disk(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig,
              source_dir: str) -> Path:
    return push_disk_buckets(buckets(named, cfg.weight_sync_bucket_mb * 2**20), urls, version, cfg, source_dir)


def push_disk_buckets(stream: BucketStream, urls: list[str], version: int, cfg: TrainerConfig, source_dir: str,
                      times: PushTimes | None = None) -> Path:
    """Write the buckets as an HF sharded checkpoint (one file per bucket), record it for restarting
    engines, then tell every engine to load it."""
    times = times if times is not None else PushTimes()
    target = _write_recorded(stream, urls, version, cfg, source_dir, times)
    _load_from_disk(urls, target, version, cfg, times)
    return target


def _write_recorded(stream: BucketStream, urls: list[str], version: int, cfg: TrainerConfig, source_dir: str,
                    times: PushTimes) -> Path:
    start, waited = time.perf_counter(), times.gather_s
    target = write_sharded(_counted(stream, times), len(stream), _sync_root(cfg) / f"v{version}", source_dir)
    times.write_s += time.perf_counter() - start - (times.gather_s - waited)
    record_pushed_weights(urls, target, version)
    return target


def _load_from_disk(urls: list[str], target: Path, version: int, cfg: TrainerConfig, times: PushTimes) -> None:
    sent = time.perf_counter()
    _to_all(urls, UpdateWeightsFromDisk(model_path=str(target), weight_version=str(version)),
            cfg.weight_sync_timeout_s)
    times.send_s = times.paused_s = time.perf_counter() - sent


def _counted(stream: BucketStream, times: PushTimes) -> Iterator[Bucket]:
    """The stream, with the time spent waiting for each bucket and the bytes added to `times`."""
    it = iter(stream)
    while True:
        start = time.perf_counter()
        bucket = next(it, None)
        times.gather_s += time.perf_counter() - start
        if bucket is None:
            return
        times.buckets += 1
        times.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        yield bucket
        del bucket


def push_recoverable(named: dict[str, torch.Tensor], urls: list[str], version: int, cfg: TrainerConfig,
                     source_dir: str, snapshots: WeightSnapshots | None = None) -> None:
    """`push_recoverable_buckets` of a state that is already whole."""
    push_recoverable_buckets(buckets(named, cfg.weight_sync_bucket_mb * 2**20), urls, version, cfg, source_dir,
                             snapshots)


def push_recoverable_buckets(stream: BucketStream, urls: list[str], version: int, cfg: TrainerConfig,
                             source_dir: str, snapshots: WeightSnapshots | None = None,
                             times: PushTimes | None = None) -> PushTimes:
    """Tensor or disk push that survives an engine dying, one bucket in memory at a time.

    Tensor mode: each bucket goes to the snapshot on disk and then to the engines; once all are written
    the snapshot is recorded for restarting engines. An engine that failed a request gets no further
    bucket; after the stream the engines are waited for, and one that does not report `version` (it died
    and restarted from the previous snapshot) is sent the new snapshot, read back bucket by bucket.
    Disk mode: the checkpoint is written and recorded first, then the engines load it."""
    times = times if times is not None else PushTimes()
    if cfg.weight_sync == "tensor":
        if snapshots is None:
            raise ValueError("push_recoverable: tensor mode needs a WeightSnapshots for restarted engines")
        writer = snapshots.begin(version, len(stream))
        try:
            failed = send_tensor_buckets(stream, urls, version, cfg, writer=writer, strict=False, times=times)
        except BaseException:
            writer.abort()
            raise
        path = snapshots.finish(writer, source_dir)
        record_pushed_weights(urls, path, version)
        if failed:
            lagging = lagging_engines(urls, version, cfg.weight_sync_timeout_s)
            if lagging:
                send_tensor_buckets(CheckpointBuckets(path, cfg.weight_sync_bucket_mb * 2**20), lagging, version,
                                    cfg)
        return times
    target = _write_recorded(stream, urls, version, cfg, source_dir, times)
    try:
        _load_from_disk(urls, target, version, cfg, times)
    except (OSError, RuntimeError) as e:
        log.warning("weight push v%d failed (%s); waiting for the engines to answer again", version, e)
        lagging = lagging_engines(urls, version, cfg.weight_sync_timeout_s)
        if lagging:
            _load_from_disk(lagging, target, version, cfg, PushTimes())
    return times
