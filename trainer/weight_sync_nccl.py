"""Weight push by NCCL (`trainer.weight_sync=distributed`): trainer rank 0 broadcasts each bucket into the
engines' weight-update group, after announcing it over SGLang's HTTP API.

GPU clusters only (NCCL, SGLang's `init_custom_process_group`), so it is kept apart from the HTTP modes of
trainer/weight_sync.py, whose bucket stream, engine calls and failure handling it shares.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from mopd.core.engine_api import (
    BeginWeightUpdate,
    EndWeightUpdate,
    InitWeightsUpdateGroup,
    UpdateWeightsFromDistributed,
    post_weight_update,
)
from trainer.config import TrainerConfig
from trainer.hf_shards import ShardWriter
from trainer.weight_sync import BucketStream, buckets, post_each


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
        self.push_buckets(buckets(named, self.cfg.weight_sync_bucket_mb * 2**20), version)

    def push_buckets(self, stream: BucketStream, version: int, writer: ShardWriter | None = None) -> None:
        """Per bucket: announce it to every engine, broadcast its tensors (each bucket written to `writer`
        first and released before the next one is gathered); all inside the engines' weight-update session."""
        import torch.distributed as dist

        timeout = self.cfg.weight_sync_timeout_s
        last, i = len(stream) - 1, -1
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            begun = post_each(pool, self.urls, BeginWeightUpdate(), timeout)
            opened = [u for u in self.urls if u not in begun]
            try:
                if begun:
                    raise next(iter(begun.values()))
                for bucket in stream:  # not enumerate(): its cached result tuple would keep the bucket alive longer
                    i += 1
                    if writer is not None:
                        writer.add(bucket)
                    request = UpdateWeightsFromDistributed(
                        names=[n for n, _ in bucket], dtypes=[str(t.dtype).replace("torch.", "") for _, t in bucket],
                        shapes=[list(t.shape) for _, t in bucket], group_name=self.group_name,
                        weight_version=str(version), flush_cache=i == last)
                    futures = [pool.submit(post_weight_update, u, request, timeout) for u in self.urls]
                    for _, tensor in bucket:
                        dist.broadcast(tensor.detach().cuda().contiguous(), src=0, group=self.group)
                    for f in futures:
                        f.result()
                    del bucket
            except BaseException:
                post_each(pool, opened, EndWeightUpdate(), timeout)  # best effort: an open session refuses the next
                raise
            closed = post_each(pool, opened, EndWeightUpdate(), timeout)
            if closed:
                raise next(iter(closed.values()))
