"""HF <-> Megatron: same logits as the HF model, exact round trip, clear errors on mismatches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer import hf_io
from trainer import model_builder as mb
from trainer.models import get_architecture
from trainer.models.common import qkv_from_megatron, qkv_to_megatron


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3"])
def test_logits_match_hf(arch, moe_path, dense_path, dist_env):
    path = moe_path if arch == "qwen3_moe" else dense_path
    cfg = mb.load_hf_config(path)
    model, spec = mb.build_model(cfg, device="cpu")
    mb.hf_to_model(model, spec, cfg, hf_io.load_hf_state(path))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    pos = torch.arange(21).expand(3, 21)
    with torch.no_grad():
        ours = model.eval()(ids, pos, None)
        ref = hf(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"{arch}: max |logits diff| = {diff:.3e}")
    assert ours.shape == ref.shape
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3"])
def test_round_trip_exact(arch, moe_path, dense_path, dist_env):
    path = moe_path if arch == "qwen3_moe" else dense_path
    cfg = mb.load_hf_config(path)
    hf_state = hf_io.load_hf_state(path)
    model, spec = mb.build_model(cfg, device="cpu")
    mb.hf_to_model(model, spec, cfg, hf_state)
    back = mb.model_to_hf(model, spec, cfg)
    assert set(back) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key
    if arch == "qwen3_moe":  # experts, router and the dense layer 0 are all covered
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in back
        assert "model.layers.1.mlp.gate.weight" in back
        assert "model.layers.0.mlp.gate_proj.weight" in back


def test_qkv_layout_groups_queries_with_their_kv():
    # 4 query heads, 2 kv groups, head dim 1, hidden 1: rows are labelled by their origin
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    qkv = qkv_to_megatron(q, k, v, num_heads=4, num_kv=2)
    assert qkv.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    q2, k2, v2 = qkv_from_megatron(qkv, 4, 2)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_unknown_architecture_and_shape_mismatch(moe_path, dist_env):
    with pytest.raises(ValueError, match="model_type='llama'.*expected one of"):
        get_architecture("llama")
    cfg = mb.load_hf_config(moe_path)
    model, spec = mb.build_model(cfg, device="cpu")
    state = hf_io.load_hf_state(moe_path)
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="decoder.final_layernorm.weight: converted shape"):
        mb.hf_to_model(model, spec, cfg, state)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="no tensor 'model.norm.weight'"):
        mb.hf_to_model(model, spec, cfg, state)
