"""Routing replay (R3): make the trainer's MoE layers use the experts the rollout engine chose.

SGLang returns routed experts as int32 [T-1, num_hidden_layers, top_k]: row i is the routing of
token i (the last token is never routed, it predicts nothing), and every layer has a slot, dense
ones included with meaningless values. Which layers are MoE comes from the HF config, never from
the data. Megatron's `RouterReplay` (one per MoE router, in build order) takes one [tokens, top_k]
tensor per MoE layer, tokens flattened the way the router sees them: [S, B] -> s * B + b.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from mopd.core.types import Sample


def model_replays(model: torch.nn.Module) -> list[RouterReplay]:
    """This model's RouterReplay objects in layer order (not the process-global list, which
    also holds routers of other models built in the same process)."""
    from megatron.core.transformer.moe.router import TopKRouter

    replays = [m.router_replay for m in model.modules() if isinstance(m, TopKRouter)]
    if any(r is None for r in replays):
        raise ValueError("routing replay requested but the model was built without moe_enable_routing_replay")
    return replays


def check_routed_experts(sample: Sample, index: int, *, num_layers: int, top_k: int, num_experts: int) -> None:
    arr = sample.routed_experts
    expected = (len(sample.tokens) - 1, num_layers, top_k)
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or tuple(arr.shape) != expected:
        got = getattr(arr, "shape", type(arr).__name__)
        raise ValueError(f"sample {index}: routed_experts has shape {got}, expected {expected} "
                         "([prompt+response-1, num_hidden_layers, num_experts_per_tok])")


def replay_tensors(samples: list[Sample], seq_len: int, moe_layers: list[int], *, num_layers: int,
                   top_k: int, num_experts: int) -> list[torch.Tensor]:
    """Per MoE layer, a [seq_len * B, top_k] int64 tensor in the router's token order.

    Positions without rollout routing (each sequence's last token, right padding) get experts
    0..top_k-1: any valid choice works because those positions never reach the loss.
    """
    B = len(samples)
    filler = torch.arange(top_k, dtype=torch.long)
    out = []
    for layer in moe_layers:
        idx = filler.expand(seq_len, B, top_k).clone()
        for b, s in enumerate(samples):
            rows = torch.from_numpy(np.ascontiguousarray(s.routed_experts[:, layer, :])).long()
            if rows.numel() and (rows.min() < 0 or rows.max() >= num_experts):
                raise ValueError(f"routed_experts of MoE layer {layer} hold expert ids outside [0, {num_experts})")
            idx[: rows.shape[0], b] = rows
        out.append(idx.reshape(seq_len * B, top_k))
    return out


@contextlib.contextmanager
def replaying(model: torch.nn.Module, per_layer: list[torch.Tensor] | None) -> Iterator[None]:
    """Replay the given routing in forward (and backward); no-op when per_layer is None."""
    if per_layer is None:
        yield
        return
    replays = model_replays(model)
    if len(per_layer) != len(replays):
        raise ValueError(f"{len(per_layer)} replay tensors for {len(replays)} MoE layers")
    for replay, idx in zip(replays, per_layer):
        replay.clear_indices()
        replay.set_target_indices(idx)
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for replay in replays:
            replay.clear_indices()
            replay.clear_router_replay_action()


def switch_to_backward(model: torch.nn.Module) -> None:
    """With activation recompute the backward re-runs the router: replay the same indices there."""
    for replay in model_replays(model):
        replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the natural routing of one forward; the list is filled (per MoE layer) on exit."""
    replays = model_replays(model)
    recorded: list[torch.Tensor] = []
    for replay in replays:
        replay.clear_indices()
        replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield recorded
        recorded.extend(r.get_recorded_indices() for r in replays)
    finally:
        for replay in replays:
            replay.clear_indices()
            replay.clear_router_replay_action()
