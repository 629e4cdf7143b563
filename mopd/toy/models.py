"""Tiny HF checkpoints (Qwen3-MoE, Qwen3 dense, MiMo-V2-Flash with MTP) written with `save_pretrained`.

They are loaded back by path through the same code that loads real checkpoints, so tests and
the dry run exercise the real loading paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)


def tiny_qwen3_moe_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                          num_experts: int = 4, top_k: int = 2, dense_layers: tuple[int, ...] = (0,),
                          tokenizer: PreTrainedTokenizerBase | None = None) -> Qwen3MoeConfig:
    """Layer 0 is dense by default so every R3 code path sees a mix of dense and MoE layers."""
    ids = _special_ids(tokenizer)
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden_size // 4, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, mlp_only_layers=list(dense_layers),
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **ids,
    )


def tiny_qwen3_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                      tokenizer: PreTrainedTokenizerBase | None = None) -> Qwen3Config:
    ids = _special_ids(tokenizer)
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden_size // 4, max_position_embeddings=1024, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **ids,
    )


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase, multiple: int = 64) -> int:
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple


def create_tiny_model(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, arch: str = "qwen3_moe",
                      seed: int = 0, **kwargs) -> Path:
    """Initialise a tiny model with a fixed seed and save it with its tokenizer under `path`."""
    vocab = padded_vocab_size(tokenizer)
    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config(vocab, tokenizer=tokenizer, **kwargs))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(tiny_qwen3_config(vocab, tokenizer=tokenizer, **kwargs))
    elif arch == "mimo_v2_flash":  # the toy_mimo student: 3 MTP layers (as released), window 8
        return create_toy_mimo(path, tokenizer, seed=seed, **{"mtp_layers": 3, "sliding_window": 8, **kwargs})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected qwen3_moe, qwen3 or mimo_v2_flash")
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _special_ids(tokenizer: PreTrainedTokenizerBase | None) -> dict:
    if tokenizer is None:
        return {}
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None}


# ---------------------------------------------------------------------------- MiMo-V2-Flash
MIMO_MTP_LAYERS = 2


def mimo_mtp_tensors(cfg: Any, n_layers: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random `model.mtp.layers.<k>.*` laid out as the released MiMo-V2-Flash checkpoints name them (SGLang's
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


def tiny_mimo_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 4, sliding_window: int = 5,
                     mtp_layers: int = MIMO_MTP_LAYERS, layer_types: list[str] | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> Any:
    """MiMo-V2-Flash in miniature: dense first layer then MoE, sliding (with sinks) and full attention,
    partial RoPE with a theta per layer type, v_head_dim != head_dim, `mtp_layers` MTP blocks."""
    from transformers import MiMoV2FlashConfig

    layer_types = layer_types or ["full_attention" if i == 0 or i == num_layers - 1 else "sliding_attention"
                                  for i in range(num_layers)]
    rope = {"rope_type": "default", "partial_rotary_factor": 0.5}
    return MiMoV2FlashConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size // 2, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=hidden_size * 3 // 8, v_head_dim=hidden_size // 4, n_routed_experts=4,
        num_experts_per_tok=2, sliding_window=sliding_window, routed_scaling_factor=2.5, layer_types=layer_types,
        mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1), max_position_embeddings=1024,
        rope_parameters={"full_attention": {**rope, "rope_theta": 50000.0},
                         "sliding_attention": {**rope, "rope_theta": 1000.0}},
        tie_word_embeddings=False, initializer_range=0.1, num_nextn_predict_layers=mtp_layers,
        **_special_ids(tokenizer))


def create_tiny_mimo(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, mtp_layers: int = MIMO_MTP_LAYERS,
                     seed: int = 0) -> Path:
    """The 4-layer test MiMo-V2-Flash: full+dense, sliding+MoE, sliding+MoE, full+MoE; window 5, non-zero
    sinks and score-correction bias, routed scaling 2.5, and `mtp_layers` random MTP blocks."""
    return create_toy_mimo(path, tokenizer, seed=seed, mtp_layers=mtp_layers, hidden_size=64, num_layers=4,
                           sliding_window=5)


def create_toy_mimo(path: str | Path, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **kwargs: Any) -> Path:
    """A tiny MiMo-V2-Flash saved with its MTP blocks (transformers saves none: they are added to the file)."""
    from safetensors.torch import load_file, save_file
    from transformers import MiMoV2FlashForCausalLM

    cfg = tiny_mimo_config(padded_vocab_size(tokenizer), tokenizer=tokenizer, **kwargs)
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
    if cfg.num_nextn_predict_layers:
        state = load_file(str(path / "model.safetensors"))
        state.update(mimo_mtp_tensors(cfg, cfg.num_nextn_predict_layers, gen))
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
