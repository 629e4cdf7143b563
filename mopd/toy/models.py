"""Tiny HF checkpoints (Qwen3-MoE, Qwen3 dense) written with `save_pretrained`.

They are loaded back by path through the same code that loads real checkpoints, so tests and
the dry run exercise the real loading paths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, \
    Qwen3MoeForCausalLM


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
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected qwen3_moe or qwen3")
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _special_ids(tokenizer: PreTrainedTokenizerBase | None) -> dict:
    if tokenizer is None:
        return {}
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None}
