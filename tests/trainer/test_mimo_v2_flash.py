"""MiMo-V2-Flash in the Megatron trainer: exact conversion (main model and MTP), R3 on its MoE
layers, a CPU training step, and the MTP loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from megatron.core.transformer.moe.router import TopKRouter
from transformers import AutoModelForCausalLM

from mopd.core.algo import AdvantageConfig
from tests.trainer.conftest import MIMO_MTP_LAYERS, make_samples
from trainer import hf_io, routing_replay
from trainer import model_builder as mb
from trainer.config import TrainerConfig
from trainer.rank import TrainerRank

SEQ = 23  # longer than the sliding window (5)


def _load(path: str, **kwargs):
    cfg = mb.load_hf_config(path)
    model, arch = mb.build_model(cfg, device="cpu", **kwargs)
    mb.hf_to_model(model, arch, cfg, hf_io.load_hf_state(path))
    return model.eval(), arch, cfg


def _ids(cfg, batch: int = 3, seq: int = SEQ, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(seq).expand(batch, seq)


def test_logits_match_hf(mimo_path, dist_env):
    model, _, cfg = _load(mimo_path)
    assert cfg.sliding_window < SEQ and "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    hf = AutoModelForCausalLM.from_pretrained(mimo_path, dtype=torch.float32).eval()
    sinks = [layer.self_attn.sinks for layer in hf.model.layers if layer.self_attn.sinks is not None]
    assert sinks and all(s.abs().min() > 0 for s in sinks)
    ids, pos = _ids(cfg)
    with torch.no_grad():
        ours, ref = model(ids, pos, None), hf(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"mimo_v2_flash: max |logits diff| = {diff:.3e} (logits up to {ref.abs().max().item():.2f})")
    assert ours.shape == ref.shape and diff < 1e-4
    # the sinks, the window and the score-correction bias all matter at this size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("softmax_offset"):
                param.zero_()
        assert (model(ids, pos, None) - ref).abs().max() > 1e-3
    model, _, _ = _load(mimo_path)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "window", None) is not None:
                module.window = None
        assert (model(ids, pos, None) - ref).abs().max() > 1e-3


def test_round_trip_exact_with_mtp(mimo_path, dist_env):
    state = hf_io.load_hf_state(mimo_path)
    model, arch, cfg = _load(mimo_path)
    assert len(model.mtp.layers) == MIMO_MTP_LAYERS  # from config.json's num_nextn_predict_layers
    back = mb.model_to_hf(model, arch, cfg)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    for key in ("model.mtp.layers.1.eh_proj.weight", "model.mtp.layers.0.self_attn.attention_sink_bias",
                "model.layers.2.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.attention_sink_bias",
                "model.layers.3.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        assert key in back


def test_mtp_num_layers_setting(mimo_path, dist_env):
    model, arch, cfg = _load(mimo_path, mtp_num_layers=0)  # checkpoint's MTP weights unused, as in transformers
    assert getattr(model, "mtp", None) is None
    assert not any(k.startswith("model.mtp.") for k in mb.model_to_hf(model, arch, cfg))
    model, _, _ = _load(mimo_path, mtp_num_layers=1)
    assert len(model.mtp.layers) == 1
    with pytest.raises(ValueError, match="mtp.layers.2"):
        _load(mimo_path, mtp_num_layers=3)


def test_router_scoring_matches_hf(mimo_path, dist_env):
    """Sigmoid + correction bias + top-k renormalisation + routed scaling: same experts, same weights."""
    model, _, cfg = _load(mimo_path)
    hf = AutoModelForCausalLM.from_pretrained(mimo_path, dtype=torch.float32).eval()
    x = torch.randn(50, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    with torch.no_grad():
        probs, routing_map = router(x.unsqueeze(1))
        _, ref_w, ref_idx = hf.model.layers[1].mlp.gate(x)
    ours_idx = torch.nonzero(routing_map)[:, 1].view(-1, cfg.num_experts_per_tok)
    assert torch.equal(ours_idx, ref_idx.sort(dim=-1).values)
    ours_w = probs.gather(1, ours_idx)
    assert torch.allclose(ours_w, ref_w.gather(1, ref_idx.argsort(dim=-1)), atol=1e-6)
    assert ours_w.sum(-1).allclose(torch.full((50,), cfg.routed_scaling_factor))


def _engine(path: str, **kwargs) -> TrainerRank:
    cfg = TrainerConfig(routing_replay=True, lr=1e-3, grad_clip=0.0, **kwargs)
    return TrainerRank(path, cfg, AdvantageConfig(), num_steps=4)


def test_routing_replay_on_moe_layers(mimo_path, dist_env):
    """Record the natural routing, perturb every router, replay: the recorded routing comes back exactly."""
    engine = _engine(mimo_path)
    cfg, model = engine.hf_config, engine.model
    moe = engine.moe_layers
    assert moe == [1, 2, 3]
    samples = make_samples(3, seed=5, vocab=cfg.vocab_size)
    ids = torch.zeros(len(samples), max(len(s.tokens) for s in samples), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s.tokens)] = torch.tensor(s.tokens)
    S, B = ids.shape[1], ids.shape[0]
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad(), routing_replay.recording(model) as recorded:
        model(ids, pos, None)
    assert len(recorded) == len(moe)
    for s in samples:  # SGLang layout [T-1, num_hidden_layers, top_k]; the dense layer 0 holds garbage
        arr = np.full((len(s.tokens) - 1, cfg.num_hidden_layers, cfg.num_experts_per_tok), 3, dtype=np.int32)
        b = samples.index(s)
        for j, layer in enumerate(moe):
            arr[:, layer] = recorded[j].view(S, B, -1)[: len(s.tokens) - 1, b].numpy()
        s.routed_experts = arr
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
            router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(1)))
            router.expert_bias.add_(torch.randn(router.expert_bias.shape, generator=torch.Generator().manual_seed(2)))
        with routing_replay.recording(model) as natural:
            model(ids, pos, None)
    changed = sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum()) for a, b in zip(natural, recorded))
    assert changed > 0  # the perturbation moves natural routing
    replay = engine._replay_data(samples, S)
    with torch.no_grad(), routing_replay.replaying(model, replay):
        seen = []
        handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(out[1].clone()))
                   for m in model.modules() if isinstance(m, TopKRouter)]
        model(ids, pos, None)
        for h in handles:
            h.remove()
    for j, routing_map in enumerate(seen):
        for b, s in enumerate(samples):
            n = len(s.tokens) - 1
            got = torch.nonzero(routing_map.view(S, B, -1)[:n, b])[:, 1].view(n, -1)
            assert torch.equal(got, recorded[j].view(S, B, -1)[:n, b].sort(-1).values), (j, b)


def test_training_step_on_cpu(mimo_path, dist_env):
    engine = _engine(mimo_path)
    samples = make_samples(4, seed=9, vocab=engine.hf_config.vocab_size)
    before = {k: v.clone() for k, v in engine.hf_state().items()}
    lps = engine.compute_logprobs(samples)
    assert all(np.isfinite(lp).all() for lp in lps)
    metrics = engine.train_step(samples, num_global_samples=len(samples))
    assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    after = engine.hf_state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.1.self_attn.attention_sink_bias" in changed
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert not any(k.startswith("model.mtp.") for k in changed)  # mtp_loss_coef = 0: MTP untouched


# ---------------------------------------------------------------------------- MTP
def _hf_mtp_loss(path: str, ids: torch.Tensor) -> float:
    """The MTP loss written against the HF modules: rollout.mtp.MTPHead (the local engine's draft), each
    `model.mtp.layers.<k>` block a dense sliding-window MiMoV2FlashDecoderLayer (names as SGLang maps
    them), fed [enorm(E[t_{i+k}]); hnorm(h)]."""
    from rollout.mtp import MTPHead

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = MTPHead.from_state(hf.config, hf_io.load_hf_state(path))
    assert head is not None and len(head) == MIMO_MTP_LAYERS
    B, S = ids.shape
    kept = {}
    hf.model.norm.register_forward_pre_hook(lambda mod, args: kept.update(h=args[0]))
    pos = torch.arange(S).expand(B, S)
    total = 0.0
    with torch.no_grad():
        hf(ids)
        next_ids = torch.cat([ids[:, 1:], ids[:, :MIMO_MTP_LAYERS]], dim=1)  # [:, j + k] = t_{j+k+1}
        logits = head.chain(hf, kept["h"], next_ids, pos, torch.ones(B, S, dtype=torch.bool))
        for k, lg in enumerate(logits):
            logp = torch.log_softmax(lg, dim=-1)
            n = S - 2 - k
            nll = -logp[:, :n].gather(-1, ids[:, k + 2:k + 2 + n].unsqueeze(-1)).squeeze(-1)
            total += nll.mean(-1).sum().item()
    return total / MIMO_MTP_LAYERS


def test_mtp_layers_match_the_hf_reference(mimo_path, dist_env):
    """Our Megatron MTP block computes what SGLang's MiMo MTP computes from the same checkpoint tensors."""
    from trainer.mtp_loss import MTPLoss

    model, _, cfg = _load(mimo_path)
    ids, pos = _ids(cfg, batch=2, seq=SEQ, seed=4)
    mtp = MTPLoss(model, coef=1.0)
    with torch.no_grad():
        with mtp.capture():
            model(ids, pos, None)
        ours = mtp.loss_sum(ids, torch.ones(ids.shape[0], ids.shape[1] - 1)).item()
    ref = _hf_mtp_loss(mimo_path, ids)
    print(f"mtp loss: ours {ours:.6f}, HF-module reference {ref:.6f}")
    assert abs(ours - ref) < 1e-4 * max(1.0, abs(ref))


def _mtp_engine(path: str, coef: float) -> TrainerRank:
    cfg = TrainerConfig(routing_replay=True, lr=1e-2, grad_clip=0.0, mtp_loss_coef=coef)
    return TrainerRank(path, cfg, AdvantageConfig(), num_steps=8)


def test_mtp_loss_falls_and_leaves_the_policy_alone(mimo_path, dist_env, tmp_path, tokenizer):
    from tests.trainer.conftest import create_tiny_mimo

    samples = make_samples(4, seed=21, vocab=100, min_len=6, max_len=14)
    with_mtp = _mtp_engine(mimo_path, 0.5)
    first = [with_mtp.train_step(samples, len(samples)) for _ in range(6)]
    mtp = [m["train/mtp_loss"] for m in first]
    print("mtp loss over 6 steps on a fixed batch:", [round(x, 4) for x in mtp])
    assert all(b < a for a, b in itertools.pairwise(mtp)) and mtp[-1] < 0.8 * mtp[0]
    # coef = 0, and a checkpoint without MTP weights: the same main loss, metrics and policy weights
    off = _mtp_engine(mimo_path, 0.0)
    plain = _mtp_engine(str(create_tiny_mimo(tmp_path / "plain", tokenizer, mtp_layers=0)), 0.0)
    assert not off.mtp.active and getattr(plain.model, "mtp", None) is None
    for step in range(6):
        a, b = off.train_step(samples, len(samples)), plain.train_step(samples, len(samples))
        assert "train/mtp_loss" not in a and a == b
        assert a["train/loss"] == first[step]["train/loss"]  # the MTP loss never reaches the policy
    policy = plain.hf_state()
    for engine in (off, with_mtp):
        state = engine.hf_state()
        for key, value in policy.items():
            assert torch.equal(state[key], value), key
    original = hf_io.load_hf_state(mimo_path)
    assert all(torch.equal(off.hf_state()[k], original[k]) for k in original if k.startswith("model.mtp."))
    assert not torch.equal(with_mtp.hf_state()["model.mtp.layers.1.eh_proj.weight"],
                           original["model.mtp.layers.1.eh_proj.weight"])


def test_export_after_mtp_training_loads_back(mimo_path, dist_env, tmp_path):
    """Trainer export (checkpoint.export_hf) keeps the trained MTP blocks: the trainer reloads it bit for
    bit, transformers loads it (ignoring model.mtp.*) with the trainer's logits, and a config.json
    without num_nextn_predict_layers still gets its MTP blocks counted from the weights."""
    import json

    from trainer.checkpoint import export_hf

    engine = _mtp_engine(mimo_path, 0.5)
    samples = make_samples(3, seed=4, vocab=100)
    engine.train_step(samples, len(samples))
    trained = engine.hf_state()
    out = export_hf(tmp_path / "hf", trained, mimo_path)
    config = json.loads((out / "config.json").read_text())
    del config["num_nextn_predict_layers"]
    (out / "config.json").write_text(json.dumps(config))
    model, arch, cfg = _load(str(out))
    assert len(model.mtp.layers) == MIMO_MTP_LAYERS
    back = mb.model_to_hf(model, arch, cfg)
    assert set(back) == set(trained) and all(torch.equal(back[k], trained[k]) for k in trained)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, pos = _ids(cfg, batch=2, seed=6)
    with torch.no_grad():
        assert (model(ids, pos, None) - hf(ids).logits).abs().max() < 1e-4
