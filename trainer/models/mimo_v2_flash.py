"""MiMo-V2-Flash (transformers `mimo_v2_flash`) as a Megatron-core GPTModel, with its MTP layers.

What differs from a Llama-style decoder, and where it goes in Megatron:
- per-layer attention type (`layer_types`): sliding-window layers have twice the KV heads, a
  window of `sliding_window` tokens (the query included) and one learnable sink logit per head;
  full layers have neither. Megatron's heterogeneous-block hook (`heterogeneous_block_specs` +
  `get_config_for_layer`) hands each layer its own config: `num_query_groups`,
  `window_size=(sliding_window - 1, 0)`, `softmax_type="learnable"` (the sink is the core
  attention's `softmax_offset`, as for gpt-oss);
- RoPE per layer type (theta and partial rotary factor): each attention owns a Megatron
  `RotaryEmbedding` for its type (GPTModel gets `position_embedding_type="none"`);
- values have their own head dim (`v_head_dim`) and are scaled by `attention_value_scale`:
  `MiMoSelfAttention`, a SelfAttention whose fused QKV rows are, per KV group, its query heads,
  its key head, its value head;
- MoE on `mlp_layer_types == "sparse"` layers, HF router = DeepSeek-V3 noaux_tc: sigmoid scores,
  top-k on scores + `e_score_correction_bias`, weights = the chosen (unbiased) scores normalised,
  times `routed_scaling_factor`. That is Megatron's `moe_router_score_function="sigmoid"` with
  `moe_router_enable_expert_bias` (bias frozen: update rate 0) and `moe_router_topk_scaling_factor`;
  group-limited routing maps when HF's top-2-per-group rule equals Megatron's top-(k/groups);
- MTP: `mtp.layers.<k>` built by Megatron's `MultiTokenPredictionBlock` (a dense-FFN
  sliding-window layer, enorm/hnorm/eh_proj/final_layernorm), run by trainer.mtp_loss.

Under model parallelism (trainer/parallel.py cuts the full converted state by the parameters'
attributes): TP splits both attention kinds by KV group (each group's query, key and value rows
stay together in linear_qkv), so every rank needs num_key_value_heads % tp == 0; the sink logits
go with their heads (`ShardedSinkAttention`, `_mark_sinks_split`); RoPE covers the whole sequence
while the layers see sequence-parallel slices. EP splits the experts; the router, with its
score-correction bias, is on every rank. PP gives each stage its layers with their own layer
types (Megatron asks `get_config_for_layer` with global layer numbers) and the last stage the MTP
layers.

HF checkpoint names (MTP after SGLang's mimo_v2_flash_nextn.py / vLLM's mimo_v2_flash_mtp.py):
`model.mtp.layers.<k>.{enorm,hnorm,final_layernorm}.weight`, `.eh_proj.weight` (input
[enorm(embedding of the next token); hnorm(hidden)]), and the block's own
`.input_layernorm.weight`, `.self_attn.{q,k,v,o}_proj.weight`, `.self_attn.attention_sink_bias`,
`.pre_mlp_layernorm.weight`, `.mlp.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from trainer import cpu_compat
from trainer.core_attention import TorchCoreAttention
from trainer.models import common
from trainer.models.architecture import Architecture, Tensor

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class MiMoTransformerConfig(TransformerConfig):
    """TransformerConfig plus MiMo's per-layer-type fields; `get_config_for_layer` specialises it."""

    layer_types: list[str] | None = None
    swa_num_query_groups: int | None = None
    sliding_window: int = 0  # HF meaning: a query sees itself and sliding_window - 1 tokens before it
    rope_theta_by_type: dict[str, float] | None = None
    rotary_percent_by_type: dict[str, float] | None = None
    v_head_dim: int | None = None
    attention_value_scale: float = 1.0
    layer_type: str = FULL  # set on the per-layer copies

    def __post_init__(self) -> None:
        super().__post_init__()
        self.heterogeneous_block_specs = True  # TransformerBlock asks get_config_for_layer per layer

    def for_layer_type(self, layer_type: str) -> MiMoTransformerConfig:
        """A copy carrying the attention settings of one layer type."""
        cfg = copy.copy(self)
        cfg.layer_type = layer_type
        if layer_type == SLIDING:
            cfg.num_query_groups = self.swa_num_query_groups
            cfg.window_size = (self.sliding_window - 1, 0)
            cfg.softmax_type = "learnable"
        else:
            cfg.window_size, cfg.softmax_type = None, "vanilla"
        return cfg

    def get_config_for_layer(self, layer_number: int) -> MiMoTransformerConfig:
        return self.for_layer_type(self.layer_types[layer_number - 1])


class MiMoSelfAttention(SelfAttention):
    """SelfAttention with a value head dim of its own, the value scale, and its layer type's RoPE."""

    def __init__(self, config: MiMoTransformerConfig, submodules: Any, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: str | None = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if config.num_query_groups < self.world_size:
            raise ValueError("MiMoSelfAttention needs num_query_groups >= tensor-parallel size")
        hd, vd = config.kv_channels, config.v_head_dim or config.kv_channels
        self.v_head_dim, self.v_scale = vd, config.attention_value_scale
        if vd != hd:  # SelfAttention sized these with kv_channels for values too: build them again
            self.linear_qkv = submodules.linear_qkv(
                config.hidden_size, config.num_attention_heads * hd + config.num_query_groups * (hd + vd),
                config=config, init_method=config.init_method, gather_output=False,
                bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
                tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp)
            self.linear_proj = build_module(
                submodules.linear_proj, config.num_attention_heads * vd, config.hidden_size, config=config,
                init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
                skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=self.pg_collection.tp)
            self.core_attention = build_module(
                submodules.core_attention, config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type="self", cp_comm_type=cp_comm_type, softmax_scale=config.softmax_scale,
                pg_collection=self.pg_collection, k_channels=hd, v_channels=vd)
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=hd, rotary_percent=config.rotary_percent_by_type[config.layer_type],
            rotary_base=config.rope_theta_by_type[config.layer_type],
            use_cpu_initialization=config.use_cpu_initialization)

    def get_query_key_value_tensors(self, hidden_states: Tensor, key_value_states: Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """[sq, b, h] -> query [sq, b, np, hd], key [sq, b, ng, hd], value [sq, b, ng, vd] (scaled)."""
        if output_gate or not split_qkv:
            raise NotImplementedError("MiMoSelfAttention has no output gate and always splits q/k/v")
        mixed, _ = self.linear_qkv(hidden_states)
        ng = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // ng
        hd = self.hidden_size_per_attention_head
        mixed = mixed.view(*mixed.shape[:-1], ng, per_group * hd + hd + self.v_head_dim)
        query, key, value = torch.split(mixed, [per_group * hd, hd, self.v_head_dim], dim=-1)
        query = query.reshape(*query.shape[:2], -1, hd)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value * self.v_scale

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, key_value_states: Tensor | None = None,
                inference_context: Any = None, rotary_pos_emb: Any = None, **kwargs: Any) -> tuple[Tensor, Any]:
        """Attention with this layer type's RoPE (positions 0..s-1, like GPTModel's own RoPE)."""
        if inference_context is not None or kwargs.get("packed_seq_params") is not None:
            raise NotImplementedError("MiMoSelfAttention supports training/prefill of padded batches only")
        seq_len = hidden_states.shape[0]  # under sequence parallelism: this TP rank's slice of the tokens
        if self.config.sequence_parallel:
            seq_len *= self.world_size
        emb = self.rotary_pos_emb(seq_len)
        return super().forward(hidden_states, attention_mask, key_value_states, None, rotary_pos_emb=emb, **kwargs)


class ShardedSinkAttention(TorchCoreAttention):
    """TorchCoreAttention whose sink logits are this tensor-parallel rank's heads only (the rank runs
    heads [rank * n, (rank + 1) * n) of every layer; TorchCoreAttention sizes the sinks for all heads)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any, attention_type: str,
                 **kwargs: Any) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        tp = config.tensor_model_parallel_size
        if isinstance(self.softmax_offset, torch.nn.Parameter) and tp > 1:
            self.softmax_offset = torch.nn.Parameter(torch.zeros(config.num_attention_heads // tp,
                                                                 dtype=config.params_dtype))


def _mark_sinks_split(model: torch.nn.Module) -> None:
    """Sink logits are per head: TP splits them along with the heads (trainer.parallel cuts and joins
    weights by these attributes; Megatron's attention modules leave them unset)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    heads = model.config.num_attention_heads // model.config.tensor_model_parallel_size
    for name, param in model.named_parameters():
        if name.endswith("softmax_offset"):
            if param.numel() != heads:
                raise ValueError(f"{name}: {param.numel()} sink logits, expected {heads} (this TP rank's heads)")
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)


# ---------------------------------------------------------------------------- config and model
def moe_layers(cfg: Any) -> list[int]:
    return [i for i, t in enumerate(cfg.mlp_layer_types) if t == "sparse"]


def num_experts(cfg: Any) -> int:
    return int(cfg.n_routed_experts)


def _rope(cfg: Any, layer_type: str) -> dict[str, Any]:
    params = (cfg.rope_parameters or {}).get(layer_type) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"hf config rope_parameters[{layer_type!r}].rope_type={params.get('rope_type')!r} is not "
                         "supported; expected 'default'")
    return params


def transformer_kwargs(cfg: Any) -> dict[str, Any]:
    """MiMoTransformerConfig fields from an HF MiMoV2FlashConfig (refuses what would not be exact)."""
    if cfg.hidden_act != "silu":
        raise ValueError(f"hf config hidden_act={cfg.hidden_act!r} is not supported; expected 'silu'")
    if not cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        raise ValueError("hf config norm_topk_prob=False is not supported (Megatron's sigmoid router always "
                         "normalises the top-k weights); expected True")
    groups = {}
    if cfg.n_group > 1:
        if cfg.num_experts_per_tok // cfg.topk_group != 2:
            raise ValueError(f"hf config n_group={cfg.n_group}, topk_group={cfg.topk_group}: HF scores a group by "
                             "its top-2 experts, Megatron by its top-(num_experts_per_tok // topk_group); expected "
                             "num_experts_per_tok // topk_group == 2")
        groups = {"moe_router_num_groups": cfg.n_group, "moe_router_group_topk": cfg.topk_group}
    types = sorted(set(cfg.layer_types))
    kwargs = common.base_transformer_kwargs(cfg)
    sparse = set(moe_layers(cfg))
    kwargs.update(
        qk_layernorm=False,
        num_moe_experts=cfg.n_routed_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_layer_freq=[1 if i in sparse else 0 for i in range(cfg.num_hidden_layers)],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=float(cfg.routed_scaling_factor), moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", moe_grouped_gemm=False, moe_permute_fusion=False,
        moe_router_fusion=False,  # the fused path skips routing replay
        layer_types=list(cfg.layer_types), swa_num_query_groups=2 * cfg.num_key_value_heads,
        sliding_window=int(cfg.sliding_window), v_head_dim=int(cfg.v_head_dim),
        attention_value_scale=1.0 if cfg.attention_value_scale is None else float(cfg.attention_value_scale),
        rope_theta_by_type={t: float(_rope(cfg, t)["rope_theta"]) for t in types},
        rotary_percent_by_type={t: float(_rope(cfg, t).get("partial_rotary_factor", 0.334)) for t in types},
        **groups,
    )
    if not sparse:
        for key in [k for k in kwargs if k.startswith("moe_")] + ["num_moe_experts"]:
            kwargs.pop(key)
    return kwargs


def mtp_layers_in_config(cfg: Any) -> int:
    return int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)


def _mimo_layer_spec(spec: ModuleSpec, torch_attention: bool, sequence_parallel: bool) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    attention.module = MiMoSelfAttention
    if torch_attention:  # no TE: the stock local DotProductAttention has no separate value head dim
        attention.submodules.core_attention = ShardedSinkAttention
        if sequence_parallel:  # TP without TE runs on CPU only (trainer/model_builder.py refuses it on GPU)
            cpu_compat.swap_norms(spec.submodules)
    return spec


def build(config: MiMoTransformerConfig, hf_config: Any, *, use_te: bool, mtp_num_layers: int | None) -> GPTModel:
    """This pipeline stage's GPTModel with MiMo layers (the embedding on the first stage, the head on the
    last); `model.mtp` holds the MTP layers (not run by GPTModel.forward), on the last stage as in
    Megatron (`get_mtp_num_layers_to_build`)."""
    sp = bool(config.sequence_parallel)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    block.layer_specs = [_mimo_layer_spec(s, not use_te, sp) for s in block.layer_specs]
    if not use_te and sp:
        cpu_compat.swap_norms(block)
    model = GPTModel(config=config, transformer_layer_spec=block, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), vocab_size=hf_config.vocab_size,
                     max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="none",
                     share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)))
    n_mtp = mtp_layers_in_config(hf_config) if mtp_num_layers is None else mtp_num_layers
    if n_mtp > 0 and ps.is_pipeline_last_stage():
        mtp_config = copy.copy(config.for_layer_type(SLIDING))
        mtp_config.mtp_num_layers = n_mtp
        dense = (get_gpt_layer_with_transformer_engine_spec() if use_te
                 else get_gpt_layer_local_spec(normalization="RMSNorm"))
        mtp_spec = get_gpt_mtp_block_spec(mtp_config, _mimo_layer_spec(dense, not use_te, sp), use_te)
        if not use_te and sp:
            for layer_spec in mtp_spec.layer_specs:
                cpu_compat.swap_norms(layer_spec.submodules)
        model.mtp = MultiTokenPredictionBlock(config=mtp_config, spec=mtp_spec)
    _mark_sinks_split(model)
    from megatron.core.transformer.moe.router import TopKRouter

    for module in model.modules():  # HF keeps the router weight in fp32 (bf16 training included)
        if isinstance(module, TopKRouter):
            module.weight.data = module.weight.data.float()
    return model


def num_mtp_layers(model: torch.nn.Module) -> int:
    mtp = getattr(model, "mtp", None)
    return len(mtp.layers) if mtp is not None else 0


# ---------------------------------------------------------------------------- weight maps
def _qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv: int) -> Tensor:
    """Per KV group: its query heads, its key head, its value head (value rows may be shorter)."""
    hidden = q.shape[1]
    parts = [t.reshape(num_kv, -1, hidden) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def _qkv_from_megatron(qkv: Tensor, num_heads: int, num_kv: int, hd: int, vd: int) -> tuple[Tensor, Tensor, Tensor]:
    hidden = qkv.shape[1]
    per_group = qkv.view(num_kv, -1, hidden)
    q, k, v = torch.split(per_group, [num_heads // num_kv * hd, hd, vd], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _num_kv(cfg: Any, layer_type: str) -> int:
    return cfg.num_key_value_heads * (2 if layer_type == SLIDING else 1)


def _attention_to_megatron(hf: dict[str, Tensor], p: str, m: str, cfg: Any, layer_type: str) -> dict[str, Tensor]:
    out = {
        m + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
        m + "self_attention.linear_qkv.weight": _qkv_to_megatron(
            hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"],
            cfg.num_attention_heads, _num_kv(cfg, layer_type)),
        m + "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
    }
    if layer_type == SLIDING:
        out[m + "self_attention.core_attention.softmax_offset"] = hf[p + "self_attn.attention_sink_bias"]
    return out


def _attention_to_hf(meg: dict[str, Tensor], p: str, m: str, cfg: Any, layer_type: str) -> dict[str, Tensor]:
    q, k, v = _qkv_from_megatron(meg[m + "self_attention.linear_qkv.weight"], cfg.num_attention_heads,
                                 _num_kv(cfg, layer_type), cfg.head_dim, cfg.v_head_dim)
    out = {p + "input_layernorm.weight": meg[m + "input_layernorm.weight"],
           p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
           p + "self_attn.o_proj.weight": meg[m + "self_attention.linear_proj.weight"]}
    if layer_type == SLIDING:
        out[p + "self_attn.attention_sink_bias"] = meg[m + "self_attention.core_attention.softmax_offset"]
    return out


def _dense_to_megatron(hf: dict[str, Tensor], p: str, m: str) -> dict[str, Tensor]:
    return {m + "linear_fc1.weight": common.swiglu_to_megatron(hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]),
            m + "linear_fc2.weight": hf[p + "down_proj.weight"]}


def _dense_to_hf(meg: dict[str, Tensor], p: str, m: str) -> dict[str, Tensor]:
    gate, up = common.swiglu_from_megatron(meg[m + "linear_fc1.weight"])
    return {p + "gate_proj.weight": gate, p + "up_proj.weight": up, p + "down_proj.weight": meg[m + "linear_fc2.weight"]}


def _moe_to_megatron(hf: dict[str, Tensor], p: str, m: str, cfg: Any) -> dict[str, Tensor]:
    out = {m + "router.weight": hf[p + "gate.weight"], m + "router.expert_bias": hf[p + "gate.e_score_correction_bias"]}
    for e in range(cfg.n_routed_experts):
        out.update(_dense_to_megatron(hf, f"{p}experts.{e}.", f"{m}experts.local_experts.{e}."))
    return out


def _moe_to_hf(meg: dict[str, Tensor], p: str, m: str, cfg: Any) -> dict[str, Tensor]:
    out = {p + "gate.weight": meg[m + "router.weight"], p + "gate.e_score_correction_bias": meg[m + "router.expert_bias"]}
    for e in range(cfg.n_routed_experts):
        out.update(_dense_to_hf(meg, f"{p}experts.{e}.", f"{m}experts.local_experts.{e}."))
    return out


_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")


def _count_layers(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def hf_to_megatron(hf: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Main model, then every `model.mtp.layers.<k>` the checkpoint holds (the builder drops them
    when the model was built without MTP layers)."""
    out = common.embeddings_to_megatron(hf, cfg)
    for i, layer_type in enumerate(cfg.layer_types):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update(_attention_to_megatron(hf, p, m, cfg, layer_type))
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if cfg.mlp_layer_types[i] == "sparse":
            out.update(_moe_to_megatron(hf, p + "mlp.", m + "mlp.", cfg))
        else:
            out.update(_dense_to_megatron(hf, p + "mlp.", m + "mlp."))
    for k in range(_count_layers(hf, "model.mtp.layers.")):
        p, m = f"model.mtp.layers.{k}.", f"mtp.layers.{k}."
        out.update({m + name: hf[p + name] for name in _MTP_OWN})
        t = m + "transformer_layer."
        out.update(_attention_to_megatron(hf, p, t, cfg, SLIDING))
        out[t + "pre_mlp_layernorm.weight"] = hf[p + "pre_mlp_layernorm.weight"]
        out.update(_dense_to_megatron(hf, p + "mlp.", t + "mlp."))
    return out


def megatron_to_hf(meg: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    out = common.embeddings_to_hf(meg, cfg)
    for i, layer_type in enumerate(cfg.layer_types):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update(_attention_to_hf(meg, p, m, cfg, layer_type))
        out[p + "post_attention_layernorm.weight"] = meg[m + "pre_mlp_layernorm.weight"]
        if cfg.mlp_layer_types[i] == "sparse":
            out.update(_moe_to_hf(meg, p + "mlp.", m + "mlp.", cfg))
        else:
            out.update(_dense_to_hf(meg, p + "mlp.", m + "mlp."))
    for k in range(_count_layers(meg, "mtp.layers.")):
        p, m = f"model.mtp.layers.{k}.", f"mtp.layers.{k}."
        out.update({p + name: meg[m + name] for name in _MTP_OWN})
        t = m + "transformer_layer."
        out.update(_attention_to_hf(meg, p, t, cfg, SLIDING))
        out[p + "pre_mlp_layernorm.weight"] = meg[t + "pre_mlp_layernorm.weight"]
        out.update(_dense_to_hf(meg, p + "mlp.", t + "mlp."))
    return out


ARCHITECTURE = Architecture(
    model_type="mimo_v2_flash",
    transformer_kwargs=transformer_kwargs,
    moe_layers=moe_layers,
    hf_to_megatron=hf_to_megatron,
    megatron_to_hf=megatron_to_hf,
    num_experts=num_experts,
    config_class=MiMoTransformerConfig,
    build=build,
)
