"""Where each weight of a Megatron model lives under tensor and expert parallelism.

The converters in trainer/models map full HF tensors to full Megatron tensors (the TP=EP=1 layout).
Here a rank cuts its own shard out of that full state (`shard_state`) and the ranks put the full
state back together (`gather_state`), so HF -> Megatron -> HF stays exact at any layout. The cut
follows the attributes Megatron's parallel layers give their parameters (`tensor_model_parallel`,
`partition_dim`); experts are split by index over the expert-parallel ranks. Gated MLP inputs
(`linear_fc1` = [gate; up]) are cut per half: each TP rank holds [gate_r; up_r].

Gradients: ranks of one data-parallel group hold the same weights and see different data, so their
gradients are summed (`sync_grads`); expert weights under EP are summed over the expert
data-parallel group instead (the allgather dispatcher already brought every rank's tokens to them).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

Tensor = torch.Tensor
_EXPERT = re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _is_gated_fc1(key: str, model: torch.nn.Module) -> bool:
    return key.endswith("linear_fc1.weight") and bool(getattr(model.config, "gated_linear_unit", False))


def _tp(key: str) -> tuple[int, int, dist.ProcessGroup | None]:
    """(size, rank, group) of the tensor-parallel group that splits this weight (experts have their own)."""
    if _EXPERT.match(key):
        return (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_group())
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_group()


def is_expert(key: str) -> bool:
    """Whether a local weight belongs to a routed expert (split over the expert-parallel ranks)."""
    return _EXPERT.match(key) is not None


def tp_size_of(key: str) -> int:
    """How many tensor-parallel ranks split this weight when it is split (experts: expert TP)."""
    return _tp(key)[0]


def full_key(local_key: str, num_local_experts: int, layer_offset: int = 0, ep_rank: int | None = None) -> str:
    """The single-rank name of a local weight: local expert j of EP rank r is expert r * local + j, and
    local layer i of a pipeline stage is layer layer_offset + i."""
    m = _EXPERT.match(local_key)
    if m is not None:
        rank = ps.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
        local_key = f"{m.group(1)}{rank * num_local_experts + int(m.group(2))}{m.group(3)}"
    layer = _LAYER.match(local_key)
    if layer is None or not layer_offset:
        return local_key
    return f"decoder.layers.{layer_offset + int(layer.group(1))}.{layer.group(2)}"


def num_local_experts(model: torch.nn.Module) -> int:
    n = getattr(model.config, "num_moe_experts", None) or 0
    return n // ps.get_expert_model_parallel_world_size()


def layer_offset(model: torch.nn.Module) -> int:
    """Index of this pipeline stage's first decoder layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config) if ps.get_pipeline_model_parallel_world_size() > 1 else 0


def _cut(full: Tensor, param: Tensor, key: str, model: torch.nn.Module) -> Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size, rank, _ = _tp(key)
    if size == 1:
        return full
    if _is_gated_fc1(key, model):
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(size, dim=param.partition_dim)[rank]


def shard_state(full: dict[str, Tensor], model: torch.nn.Module, params_only: bool = False) -> dict[str, Tensor]:
    """This rank's part of a full (TP=EP=1) Megatron state, under the model's local names (of every
    weight and buffer, or of the parameters only: optimizer moments)."""
    params = dict(model.named_parameters())
    local, offset = num_local_experts(model), layer_offset(model)
    out = {}
    for key in params if params_only else model.state_dict():
        if key.endswith("_extra_state"):
            continue
        name = full_key(key, local, offset)
        if name not in full:
            raise ValueError(f"converted state has no weight {name!r} (local {key!r} of this rank)")
        out[key] = _cut(full[name], params[key], key, model) if key in params else full[name]
    return out


def _join_tp(local: Tensor, param: Tensor, key: str, model: torch.nn.Module) -> Tensor:
    size, _, group = _tp(key)
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return local
    if param.partition_dim == 0 and not _is_gated_fc1(key, model):  # straight into the full tensor, no copy
        whole = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(whole, local.contiguous(), group=group)
        return whole
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    if _is_gated_fc1(key, model):
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(pieces, dim=param.partition_dim)


def gather_weight(model: torch.nn.Module, key: str, value: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The full tensor(s) of one local weight under single-rank names: its TP shards joined, and under EP
    local expert j of every EP rank (a collective over this stage's TP and EP groups)."""
    local, offset = num_local_experts(model), layer_offset(model)
    whole = _join_tp(value, params[key], key, model) if key in params else value
    ep = ps.get_expert_model_parallel_world_size()
    if _EXPERT.match(key) is None or ep == 1:
        return {full_key(key, local, offset): whole}
    pieces = [torch.empty_like(whole) for _ in range(ep)]
    dist.all_gather(pieces, whole.contiguous(), group=ps.get_expert_model_parallel_group())
    return {full_key(key, local, offset, ep_rank=r): piece for r, piece in enumerate(pieces)}


def gather_state(model: torch.nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The full (TP=EP=1) Megatron state from every rank's `state` (the model's local names);
    a collective: every rank of the model-parallel groups calls it and gets the whole state (pipeline
    stages exchange theirs as objects, on the CPU)."""
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        out.update(gather_weight(model, key, value, params))
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        stages: list[dict[str, Tensor] | None] = [None] * pp
        dist.all_gather_object(stages, {k: v.cpu() for k, v in out.items()},
                               group=ps.get_pipeline_model_parallel_group())
        out = {k: v for stage in stages for k, v in (stage or {}).items()}
    return out


def _allreduce(grads: list[Tensor], group: dist.ProcessGroup) -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _tp_partial(name: str, param: Tensor, config: object) -> bool:
    """Replicated weights whose gradient each TP rank holds only part of (Megatron's finalize_model_grads
    sums the same ones): q/k norms see only this rank's heads; under sequence parallelism, norms and
    routers see only this rank's tokens."""
    if getattr(param, "tensor_model_parallel", False):
        return False
    if getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name):
        return True
    return bool(getattr(config, "sequence_parallel", False) and getattr(param, "sequence_parallel", False))


def sync_grads(model: torch.nn.Module) -> None:
    """Sum partial gradients over TP, then over the ranks that hold the same weights (one coalesced
    all-reduce per group)."""
    named = list(model.named_parameters())
    partial = [p.grad for n, p in named if _tp_partial(n, p, model.config)]
    dense = [p.grad for _, p in named if getattr(p, "allreduce", True)]
    expert = [p.grad for _, p in named if not getattr(p, "allreduce", True)]
    for grads, size, group in ((partial, ps.get_tensor_model_parallel_world_size(),
                                ps.get_tensor_model_parallel_group()),
                               (dense, ps.get_data_parallel_world_size(), ps.get_data_parallel_group()),
                               (expert, ps.get_expert_data_parallel_world_size(),
                                ps.get_expert_data_parallel_group())):
        if grads and size > 1:
            _allreduce(grads, group)


def config_sizes() -> dict[str, int]:
    """TransformerConfig's parallel sizes, from the initialised parallel state (the layers read both)."""
    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size()}


def model_parallel() -> bool:
    """True when this rank holds only part of the model's weights (TP, EP or PP above 1)."""
    return (ps.get_tensor_model_parallel_world_size() > 1 or ps.get_expert_model_parallel_world_size() > 1
            or ps.get_pipeline_model_parallel_world_size() > 1)


def grad_norm_sq(params: list[Tensor], model_params: list[Tensor]) -> Tensor:
    """Squared L2 norm of the whole model's gradient over all ranks (`params` hold the grads, in the
    order of `model_params`, whose Megatron attributes say which copies are duplicates)."""
    world = dist.get_world_size()
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p, mp in zip(params, model_params):
        if p.grad is None:
            continue
        key_is_expert = not getattr(mp, "allreduce", True)
        if key_is_expert:
            shards = ps.get_expert_model_parallel_world_size() * (
                ps.get_expert_tensor_parallel_world_size() if getattr(mp, "tensor_model_parallel", False) else 1)
        else:
            shards = ps.get_tensor_model_parallel_world_size() if getattr(mp, "tensor_model_parallel", False) else 1
        copies = world // (ps.get_pipeline_model_parallel_world_size() * shards)  # ranks holding this same grad
        total += p.grad.detach().double().pow(2).sum() / copies
    dist.all_reduce(total)
    return total


def lockstep_shapes(shapes: list[tuple[int, int]], tp: int) -> list[tuple[int, int]]:
    """The (sequence, batch) size each microbatch slot runs at on this rank.

    Sequences are padded to a multiple of the TP size (sequence parallelism splits them). Under expert
    parallelism the allgather dispatcher gathers equal-sized token blocks from every rank of the EP group
    in every MoE layer, forward and backward, so those ranks run the same number of microbatches at the
    same shapes: each slot takes the largest shape any of them has there, and a rank with fewer
    microbatches runs idle ones (`shapes` beyond its own)."""
    padded = [(-(-s // tp) * tp, b) for s, b in shapes]
    if ps.get_expert_model_parallel_world_size() == 1:
        return padded
    group = ps.get_expert_model_parallel_group()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    count = torch.tensor([len(padded)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    table = torch.zeros(int(count), 2, dtype=torch.long, device=device)
    if padded:
        table[: len(padded)] = torch.tensor(padded, device=device)
    dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    return [(int(s), int(b)) for s, b in table.tolist()]


def replay_for_rank(per_layer: list[Tensor], seq_len: int, batch: int, padded_batch: int) -> list[Tensor]:
    """Routing-replay tensors ([seq_len * batch, k], token s * batch + b) as this rank's routers see them:
    widened to `padded_batch` rows (the added ones, padding never scored, take experts 0..k-1) and, under
    sequence parallelism, cut to this TP rank's slice of the sequence."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = []
    for idx in per_layer:
        k = idx.shape[-1]
        wide = torch.arange(k, dtype=idx.dtype, device=idx.device).expand(seq_len, padded_batch, k).clone()
        wide[:, :batch] = idx.view(seq_len, batch, k)
        out.append(wide.chunk(tp, dim=0)[rank].reshape(-1, k))
    return out
