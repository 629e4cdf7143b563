"""Everything Megatron-core 0.16.1 needs to run GPTModel on a machine without a GPU.

Kept in one module so the GPU path never sees it: `needs_cpu_compat()` decides, the model builder
applies `patch_layer_specs`, `transformer_config_overrides` and `patch_routers` only when it is true.
The pieces (plus `cuda_device_is_cpu`, which the trainer enters around model code): the stock DotProductAttention allocates on the current CUDA
device (replaced by trainer.core_attention.TorchCoreAttention), TopKRouter's expert-bias buffers
are allocated there too (`cuda_device_is_cpu` while building), the alltoall dispatcher creates a
CUDA stream, Router.gating moves its weight to CUDA, and RotaryEmbedding.get_emb moves inv_freq
to CUDA on first use.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trainer.core_attention import TorchCoreAttention


def needs_cpu_compat(device: str) -> bool:
    """True when the model will live on the CPU (explicitly, or because no GPU is visible)."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


# Core attention without the CUDA buffer (also sliding window, sink logits, own value head dim).
SDPACoreAttention = TorchCoreAttention


@contextlib.contextmanager
def cuda_device_is_cpu() -> Iterator[None]:
    """While a model is built or run on CPU, `torch.cuda.current_device()` answers "cpu".

    Some Megatron modules allocate buffers there even with `use_cpu_initialization` (TopKRouter's
    `expert_bias` / `local_tokens_per_expert` with `moe_router_enable_expert_bias`, which
    MiMo-V2-Flash's score-correction bias needs), and the gathers of tensor_parallel.mappings (used by
    the MoE allgather dispatcher under TP/EP) allocate their outputs there. Scoped to construction and
    to the trainer's forward/backward, never on a GPU machine.
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]


class TorchNorm:
    """Megatron's WrappedTorchNorm (torch RMSNorm / LayerNorm) that also runs under sequence parallelism.

    The stock wrapper refuses sequence_parallel, which Megatron requires for MoE under TP. A torch norm
    is exact on a slice of the tokens; it only has to mark its weights `sequence_parallel` so their
    gradients are summed over the TP ranks (trainer.parallel.sync_grads, like Megatron's TE norms)."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}[config.normalization]
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def swap_norms(submodules: Any) -> None:
    """Megatron's WrappedTorchNorm -> TorchNorm in one spec's submodules (in place)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for name in ("input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "layer_norm", "enorm", "hnorm"):
        if getattr(submodules, name, None) is WrappedTorchNorm:
            setattr(submodules, name, TorchNorm)


def patch_layer_specs(layer_specs: list) -> None:
    """Swap the core attention of every layer spec for SDPACoreAttention and its norms for TorchNorm
    (in place)."""
    for spec in layer_specs:
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        swap_norms(spec.submodules)
        swap_norms(spec.submodules.self_attention.submodules)


def patch_block_spec(block_spec: Any) -> None:
    """patch_layer_specs plus the block's final norm."""
    patch_layer_specs(block_spec.layer_specs)
    swap_norms(block_spec)


def transformer_config_overrides(is_moe: bool) -> dict[str, Any]:
    """TransformerConfig fields that must differ on CPU."""
    overrides: dict[str, Any] = {"use_cpu_initialization": True}
    if is_moe:
        overrides["moe_token_dispatcher_type"] = "allgather"
    return overrides


def _cpu_gating(self: Any, input: torch.Tensor) -> torch.Tensor:
    router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
    bias = None if self.bias is None else self.bias.to(router_dtype)
    return F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)


def patch_routers(model: torch.nn.Module) -> None:
    """Replace Router.gating on each router instance by a plain F.linear (stock one moves to CUDA)."""
    from megatron.core.transformer.moe.router import Router

    for module in model.modules():
        if isinstance(module, Router):
            module.gating = types.MethodType(_cpu_gating, module)


def _cpu_rope_emb(self: Any, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
    if self.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]


def patch_rotary(model: torch.nn.Module) -> None:
    """RotaryEmbedding.get_emb moves inv_freq to the current CUDA device; keep it on the CPU."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.get_emb = types.MethodType(_cpu_rope_emb, module)


def patch_rng_tracker() -> None:
    """Under TP/SP Megatron forks its CUDA RNG tracker around dropout (the embedding's, under sequence
    parallelism) and the tracker reads CUDA RNG state: without CUDA the fork is a no-op (no RNG is
    drawn there: the trainer's dropout is 0)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()


def patch_model(model: torch.nn.Module) -> None:
    """All instance-level CPU patches of a built model."""
    patch_routers(model)
    patch_rotary(model)
    patch_rng_tracker()
