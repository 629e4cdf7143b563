"""Conversion pieces shared by Llama-style decoders (Qwen3, Qwen3-MoE, and later MiMo-V2-Flash).

Names on the Megatron side are the ones GPTModel gets from the local (non-TE) layer spec; the
model builder maps them onto TE names when TE specs are used (`align_to_model`). Every function
here is an exact, invertible re-layout (no arithmetic), so HF -> Megatron -> HF round-trips bit
for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rope_theta(hf_config: Any) -> float:
    """Base of the rotary embedding; only plain RoPE is supported (no YaRN/linear scaling yet)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"hf config rope_parameters.rope_type={rope_type!r} is not supported; expected 'default'")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("hf config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def head_dim(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def base_transformer_kwargs(hf_config: Any) -> dict[str, Any]:
    """TransformerConfig fields of a pre-norm RMSNorm/SwiGLU/RoPE decoder with qk-norm."""
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("hf config attention_bias=True is not supported by this converter; expected False")
    return {
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_query_groups": hf_config.num_key_value_heads,
        "kv_channels": head_dim(hf_config),
        "ffn_hidden_size": hf_config.intermediate_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": hf_config.rms_norm_eps,
        "qk_layernorm": True,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }


def gpt_model_kwargs(hf_config: Any) -> dict[str, Any]:
    """GPTModel constructor fields (besides config and layer spec)."""
    return {
        "vocab_size": hf_config.vocab_size,
        "max_sequence_length": hf_config.max_position_embeddings,
        "position_embedding_type": "rope",
        "rotary_base": rope_theta(hf_config),
        "share_embeddings_and_output_weights": bool(getattr(hf_config, "tie_word_embeddings", False)),
    }


def qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv: int) -> Tensor:
    """Megatron's linear_qkv: for each KV group, its query heads then its key then its value."""
    hd = q.shape[0] // num_heads
    hidden = q.shape[1]
    q = q.view(num_kv, num_heads // num_kv * hd, hidden)
    k = k.view(num_kv, hd, hidden)
    v = v.view(num_kv, hd, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_from_megatron(qkv: Tensor, num_heads: int, num_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    hidden = qkv.shape[1]
    hd = qkv.shape[0] // (num_heads + 2 * num_kv)
    per_group = qkv.view(num_kv, (num_heads // num_kv + 2) * hd, hidden)
    q, k, v = torch.split(per_group, [num_heads // num_kv * hd, hd, hd], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def attention_to_megatron(hf: dict[str, Tensor], i: int, cfg: Any) -> dict[str, Tensor]:
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {
        m + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
        m + "self_attention.linear_qkv.weight": qkv_to_megatron(
            hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
            hf[p + "self_attn.v_proj.weight"], cfg.num_attention_heads, cfg.num_key_value_heads),
        m + "self_attention.q_layernorm.weight": hf[p + "self_attn.q_norm.weight"],
        m + "self_attention.k_layernorm.weight": hf[p + "self_attn.k_norm.weight"],
        m + "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
        m + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
    }


def attention_to_hf(meg: dict[str, Tensor], i: int, cfg: Any) -> dict[str, Tensor]:
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    q, k, v = qkv_from_megatron(meg[m + "self_attention.linear_qkv.weight"], cfg.num_attention_heads,
                                cfg.num_key_value_heads)
    return {
        p + "input_layernorm.weight": meg[m + "input_layernorm.weight"],
        p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
        p + "self_attn.q_norm.weight": meg[m + "self_attention.q_layernorm.weight"],
        p + "self_attn.k_norm.weight": meg[m + "self_attention.k_layernorm.weight"],
        p + "self_attn.o_proj.weight": meg[m + "self_attention.linear_proj.weight"],
        p + "post_attention_layernorm.weight": meg[m + "pre_mlp_layernorm.weight"],
    }


def swiglu_to_megatron(gate: Tensor, up: Tensor) -> Tensor:
    """linear_fc1 of a gated MLP holds [gate; up] stacked on the output dim (gate goes through silu)."""
    return torch.cat([gate, up], dim=0)


def swiglu_from_megatron(fc1: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def embeddings_to_megatron(hf: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not getattr(cfg, "tie_word_embeddings", False):
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def embeddings_to_hf(meg: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": meg["embedding.word_embeddings.weight"],
           "model.norm.weight": meg["decoder.final_layernorm.weight"]}
    if not getattr(cfg, "tie_word_embeddings", False):
        out["lm_head.weight"] = meg["output_layer.weight"]
    return out


def dense_mlp_to_megatron(hf: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    p, m = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
    return {m + "linear_fc1.weight": swiglu_to_megatron(hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]),
            m + "linear_fc2.weight": hf[p + "down_proj.weight"]}


def dense_mlp_to_hf(meg: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    p, m = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
    gate, up = swiglu_from_megatron(meg[m + "linear_fc1.weight"])
    return {p + "gate_proj.weight": gate, p + "up_proj.weight": up, p + "down_proj.weight": meg[m + "linear_fc2.weight"]}
