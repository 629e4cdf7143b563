"""MiMo-V2-Flash under tensor, pipeline and expert parallelism (gloo ranks on CPU) against the single-rank
run: logprobs, loss, gradient norm, every gathered gradient and the weights after one step; R3 replay of the
rollout's routing on every MoE layer; the HF export (gather_state and GatheredBuckets) bit for bit.

The tiny MiMo here has 2 KV heads (4 in its sliding-window layers) so that TP=2 splits both kinds of
attention; its 4 layers are full+dense, sliding+MoE, sliding+MoE, full+MoE, so each of two pipeline stages
holds both attention kinds and the last one also the MTP layers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state as ps

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from tests.trainer.conftest import make_samples
from tests.trainer.test_parallel import _cfg, _with_top_k
from trainer import hf_io, parallel
from trainer.config import TrainerConfig
from trainer.group import split_by_tokens
from trainer.rank import TrainerRank

ADV = AdvantageConfig(alpha=0.5)
METRICS = ("train/loss", "train/grad_norm", "train/entropy", "train/is_mask_frac", "train/kl_rollout")
MOE_LAYERS, NUM_LAYERS, EXPERTS, TOP_K = (1, 2, 3), 4, 4, 2


@pytest.fixture(scope="module")
def mimo_kv2_path(tmp_path_factory, tokenizer) -> str:
    """The tiny test MiMo (mopd.toy.models) with num_key_value_heads=2, saved with its 2 MTP blocks."""
    from safetensors.torch import load_file, save_file
    from transformers import MiMoV2FlashForCausalLM

    from mopd.toy.models import MIMO_MTP_LAYERS, mimo_mtp_tensors, padded_vocab_size, tiny_mimo_config

    cfg = tiny_mimo_config(padded_vocab_size(tokenizer), tokenizer=tokenizer, sliding_window=5)
    cfg.num_key_value_heads = 2
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero sinks and score-correction bias, so that both matter
        for layer in model.model.layers:
            if layer.self_attn.sinks is not None:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=gen))
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    path = Path(tmp_path_factory.mktemp("mimo_kv2"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    state.update(mimo_mtp_tensors(cfg, MIMO_MTP_LAYERS, gen))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def _with_routing(samples, seed: int = 0):
    """Rollout routing as SGLang returns it ([T-1, layers, top_k]; garbage in the dense layer 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        arr = np.full((len(s.tokens) - 1, NUM_LAYERS, TOP_K), 77, dtype=np.int32)
        for layer in MOE_LAYERS:
            arr[:, layer] = [rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(len(s.tokens) - 1)]
        out.append(dataclasses.replace(s, routed_experts=arr))
    return out


def _check_replayed_routing(trainer: TrainerRank, samples) -> int:
    """Every router of this rank's stage chose the rollout's experts, token for token (routers run in layer
    order within each microbatch; under sequence parallelism each sees its TP rank's slice). Returns the
    number of tokens checked."""
    from megatron.core.transformer.moe.router import TopKRouter

    maps: list[torch.Tensor] = []
    routers = [m for m in trainer.model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == len(trainer.moe_layers)
    handles = [r.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().clone())) for r in routers]
    try:
        trainer.compute_logprobs(samples)
    finally:
        for h in handles:
            h.remove()
    mbs, shapes = trainer._schedule(samples)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    checked = 0
    for m, (mb, (seq_len, batch)) in enumerate(zip(mbs, shapes)):
        local = seq_len // tp
        start = tp_rank * local
        for r, layer in enumerate(trainer.moe_layers):
            routing = maps[m * len(routers) + r].view(local, batch, -1)
            for b, i in enumerate(mb.indices):
                s = samples[i]
                n = min(len(s.tokens) - 1, start + local) - start
                if n <= 0:
                    continue
                rows = torch.from_numpy(s.routed_experts[start:start + n, layer]).long()
                want = torch.zeros_like(routing[:n, b]).scatter_(1, rows, True)
                assert torch.equal(routing[:n, b], want), f"sample {i}, layer {layer}: replay differs from the rollout"
                checked += n
    return checked


def _worker(rank: int, world: int, port: int, model_path: str, cfg: TrainerConfig, adv: AdvantageConfig,
            temperature: float, samples, out_dir: str) -> None:
    from trainer.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=cfg.tp_size, pp=cfg.pp_size, ep=cfg.ep_size)
    try:
        trainer = TrainerRank(model_path, cfg, adv, num_steps=2, rollout_temperature=temperature)
        exported = {k: v.clone() for k, v in trainer.hf_state().items()}  # replicated weights are views
        buckets = {}
        for bucket in trainer.hf_buckets(1 << 14, keep=rank == 0):
            buckets.update((name, t.clone()) for name, t in bucket)
            del bucket
        shard = split_by_tokens(samples, cfg.dp_size)[trainer.dp_rank]
        mine = [samples[i] for i in shard]
        checked = _check_replayed_routing(trainer, mine) if samples[0].routed_experts is not None else 0
        lps = dict(zip(shard, trainer.compute_logprobs(mine)))
        metrics = trainer.train_step(mine, len(samples))
        grads = parallel.gather_state(trainer.model, {n: p.grad for n, p in trainer.model.named_parameters()})
        hf = trainer.hf_state()
        result = {"lps": lps, "checked": checked}
        if rank == 0:
            result.update(metrics=metrics, hf=hf, grads=grads, exported=exported, buckets=buckets)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown_distributed()


def _compare(model_path: str, cfg: TrainerConfig, samples, tmp_path, *, adv: AdvantageConfig = ADV,
             temperature: float = 1.0) -> None:
    from trainer.dist import free_port

    mp.spawn(_worker, args=(cfg.world_size, free_port(), model_path, cfg, adv, temperature, samples, str(tmp_path)),
             nprocs=cfg.world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(cfg.world_size)]
    lps = {i: lp for res in results for i, lp in res["lps"].items()}
    rank0 = results[0]
    if samples[0].routed_experts is not None:  # every rank checked the routers of its stage
        assert all(res["checked"] > 0 for res in results)
    original = hf_io.load_hf_state(model_path)  # the export before any step is the checkpoint, bit for bit
    for name in ("exported", "buckets"):
        assert set(rank0[name]) == set(original), name
        differ = [k for k, v in original.items() if not torch.equal(rank0[name][k], v)]
        assert not differ, f"{name}: {differ[:6]}"

    single = TrainerRank(model_path, dataclasses.replace(cfg, dp_size=1, tp_size=1, pp_size=1, ep_size=1), adv,
                         num_steps=2, rollout_temperature=temperature)
    ref_lps = single.compute_logprobs(samples)
    ref = single.train_step(samples, len(samples))
    lp_err = max(float(np.abs(lps[i] - ref_lp).max()) for i, ref_lp in enumerate(ref_lps))
    assert all(lps[i].shape == ref_lp.shape for i, ref_lp in enumerate(ref_lps))
    metrics = METRICS + (("train/mtp_loss",) if cfg.mtp_loss_coef > 0 else ())
    for key in metrics:
        assert rank0["metrics"][key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    ref_grads = dict(single.model.named_parameters())
    assert set(rank0["grads"]) == set(ref_grads)
    grad_err = max(((rank0["grads"][k] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                   for k, p in ref_grads.items())
    ref_hf = single.hf_state()
    assert set(rank0["hf"]) == set(ref_hf)
    weight_err = max((rank0["hf"][k] - ref_hf[k]).abs().max().item() for k in ref_hf)
    print(f"mimo tp={cfg.tp_size} pp={cfg.pp_size} ep={cfg.ep_size} dp={cfg.dp_size} mtp={cfg.mtp_loss_coef}: "
          f"max |logprob diff| {lp_err:.1e}, loss rel diff "
          f"{abs(rank0['metrics']['train/loss'] - ref['train/loss']) / abs(ref['train/loss']):.1e}, grad norm rel "
          f"diff {abs(rank0['metrics']['train/grad_norm'] - ref['train/grad_norm']) / ref['train/grad_norm']:.1e}, "
          f"max gradient error (relative to the tensor's largest) {grad_err:.1e}, max |weight diff| after one "
          f"AdamW step {weight_err:.1e}")
    assert lp_err < 1e-5
    assert grad_err < 1e-5
    assert weight_err < 1e-4  # AdamW's first step turns rounding of tiny gradients into up to ~1e-5 of weight


def test_tp2_mimo_equals_single_rank(mimo_kv2_path, dist_env, tmp_path):
    """Both attention kinds split by heads (sinks included), experts by expert TP, the MoE with R3, the MTP
    loss on vocabulary slices, and the MOPD top-k loss at a rollout temperature != 1."""
    samples = _with_top_k(_with_routing(make_samples(5, seed=51)))
    _compare(mimo_kv2_path, _cfg(tp_size=2, mtp_loss_coef=0.3), samples, tmp_path, adv=AdvantageConfig(alpha=0.5, teacher_top_k=3),
             temperature=0.8)


def test_pp2_mimo_equals_single_rank(mimo_kv2_path, dist_env, tmp_path):
    """Layers 0-1 (full, sliding) on the first stage, 2-3 (sliding, full) and the MTP layers on the last
    (the token embeddings they read come from the first); R3 replays global MoE layer 1 on the first stage
    and 2, 3 on the last."""
    _compare(mimo_kv2_path, _cfg(pp_size=2, mtp_loss_coef=0.3), _with_routing(make_samples(4, seed=52)), tmp_path)


def test_ep2_mimo_with_mtp_loss_equals_single_rank(mimo_kv2_path, dist_env, tmp_path):
    """Experts (and their share of every router's score-correction bias use) over two data-parallel ranks,
    R3 on every MoE layer, and the MTP loss training the MTP layers on each rank's samples."""
    _compare(mimo_kv2_path, _cfg(dp_size=2, ep_size=2, mtp_loss_coef=0.3), _with_routing(make_samples(6, seed=53)),
             tmp_path)


@pytest.mark.slow
def test_tp2_pp2_mimo_four_ranks_equal_single_rank(mimo_kv2_path, dist_env, tmp_path):
    """TP inside each of two pipeline stages (sequence-parallel activations on the wire), R3, top-k loss."""
    samples = _with_top_k(_with_routing(make_samples(5, seed=54)))
    _compare(mimo_kv2_path, _cfg(tp_size=2, pp_size=2, mtp_loss_coef=0.3), samples, tmp_path,
             adv=AdvantageConfig(alpha=0.5, teacher_top_k=3), temperature=0.9)


@pytest.mark.slow
def test_dp2_tp2_ep2_mimo_four_ranks_equal_single_rank(mimo_kv2_path, dist_env, tmp_path):
    """Two data-parallel TP groups, experts split over them: EP and TP at once, R3 on every MoE layer."""
    _compare(mimo_kv2_path, _cfg(dp_size=2, tp_size=2, ep_size=2), _with_routing(make_samples(6, seed=55)),
             tmp_path)


@pytest.mark.slow
def test_dp2_pp2_ep2_mimo_four_ranks_equal_single_rank(mimo_kv2_path, dist_env, tmp_path):
    """EP across two pipelines: the ranks get one and two microbatches, so idle passes run through the stages
    (forward and backward); the MTP loss on the last stage reads embeddings sent by the first."""
    _compare(mimo_kv2_path, _cfg(dp_size=2, pp_size=2, ep_size=2, max_tokens_per_microbatch=24, mtp_loss_coef=0.3),
             _with_routing(make_samples(3, seed=56)), tmp_path)


@pytest.mark.parametrize("sizes, expected", [
    ({"tp_size": 4}, "trainer.tp_size`: expected a divisor of the model's num_key_value_heads=2"),
    ({"tp_size": 8}, "trainer.tp_size`: expected a divisor of the model's num_attention_heads=4"),
    ({"pp_size": 3}, "trainer.pp_size`: expected a divisor of the model's num_hidden_layers=4"),
    ({"dp_size": 8, "ep_size": 8}, "trainer.ep_size`: expected a divisor of the model's number of experts=4"),
])
def test_mimo_layout_checks(mimo_kv2_path, sizes, expected):
    """What TrainerGroup checks before any rank starts (and TrainerRank again)."""
    from trainer.model_builder import load_hf_config

    cfg = TrainerConfig(**sizes)
    cfg.validate()
    hf_config = load_hf_config(mimo_kv2_path)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        cfg.check_model(hf_config)
    TrainerConfig(dp_size=4, ep_size=4, tp_size=2, pp_size=2).check_model(hf_config)  # a valid one


@pytest.mark.slow
def test_mimo_checkpoint_saved_at_tp2_resumes_on_one_rank(mimo_kv2_path, dist_env, tmp_path):
    """Saved at TP=2 (sink logits, attention heads and the MTP layers split), resumed by one rank: the next step
    is the same (1e-6: it reads the weights); the one after reads the AdamW moments and the schedule too, but
    also the update of the step before, which the saved run summed at TP=2 and the resumed one at TP=1: 1e-5
    (measured 1.0e-6; with the moments cleared after loading, 0.31)."""
    from tests.trainer.test_parallel import _save_worker
    from trainer.checkpoint import load_trainer_state
    from trainer.dist import free_port

    cfg = _cfg(tp_size=2, mtp_loss_coef=0.3)
    batches = [make_samples(4, seed=61), make_samples(4, seed=62), make_samples(4, seed=63)]
    mp.spawn(_save_worker, args=(cfg.world_size, free_port(), mimo_kv2_path, cfg, batches, str(tmp_path)),
             nprocs=cfg.world_size, join=True)
    saved = torch.load(tmp_path / "metrics.pt", weights_only=False)
    one = TrainerRank(mimo_kv2_path, dataclasses.replace(cfg, tp_size=1), ADV, num_steps=4)
    load_trainer_state(tmp_path / "ckpt", one, 0)
    for step in (1, 2):
        resumed = one.train_step(batches[step], len(batches[step]))
        diff = abs(resumed["train/loss"] - saved[step]["train/loss"])
        print(f"MiMo resharded resume TP=2 -> 1 rank, step {step + 1}: |loss diff| = {diff:.1e}, "
              f"mtp loss {resumed['train/mtp_loss']:.4f} vs {saved[step]['train/mtp_loss']:.4f}")
        assert diff < (1e-6 if step == 1 else 1e-5)
        assert resumed["train/mtp_loss"] == pytest.approx(saved[step]["train/mtp_loss"], rel=1e-5)
        assert resumed["train/grad_norm"] == pytest.approx(saved[step]["train/grad_norm"], rel=1e-5)
