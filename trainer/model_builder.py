"""Build a Megatron-core GPTModel from an HF config and load HF weights into it.

The same code builds the CPU dry-run model and the GPU model; only `cpu_compat` differs, and it
is applied only when the model lives on the CPU. On GPU the Transformer Engine specs are used
when TE is installed, else Megatron's local specs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from transformers import AutoConfig

from trainer import cpu_compat, parallel
from trainer.models import Architecture, get_architecture

# local-spec name -> TE-spec name (TE fuses the pre-attention/pre-MLP norms into the next linear)
TE_ALIASES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except ImportError:
        return False


def load_hf_config(model_path: str) -> Any:
    """The HF config; MTP blocks present in the checkpoint but not counted in config.json
    (`num_nextn_predict_layers`, which transformers does not define) are counted from the weights,
    so the trainer keeps them through training and export."""
    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "model_type", None) == "mimo_v2_flash" and getattr(config, "num_nextn_predict_layers",
                                                                          None) is None:
        from trainer.hf_io import tensor_names

        found = {int(n.split(".")[3]) for n in tensor_names(model_path) if n.startswith("model.mtp.layers.")}
        config.num_nextn_predict_layers = max(found) + 1 if found else 0
    return config


def build_model(hf_config: Any, *, device: str = "auto", dtype: str = "float32",
                routing_replay: bool = False, activation_recompute: bool = False,
                mtp_num_layers: int | None = None) -> tuple[GPTModel, Architecture]:
    """A GPTModel with randomly initialised weights; call `load_megatron_state` to fill it.

    `mtp_num_layers` applies to architectures with MTP layers (MiMo-V2-Flash): None takes the
    HF config's `num_nextn_predict_layers` (0 if absent), 0 builds none.
    Requires `megatron.core.parallel_state` to be initialised (see trainer.dist).
    """
    arch = get_architecture(hf_config.model_type)
    on_cpu = cpu_compat.needs_cpu_compat(device)
    kwargs = arch.transformer_kwargs(hf_config)
    is_moe = bool(arch.moe_layers(hf_config))
    if is_moe:
        kwargs["moe_enable_routing_replay"] = routing_replay
    if on_cpu:
        kwargs.update(cpu_compat.transformer_config_overrides(is_moe))
    elif is_moe:
        kwargs["moe_token_dispatcher_type"] = "alltoall"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    kwargs.update(params_dtype=torch_dtype, bf16=torch_dtype == torch.bfloat16, pipeline_dtype=torch_dtype)
    if activation_recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(parallel.config_sizes())
    # sequence parallelism with TP (Megatron requires it for MoE; norms and dropout see 1/tp of the tokens)
    kwargs["sequence_parallel"] = kwargs["tensor_model_parallel_size"] > 1
    config = arch.config_class(**kwargs)
    use_te = not on_cpu and _have_te()
    if not on_cpu and not use_te and config.sequence_parallel:
        raise ValueError("trainer.tp_size > 1 on GPU needs Transformer Engine: Megatron's local-spec norms refuse "
                         "the sequence parallelism that TP runs with (on CPU trainer.cpu_compat supplies its own)")
    with cpu_compat.cuda_device_is_cpu() if on_cpu else contextlib.nullcontext():
        if arch.build is not None:
            model = arch.build(config, hf_config, use_te=use_te, mtp_num_layers=mtp_num_layers)
        else:
            block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
            if on_cpu:
                cpu_compat.patch_block_spec(block_spec)
            from trainer.models.common import gpt_model_kwargs

            model = GPTModel(config=config, transformer_layer_spec=block_spec,  # stages: embedding first, head last
                             pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                             **gpt_model_kwargs(hf_config))
    if on_cpu:
        cpu_compat.patch_model(model)
    else:
        model = model.cuda()
    return model, arch


def align_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename local-spec keys to the model's actual names (TE specs fuse norms into linears)."""
    model_keys = set(model.state_dict().keys())
    out = {}
    for key, value in state.items():
        if key not in model_keys:
            for local, te in TE_ALIASES.items():
                if key.endswith(local) and key[: -len(local)] + te in model_keys:
                    key = key[: -len(local)] + te
                    break
        out[key] = value
    return out


def canonical_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under local-spec names (TE extra state dropped); under TP/EP the full
    weights gathered from every rank (a collective then: all ranks call it)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if parallel.model_parallel():
        state = parallel.gather_state(model, state)
    out = {}
    for key, value in state.items():
        for local, te in TE_ALIASES.items():
            if key.endswith(te):
                key = key[: -len(te)] + local
                break
        out[key] = value
    return out


def load_megatron_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy converted weights into the model; every weight must be covered, shapes must match."""
    state = align_to_model(state, model)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"converted state does not match the Megatron model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"weight {key}: converted shape {tuple(value.shape)}, model expects "
                             f"{tuple(own[key].shape)}")
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(state[key].to(dtype=param.dtype, device=param.device))


def hf_to_model(model: torch.nn.Module, arch: Architecture, hf_config: Any,
                hf_state: dict[str, torch.Tensor]) -> None:
    try:
        converted = arch.hf_to_megatron(hf_state, hf_config)
    except KeyError as err:
        raise ValueError(f"HF checkpoint has no tensor {err.args[0]!r}, which a {arch.model_type} model with "
                         "this config needs") from None
    mtp = getattr(model, "mtp", None)  # checkpoint MTP layers beyond the model's are unused (transformers: all)
    built = len(mtp.layers) if mtp is not None else 0
    converted = {k: v for k, v in converted.items()
                 if not k.startswith("mtp.layers.") or int(k.split(".")[2]) < built}
    if parallel.model_parallel():  # this rank's shard of every weight
        converted = parallel.shard_state(align_to_model(converted, model), model)
    load_megatron_state(model, converted)


def model_to_hf(model: torch.nn.Module, arch: Architecture, hf_config: Any) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in canonical_state(model).items()}
    return arch.megatron_to_hf(state, hf_config)
