"""Qwen3-MoE: Qwen3 attention; MLP is MoE (softmax top-k router, SwiGLU experts) or dense per layer.

A layer is dense when it is listed in `mlp_only_layers` or falls outside `decoder_sparse_step`
(HF's rule); Megatron gets the same pattern as an explicit `moe_layer_freq` list.
`norm_topk_prob=True` (renormalise the top-k softmax) equals Megatron's top-k-then-softmax
(`moe_router_pre_softmax=False`); False equals softmax-then-top-k (`pre_softmax=True`).
"""

from __future__ import annotations

from typing import Any

from trainer.models import common
from trainer.models.architecture import Architecture, Tensor


def moe_layers(cfg: Any) -> list[int]:
    """Indices of the MoE layers, by HF's own rule (Qwen3MoeDecoderLayer)."""
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [i for i in range(cfg.num_hidden_layers)
            if i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0]


def transformer_kwargs(cfg: Any) -> dict[str, Any]:
    kwargs = common.base_transformer_kwargs(cfg)
    sparse = set(moe_layers(cfg))
    kwargs.update(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_layer_freq=[1 if i in sparse else 0 for i in range(cfg.num_hidden_layers)],
        moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,  # the fused path skips routing replay
    )
    return kwargs


def hf_to_megatron(hf: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = common.embeddings_to_megatron(hf, cfg)
    sparse = set(moe_layers(cfg))
    for i in range(cfg.num_hidden_layers):
        out.update(common.attention_to_megatron(hf, i, cfg))
        if i not in sparse:
            out.update(common.dense_mlp_to_megatron(hf, i))
            continue
        p, m = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
        out[m + "router.weight"] = hf[p + "gate.weight"]
        for e in range(cfg.num_experts):
            pe, me = f"{p}experts.{e}.", f"{m}experts.local_experts.{e}."
            out[me + "linear_fc1.weight"] = common.swiglu_to_megatron(hf[pe + "gate_proj.weight"],
                                                                      hf[pe + "up_proj.weight"])
            out[me + "linear_fc2.weight"] = hf[pe + "down_proj.weight"]
    return out


def megatron_to_hf(meg: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = common.embeddings_to_hf(meg, cfg)
    sparse = set(moe_layers(cfg))
    for i in range(cfg.num_hidden_layers):
        out.update(common.attention_to_hf(meg, i, cfg))
        if i not in sparse:
            out.update(common.dense_mlp_to_hf(meg, i))
            continue
        p, m = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
        out[p + "gate.weight"] = meg[m + "router.weight"]
        for e in range(cfg.num_experts):
            pe, me = f"{p}experts.{e}.", f"{m}experts.local_experts.{e}."
            gate, up = common.swiglu_from_megatron(meg[me + "linear_fc1.weight"])
            out[pe + "gate_proj.weight"] = gate
            out[pe + "up_proj.weight"] = up
            out[pe + "down_proj.weight"] = meg[me + "linear_fc2.weight"]
    return out


ARCHITECTURE = Architecture(
    model_type="qwen3_moe",
    transformer_kwargs=transformer_kwargs,
    moe_layers=moe_layers,
    hf_to_megatron=hf_to_megatron,
    megatron_to_hf=megatron_to_hf,
)
