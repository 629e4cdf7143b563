"""The pushing trainer rank's side of weight sync, kept between pushes (trainer/actor.py holds one)."""

from __future__ import annotations

from trainer.config import TrainerConfig
from trainer.weight_sync import (
    BucketStream,
    PushTimes,
    WeightSnapshots,
    push_recoverable_buckets,
    record_pushed_weights,
)
from trainer.weight_sync_nccl import DistributedPusher


class Pusher:
    """The pushing rank's side of weight sync, kept between pushes: the snapshots for restarting engines
    and the NCCL group (distributed mode). Streams whatever buckets it is given (trainer/weight_gather.py's
    bucket-by-bucket gather on a trainer), so the push never holds the whole model."""

    def __init__(self, cfg: TrainerConfig, source_dir: str) -> None:
        self.cfg, self.source_dir = cfg, source_dir
        self.snapshots: WeightSnapshots | None = None
        self.nccl: DistributedPusher | None = None

    def push(self, stream: BucketStream, urls: list[str], version: int) -> PushTimes:
        if self.cfg.weight_sync == "disk":
            return push_recoverable_buckets(stream, urls, version, self.cfg, self.source_dir)
        if self.snapshots is None:
            self.snapshots = WeightSnapshots(self.cfg)
        if self.cfg.weight_sync == "tensor":
            return push_recoverable_buckets(stream, urls, version, self.cfg, self.source_dir, self.snapshots)
        if self.nccl is None or self.nccl.urls != urls:
            self.nccl = DistributedPusher(urls, self.cfg)
        writer = self.snapshots.begin(version, len(stream))
        self.nccl.push_buckets(stream, version, writer)
        record_pushed_weights(urls, self.snapshots.finish(writer, self.source_dir), version)
        return PushTimes()

    def close(self) -> None:
        if self.snapshots is not None:
            self.snapshots.close()
