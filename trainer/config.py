"""Typed configuration of the Megatron-core trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from mopd.core.errors import ConfigError
from trainer.losses import loss_spec

WEIGHT_SYNC = ("tensor", "disk", "distributed")


@dataclass
class TrainerConfig:
    loss: str = "mopd"  # mopd | grpo | sft | any loss registered with trainer.losses.register_loss
    # importance-sampling mask between the training policy and the rollout policy (mu)
    eps_low: float = 0.5
    eps_high: float = 2.0
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    total_steps: int = 0  # for the schedule; 0 = use the job's num_steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    max_tokens_per_microbatch: int = 4096  # packing budget; gradient accumulation over microbatches
    # Megatron's layout: dp_size * tp_size * pp_size ranks (Ray actors, `world_size`); experts are split
    # over ep_size of the data-parallel ranks (ep_size divides dp_size, as in Megatron)
    dp_size: int = 1  # data-parallel replicas (each sees its own share of the batch)
    tp_size: int = 1  # tensor parallel: heads, MLP columns and the vocabulary split over tp_size ranks
    pp_size: int = 1  # pipeline stages: contiguous runs of layers, one microbatch at a time through them
    ep_size: int = 1  # expert parallel: the routed experts split over ep_size ranks
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16
    weight_sync: str = "tensor"  # tensor | disk | distributed
    weight_sync_bucket_mb: int = 64
    # tensor mode payload: auto (sglang serializer on GPU, safetensors on CPU) | sglang | safetensors
    weight_sync_format: str = "auto"
    # TP ranks of each engine (one serialized entry per rank in a tensor push, NCCL ranks per engine);
    # 0 = the engines' own TP, rollout.gpus_per_engine, filled in by the job (a different value is refused)
    weight_sync_engine_tp: int = 0
    weight_sync_dir: str = ""  # disk mode: where HF snapshots are written ("" = system temp dir)
    weight_sync_timeout_s: float = 300.0
    routing_replay: bool = True  # replay rollout routing (R3) in training forward/backward
    activation_recompute: bool = False
    # MTP loss weight (models with MTP layers, e.g. MiMo-V2-Flash): trains the draft heads on the
    # policy's tokens so MTP speculative decoding keeps up; 0 = off (main loss path unchanged)
    mtp_loss_coef: float = 0.0
    cpus_per_rank: float = 1.0
    # how long the ranks' placement groups may wait for resources (a KubeRay cluster may still be scaling up);
    # then the job stops naming what is missing (trainer/placement.py)
    placement_timeout_s: float = 600.0
    seed: int = 1234

    def validate(self, prefix: str = "trainer") -> None:
        """Range checks at start-up (no machine needed); `check_devices` adds what needs the machine."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{prefix}.{f.name}", "a finite number", value)
        loss_spec(self.loss)  # an unknown name: ConfigError naming trainer.loss, listing the registered losses
        if self.weight_sync not in WEIGHT_SYNC:
            raise ConfigError(f"{prefix}.weight_sync", f"one of {WEIGHT_SYNC}", self.weight_sync)
        if not 0 <= self.eps_low <= 1:
            raise ConfigError(f"{prefix}.eps_low", "a number in [0, 1]", self.eps_low)
        if self.eps_high < 1:
            raise ConfigError(f"{prefix}.eps_high", "a number >= 1", self.eps_high)
        if self.eps_low > self.eps_high:
            raise ConfigError(f"{prefix}.eps_low", f"<= eps_high ({self.eps_high})", self.eps_low)
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr", "a number > 0", self.lr)
        if self.placement_timeout_s <= 0:
            raise ConfigError(f"{prefix}.placement_timeout_s", "a number of seconds > 0", self.placement_timeout_s)
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"{prefix}.lr_schedule", "one of constant, cosine, linear", self.lr_schedule)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{prefix}.device", "one of auto, cpu, cuda", self.device)
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"{prefix}.dtype", "one of float32, bfloat16", self.dtype)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{prefix}.min_lr", f"a number in [0, lr={self.lr}]", self.min_lr)
        for name in ("warmup_steps", "total_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 0", getattr(self, name))
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay", "a number >= 0", self.weight_decay)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", "a number in [0, 1)", getattr(self, name))
        for name in ("dp_size", "tp_size", "pp_size", "ep_size", "max_tokens_per_microbatch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", "an integer >= 1", getattr(self, name))
        if self.dp_size % self.ep_size:
            raise ConfigError(f"{prefix}.ep_size", f"a divisor of trainer.dp_size={self.dp_size} (experts are split "
                              "over data-parallel ranks)", self.ep_size)
        if self.weight_sync_format not in ("auto", "sglang", "safetensors"):
            raise ConfigError(f"{prefix}.weight_sync_format", "one of auto, sglang, safetensors",
                              self.weight_sync_format)
        if self.weight_sync_bucket_mb < 1:
            raise ConfigError(f"{prefix}.weight_sync_bucket_mb", "an integer >= 1", self.weight_sync_bucket_mb)
        if self.weight_sync_engine_tp < 0:
            raise ConfigError(f"{prefix}.weight_sync_engine_tp", "0 (the engines' TP) or an integer >= 1",
                              self.weight_sync_engine_tp)
        if self.weight_sync_timeout_s <= 0:
            raise ConfigError(f"{prefix}.weight_sync_timeout_s", "a number of seconds > 0",
                              self.weight_sync_timeout_s)
        if self.weight_sync == "distributed" and self.device == "cpu":
            raise ConfigError(f"{prefix}.weight_sync", "tensor or disk when trainer.device=cpu (distributed "
                              "broadcasts over NCCL: it needs CUDA)", self.weight_sync)
        if self.cpus_per_rank <= 0:
            raise ConfigError(f"{prefix}.cpus_per_rank", "a number > 0", self.cpus_per_rank)
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip", "a number >= 0 (0 disables clipping)", self.grad_clip)
        if self.mtp_loss_coef < 0:
            raise ConfigError(f"{prefix}.mtp_loss_coef", "a number >= 0 (0 turns the MTP loss off)",
                              self.mtp_loss_coef)

    @property
    def world_size(self) -> int:
        """Trainer ranks (Ray actors): one per (data, tensor, pipeline) coordinate."""
        return self.dp_size * self.tp_size * self.pp_size

    def check_model(self, hf_config: Any, prefix: str = "trainer") -> None:
        """What the layout asks of the model (an HF config): each split must be even."""
        heads, kv = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None)
        kv = kv or heads
        experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "n_routed_experts", None) or 0
        model_type = getattr(hf_config, "model_type", "?")
        # MiMo-V2-Flash: both attention kinds have num_attention_heads query heads; sliding-window layers
        # have 2 * num_key_value_heads KV heads, which a divisor of num_key_value_heads also divides
        counts = [(heads, "num_attention_heads"), (kv, "num_key_value_heads")]
        if self.pp_size > 1 and getattr(hf_config, "tie_word_embeddings", False):
            raise ConfigError(f"{prefix}.pp_size", "1 for a model with tie_word_embeddings (the embedding and the "
                              "output layer would live on different stages)", self.pp_size)
        ffn = [(getattr(hf_config, name, None), name) for name in ("intermediate_size", "moe_intermediate_size")]
        for count, what in [*counts, (hf_config.vocab_size, "vocab_size"), *[(n, w) for n, w in ffn if n]]:
            if count % self.tp_size:
                raise ConfigError(f"{prefix}.tp_size", f"a divisor of the model's {what}={count}", self.tp_size)
        if hf_config.num_hidden_layers % self.pp_size:
            raise ConfigError(f"{prefix}.pp_size", f"a divisor of the model's num_hidden_layers="
                              f"{hf_config.num_hidden_layers}", self.pp_size)
        if self.ep_size > 1 and not experts:
            raise ConfigError(f"{prefix}.ep_size", f"1: the model ({model_type}) has no routed experts", self.ep_size)
        if experts and experts % self.ep_size:
            raise ConfigError(f"{prefix}.ep_size", f"a divisor of the model's number of experts={experts}",
                              self.ep_size)

    def check_devices(self, cuda_available: bool, prefix: str = "trainer") -> None:
        """What needs this machine: CUDA for device=cuda and for NCCL weight sync (embedded clusters)."""
        if self.device == "cuda" and not cuda_available:
            raise ConfigError(f"{prefix}.device", "auto or cpu: CUDA is not available on this machine", self.device)
        if self.weight_sync == "distributed" and not cuda_available:
            raise ConfigError(f"{prefix}.weight_sync", "tensor or disk: distributed weight sync broadcasts over "
                              "NCCL and needs CUDA, which is not available on this machine", self.weight_sync)
