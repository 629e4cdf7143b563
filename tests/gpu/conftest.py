"""GPU smoke check (issue 14 item 5): a real SGLang server launched through mopd's engine actor, Megatron on CUDA.

Every test here carries the `gpu` marker and is skipped, with the reason, when there is no CUDA device or no
`sglang` in this environment. How to run: benchmarks/gpu_smoke/README.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (the GPU smoke check needs one GPU; see benchmarks/gpu_smoke/README.md)"
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed in this environment (pip install sglang==0.5.23 next to mopd)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE (layer 0 dense, 8 experts, top-2), head_dim 64 so SGLang's attention kernels take it."""
    return create_tiny_model(tmp_path_factory.mktemp("gpu_smoke") / "moe", build_char_tokenizer(), arch="qwen3_moe",
                             hidden_size=256, num_layers=3, num_experts=8, top_k=2)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    # With 2+ GPUs the NCCL test puts the engine on GPU 1 (--base-gpu-id) and the trainer (this process) on GPU 0:
    # Ray must then leave CUDA_VISIBLE_DEVICES alone in the engine actors.
    env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if torch.cuda.device_count() > 1 else {}
    ray.init(num_cpus=8, include_dashboard=False, ignore_reinit_error=True, runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
