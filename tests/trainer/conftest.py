"""Shared fixtures: tiny HF checkpoints on disk and a single-process gloo group for in-process tests."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tokenizer():
    from mopd.toy.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def moe_path(tmp_path_factory, tokenizer):
    from mopd.toy.models import create_tiny_model

    return str(create_tiny_model(tmp_path_factory.mktemp("qwen3_moe"), tokenizer, arch="qwen3_moe"))


@pytest.fixture(scope="session")
def dense_path(tmp_path_factory, tokenizer):
    from mopd.toy.models import create_tiny_model

    return str(create_tiny_model(tmp_path_factory.mktemp("qwen3"), tokenizer, arch="qwen3"))


@pytest.fixture(scope="session")
def dist_env():
    """World of one (gloo) + Megatron parallel state, for tests that build models in-process."""
    from trainer.dist import free_port, init_distributed

    torch.set_num_threads(1)
    init_distributed(0, 1, "127.0.0.1", free_port(), use_cuda=False)
    yield


def make_samples(n: int, *, seed: int = 0, vocab: int = 100, min_len: int = 3, max_len: int = 12):
    """Random single-turn samples with every per-token field filled (values are not meaningful)."""
    import numpy as np

    from mopd.core.types import Sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(min_len, max_len)), int(rng.integers(2, max_len))
        mask = [1] * r
        if r > 3:
            mask[1] = 0  # a tool-output token inside the response
        out.append(Sample(prompt_index=i, group_index=i // 2, domain="math",
                          prompt_ids=[int(t) for t in rng.integers(7, vocab, p)],
                          response_ids=[int(t) for t in rng.integers(7, vocab, r)], loss_mask=mask,
                          rollout_logprobs=[float(x) for x in -rng.uniform(3.5, 5.5, r)],
                          teacher_logprobs=[float(x) for x in -rng.uniform(1.0, 6.0, r)],
                          orm_advantage=float(rng.normal())))
    return out


from mopd.toy.models import MIMO_MTP_LAYERS, create_tiny_mimo  # noqa: F401 - re-exported for the tests


@pytest.fixture(scope="session")
def mimo_path(tmp_path_factory, tokenizer):
    return str(create_tiny_mimo(tmp_path_factory.mktemp("mimo_v2_flash"), tokenizer))
