"""The Ray actor of one trainer rank: sets up torch.distributed + Megatron, owns a TrainerRank."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray
import torch

from mopd.core.algo import AdvantageConfig
from mopd.core.types import Sample
from trainer import checkpoint, parallel, weight_push
from trainer.config import TrainerConfig


@ray.remote
class TrainerActor:
    """Rank `rank` of `world_size` trainer ranks (Megatron's layout: TP fastest, then DP)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.trainer: Any = None
        self.pusher: weight_push.Pusher | None = None
        torch.set_num_threads(1)  # CPU is shared; on GPU the host threads do little

    def master_address(self) -> tuple[str, int]:
        """Called on rank 0: where the process group rendezvous listens."""
        from trainer.dist import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, model_path: str, cfg: TrainerConfig,
              adv: AdvantageConfig, num_steps: int, rollout_temperature: float) -> None:
        from trainer import cpu_compat
        from trainer.dist import init_distributed
        from trainer.rank import TrainerRank

        use_cuda = not cpu_compat.needs_cpu_compat(cfg.device)
        init_distributed(self.rank, self.world_size, master_addr, master_port, use_cuda=use_cuda,
                         tp=cfg.tp_size, pp=cfg.pp_size, ep=cfg.ep_size, seed=cfg.seed)
        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        self.cfg, self.model_path = cfg, model_path
        self.trainer = TrainerRank(model_path, cfg, adv, num_steps=num_steps, rollout_temperature=rollout_temperature)

    def dp_rank(self) -> int:
        """Which share of a batch this rank trains on (ranks of one TP group share one)."""
        return self.trainer.dp_rank

    def compute_logprobs(self, samples: list[Sample]) -> list[np.ndarray]:
        return self.trainer.compute_logprobs(samples)

    def train_step(self, samples: list[Sample], num_global_samples: int) -> dict[str, float]:
        return self.trainer.train_step(samples, num_global_samples)

    def push_weights(self, urls: list[str], version: int) -> None:
        """Push to every engine from rank 0, gathering the model one bucket at a time (every rank takes
        part in the gather under TP/PP/EP); the weights are on disk and recorded for engines that restart,
        and one that came back with older weights is pushed to again (trainer/weight_sync.py)."""
        if self.rank != 0 and not parallel.model_parallel():
            return
        stream = self.trainer.hf_buckets(self.cfg.weight_sync_bucket_mb * 2**20, keep=self.rank == 0)
        if self.rank != 0:
            for _ in stream:  # the gather's collectives; rank 0 sends
                pass
            return
        if self.pusher is None:
            self.pusher = weight_push.Pusher(self.cfg, self.model_path)
        self.pusher.push(stream, urls, version)

    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its own part of the state (trainer/sharded_checkpoint.py) and its RNG."""
        checkpoint.save_trainer_state(path, self.trainer, self.rank)

    def load_checkpoint(self, path: str) -> None:
        rng = checkpoint.load_trainer_state(path, self.trainer, self.rank)
        if rng is not None:
            checkpoint.set_rng_state(rng)

    def export_hf(self, path: str) -> None:
        """Rank 0 writes the HF export bucket by bucket as the ranks gather it (every rank takes part under
        TP/PP/EP): about one bucket of extra memory, never the whole model."""
        if self.rank != 0 and not parallel.model_parallel():
            return
        stream = self.trainer.hf_buckets(self.cfg.weight_sync_bucket_mb * 2**20, keep=self.rank == 0)
        if self.rank == 0:
            checkpoint.export_hf(path, stream, self.model_path)
        else:
            for _ in stream:  # the gather's collectives; rank 0 writes
                pass

    def shutdown(self) -> None:
        from trainer.dist import shutdown_distributed

        if self.pusher is not None:
            self.pusher.close()
        shutdown_distributed()

    def pid(self) -> int:
        return os.getpid()
