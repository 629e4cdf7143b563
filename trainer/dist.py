"""torch.distributed + Megatron parallel state setup for one trainer rank."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

# Megatron's rank order, TP fastest: a TP group is `tp_size` consecutive global ranks, which is what
# trainer/placement.py packs onto one node. Pinned here so that a change of Megatron's default cannot
# silently split TP groups over nodes.
RANK_ORDER = "tp-cp-ep-dp-pp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, *,
                     use_cuda: bool, tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 0) -> None:
    """gloo on CPU, NCCL on GPU; then Megatron's model-parallel groups (DP = world / (tp*pp))."""
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep, order=RANK_ORDER)
    if use_cuda:
        model_parallel_cuda_manual_seed(seed)


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
