"""TrainerGroup: the only trainer object the driver talks to (sync calls over all DP ranks)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import ray
from transformers import AutoConfig

from mopd.core.algo import AdvantageConfig
from mopd.core.types import Sample
from trainer.config import TrainerConfig
from trainer.placement import place_trainer, resolve_device

log = logging.getLogger(__name__)


def split_by_tokens(samples: list[Sample], parts: int) -> list[list[int]]:
    """Indices per rank, balancing token counts (longest first onto the lightest rank)."""
    shards: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i].tokens)):
        r = min(range(parts), key=lambda r: (load[r], len(shards[r]), r))
        shards[r].append(i)
        load[r] += len(samples[i].tokens)
    return [sorted(s) for s in shards]


class TrainerRankDied(RuntimeError):
    """A trainer rank's process died mid-call: its state is gone, so the run stops (resume=true continues it)."""


def _gather(refs: list, what: str) -> list:
    """ray.get that turns a dead rank into one clear error saying what was lost and how to continue."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainerRankDied(
            f"a trainer rank (TrainerActor) died during {what}: {first}. The model and optimizer state of this "
            "run since its last checkpoint are lost; the run stops here. Continue it from the last checkpoint "
            "with resume=true (no step or prompt is skipped or repeated).") from e


class TrainerGroup:
    """`cfg.world_size` (dp x tp x pp) Ray actors training one Megatron model.

    Each data-parallel share of a batch goes to every rank of its TP group (the ranks say which share
    is theirs once Megatron's groups exist). CPU: each actor asks for `cfg.cpus_per_rank` CPUs and uses
    gloo; GPU: one GPU each and NCCL. The ranks run in placement groups (trainer/placement.py): each TP
    group on one node, the ranks of a node consecutive; `placement_timeout_s` bounds the wait for them.
    """

    def __init__(self, model_path: str, cfg: TrainerConfig, adv: AdvantageConfig, *, num_steps: int,
                 rollout_temperature: float = 1.0, placement_timeout_s: float | None = None) -> None:
        from trainer import cpu_compat
        from trainer.actor import TrainerActor

        cfg.validate()
        adv.validate()
        cfg.check_model(AutoConfig.from_pretrained(model_path))  # before any rank starts
        if not ray.is_initialized():
            raise RuntimeError("TrainerGroup needs a running Ray (call ray.init first)")
        if cfg.device == "auto":  # the cluster's GPUs decide, not the driver's (a KubeRay head has none)
            cfg = replace(cfg, device=resolve_device(ray.cluster_resources()))
        self.cfg = cfg
        world = cfg.world_size
        self.placement = place_trainer(cfg, use_gpu=not cpu_compat.needs_cpu_compat(cfg.device),
                                       timeout_s=placement_timeout_s or cfg.placement_timeout_s)
        self.actors: list = []
        try:
            self.actors = [TrainerActor.options(**self.placement.actor_options(r)).remote(r, world)
                           for r in range(world)]
            addr, port = ray.get(self.actors[0].master_address.remote())
            ray.get([a.setup.remote(addr, port, model_path, cfg, adv, num_steps, rollout_temperature)
                     for a in self.actors])
            self.dp_ranks: list[int] = ray.get([a.dp_rank.remote() for a in self.actors])
        except BaseException:
            for a in self.actors:  # do not leak ranks (and their CPUs/GPUs) when setup fails
                ray.kill(a)
            self.placement.remove()
            raise

    def compute_logprobs(self, samples: list[Sample]) -> list[np.ndarray]:
        """log pi_theta per response token, in the order of `samples`."""
        shards = split_by_tokens(samples, self.cfg.dp_size)
        results = _gather([a.compute_logprobs.remote([samples[i] for i in shards[d]])
                           for a, d in zip(self.actors, self.dp_ranks)], "compute_logprobs")
        out: list[np.ndarray | None] = [None] * len(samples)
        for d, res in zip(self.dp_ranks, results):  # the TP ranks of one share return the same values
            for i, lp in zip(shards[d], res):
                out[i] = lp
        return out  # type: ignore[return-value]

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One optimizer step over all samples; metrics are global (all-reduced over ranks)."""
        if not samples:
            raise ValueError("train_step got an empty list of samples; expected at least one")
        shards = split_by_tokens(samples, self.cfg.dp_size)
        metrics = _gather([a.train_step.remote([samples[i] for i in shards[d]], len(samples))
                           for a, d in zip(self.actors, self.dp_ranks)], "train_step")
        return metrics[0]

    def push_weights(self, urls: list[str], version: int) -> None:
        _gather([a.push_weights.remote(list(urls), int(version)) for a in self.actors], "push_weights")

    def save_checkpoint(self, path: str) -> None:
        """Exact training state (model, optimizer, scheduler, step, per-rank RNG) into `path`
        (the driver uses `checkpoints/step_N/trainer`); the HF export is `export_hf`."""
        _gather([a.save_checkpoint.remote(str(path)) for a in self.actors], "save_checkpoint")

    def load_checkpoint(self, path: str) -> None:
        ray.get([a.load_checkpoint.remote(str(path)) for a in self.actors])

    def export_hf(self, path: str) -> None:
        """HF safetensors + config.json + tokenizer files (loads with AutoModelForCausalLM)."""
        _gather([a.export_hf.remote(str(path)) for a in self.actors], "export_hf")

    def shutdown(self) -> None:
        """Release every rank; a rank that already died (the reason the run is stopping) is not an error here."""
        try:
            for a in self.actors:
                try:
                    ray.get(a.shutdown.remote(), timeout=60)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    log.warning("trainer rank already gone at shutdown: %s", str(e).splitlines()[0])
        finally:
            for a in self.actors:
                ray.kill(a)
            self.actors = []
            self.placement.remove()
