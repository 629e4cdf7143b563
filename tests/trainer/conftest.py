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

    from mopd.types import Sample

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


MIMO_MTP_LAYERS = 2


def _mimo_mtp_tensors(cfg, n_layers: int, gen: torch.Generator) -> dict:
    """`model.mtp.layers.<k>.*` laid out as the released MiMo-V2-Flash checkpoints name them (SGLang's
    mimo_v2_flash_nextn.py): each block is a dense-FFN sliding-window layer plus enorm/hnorm/eh_proj/final norm."""
    h, nh, hd, vd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.v_head_dim
    kv, inter = 2 * cfg.num_key_value_heads, cfg.intermediate_size
    shapes = {"enorm.weight": (h,), "hnorm.weight": (h,), "final_layernorm.weight": (h,),
              "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
              "self_attn.q_proj.weight": (nh * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
              "self_attn.v_proj.weight": (kv * vd, h), "self_attn.o_proj.weight": (h, nh * vd),
              "self_attn.attention_sink_bias": (nh,), "mlp.gate_proj.weight": (inter, h),
              "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    out = {}
    for k in range(n_layers):
        for name, shape in shapes.items():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            std = 0.1 if len(shape) == 2 else 0.5
            out[f"model.mtp.layers.{k}.{name}"] = base + std * torch.randn(shape, generator=gen)
    return out


def create_tiny_mimo(path, tokenizer, *, mtp_layers: int = MIMO_MTP_LAYERS, seed: int = 0):
    """A 4-layer MiMo-V2-Flash: full+dense, sliding+MoE, sliding+MoE, full+MoE; window 5 (shorter than
    the test sequences), non-zero sinks and score-correction bias, routed scaling 2.5, partial RoPE with a
    theta per layer type, v_head_dim != head_dim, and `mtp_layers` MTP blocks in the checkpoint."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    from mopd.toy.models import padded_vocab_size

    cfg = MiMoV2FlashConfig(
        vocab_size=padded_vocab_size(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, sliding_window=5, routed_scaling_factor=2.5,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], max_position_embeddings=1024,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0,
                                               "partial_rotary_factor": 0.5}},
        tie_word_embeddings=False, initializer_range=0.1, num_nextn_predict_layers=mtp_layers,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = MiMoV2FlashForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.self_attn.sinks is not None:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=gen))
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if mtp_layers:
        state = load_file(str(path / "model.safetensors"))
        state.update(_mimo_mtp_tensors(cfg, mtp_layers, gen))
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def mimo_path(tmp_path_factory, tokenizer):
    return str(create_tiny_mimo(tmp_path_factory.mktemp("mimo_v2_flash"), tokenizer))
