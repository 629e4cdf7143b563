"""Tensor and expert parallelism on CPU (gloo, two ranks in spawned processes) against the single-rank run:
the same logprobs, loss, gradient norm and weights after one step, and the same HF export."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state as ps

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from tests.trainer.conftest import make_samples
from trainer import parallel
from trainer.config import TrainerConfig
from trainer.group import split_by_tokens
from trainer.rank import TrainerRank

ADV = AdvantageConfig(alpha=0.5)
METRICS = ("train/loss", "train/grad_norm", "train/entropy", "train/is_mask_frac", "train/kl_rollout")


def _cfg(**kw) -> TrainerConfig:
    base = {"lr": 5e-3, "max_tokens_per_microbatch": 48, "grad_clip": 0.05, "device": "cpu"}
    base.update(kw)
    return TrainerConfig(**base)


def _with_top_k(samples, k: int = 3, vocab: int = 100, seed: int = 0):
    """Teacher top-k tokens and logprobs on every response token (the MOPD top-k divergence reads them)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        n = len(s.response_ids)
        ids = np.stack([rng.choice(np.arange(7, vocab), k, replace=False) for _ in range(n)]).astype(np.int64)
        lps = np.sort(-rng.uniform(0.1, 4.0, (n, k)), axis=1)[:, ::-1].astype(np.float32)
        out.append(dataclasses.replace(s, teacher_top_ids=ids.tolist(), teacher_top_logprobs=lps.tolist()))
    return out


def _with_routing(samples, num_layers: int = 2, moe_layer: int = 1, num_experts: int = 4, top_k: int = 2,
                  seed: int = 0):
    """Rollout routing as SGLang returns it ([T-1, layers, top_k], garbage in the dense layer 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        arr = np.full((len(s.tokens) - 1, num_layers, top_k), 77, dtype=np.int32)
        arr[:, moe_layer] = [rng.choice(num_experts, top_k, replace=False) for _ in range(len(s.tokens) - 1)]
        out.append(dataclasses.replace(s, routed_experts=arr))
    return out


def _check_replayed_routing(trainer: TrainerRank, samples) -> None:
    """The experts each router chose are the rollout's, token for token (maps are [S * B, experts] per
    model pass, passes in microbatch order)."""
    from megatron.core.transformer.moe.router import TopKRouter

    maps: list[torch.Tensor] = []
    routers = [m for m in trainer.model.modules() if isinstance(m, TopKRouter)]
    handles = [r.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().clone())) for r in routers]
    try:
        trainer.compute_logprobs(samples)
    finally:
        for h in handles:
            h.remove()
    mbs, shapes = trainer._schedule(samples)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for mb, (seq_len, batch), routing in zip(mbs, shapes, maps):
        local = seq_len // tp  # sequence parallelism: this rank's routers see positions [start, start + local)
        start = tp_rank * local
        for b, i in enumerate(mb.indices):
            s = samples[i]
            n = min(len(s.tokens) - 1, start + local) - start
            if n <= 0:
                continue
            got = routing.view(local, batch, -1)[:n, b]
            rows = torch.from_numpy(s.routed_experts[start:start + n, 1]).long()
            want = torch.zeros_like(got).scatter_(1, rows, True)
            assert torch.equal(got, want), f"sample {i}: replayed routing differs from the rollout's"


def _worker(rank: int, world: int, port: int, model_path: str, cfg: TrainerConfig, adv: AdvantageConfig,
            temperature: float, samples, out_dir: str) -> None:
    from trainer.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=cfg.tp_size, pp=cfg.pp_size, ep=cfg.ep_size)
    try:
        trainer = TrainerRank(model_path, cfg, adv, num_steps=2, rollout_temperature=temperature)
        shard = split_by_tokens(samples, cfg.dp_size)[trainer.dp_rank]
        mine = [samples[i] for i in shard]
        if samples[0].routed_experts is not None:
            _check_replayed_routing(trainer, mine)
        lps = dict(zip(shard, trainer.compute_logprobs(mine)))
        metrics = trainer.train_step(mine, len(samples))
        grads = parallel.gather_state(trainer.model, {n: p.grad for n, p in trainer.model.named_parameters()})
        hf = trainer.hf_state()
        torch.save({"lps": lps, "metrics": metrics, "hf": hf, "grads": grads} if rank == 0 else {"lps": lps},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown_distributed()


def _run_parallel(model_path: str, cfg: TrainerConfig, adv: AdvantageConfig, temperature: float, samples,
                  tmp_path) -> tuple[dict, dict]:
    from trainer.dist import free_port

    mp.spawn(_worker, args=(cfg.world_size, free_port(), model_path, cfg, adv, temperature, samples, str(tmp_path)),
             nprocs=cfg.world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(cfg.world_size)]
    lps = {i: lp for res in results for i, lp in res["lps"].items()}
    return lps, results[0]


def _compare(model_path: str, cfg: TrainerConfig, samples, tmp_path, *, adv: AdvantageConfig = ADV,
             temperature: float = 1.0) -> None:
    lps, rank0 = _run_parallel(model_path, cfg, adv, temperature, samples, tmp_path)
    single = TrainerRank(model_path, dataclasses.replace(cfg, dp_size=1, tp_size=1, pp_size=1, ep_size=1), adv, num_steps=2,
                         rollout_temperature=temperature)
    ref_lps = single.compute_logprobs(samples)
    ref = single.train_step(samples, len(samples))
    for i, ref_lp in enumerate(ref_lps):
        assert lps[i].shape == ref_lp.shape and np.abs(lps[i] - ref_lp).max() < 1e-5, i
    for key in METRICS:
        assert rank0["metrics"][key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    ref_grads = dict(single.model.named_parameters())
    assert set(rank0["grads"]) == set(ref_grads)
    grad_err = max(((rank0["grads"][k] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                   for k, p in ref_grads.items())
    ref_hf = single.hf_state()
    assert set(rank0["hf"]) == set(ref_hf)
    weight_err = max((rank0["hf"][k] - ref_hf[k]).abs().max().item() for k in ref_hf)
    print(f"tp={cfg.tp_size} pp={cfg.pp_size} ep={cfg.ep_size} dp={cfg.dp_size}: max gradient error (relative to the tensor's "
          f"largest) {grad_err:.1e}, max |weight diff| after one AdamW step {weight_err:.1e}")
    assert grad_err < 1e-5
    # AdamW's first step moves a weight by about lr * g / (|g| + 1e-8): a gradient element near 1e-8 turns
    # float rounding of the summation order into up to 1e-5 of weight
    assert weight_err < 1e-4


def test_tp2_dense_mopd_top_k_equals_single_rank(dense_path, dist_env, tmp_path):
    """The MOPD loss with the teacher's top-k tokens and a rollout temperature != 1 (both student views)."""
    samples = _with_top_k(make_samples(5, seed=31))
    _compare(dense_path, _cfg(tp_size=2), samples, tmp_path, adv=AdvantageConfig(alpha=0.5, teacher_top_k=3),
             temperature=0.8)


def test_ep2_moe_equals_single_rank(moe_path, dist_env, tmp_path):
    """Experts split over two data-parallel ranks (allgather dispatcher); each rank trains on its own samples."""
    _compare(moe_path, _cfg(dp_size=2, ep_size=2), make_samples(6, seed=32), tmp_path)


def test_r3_replay_at_ep2_equals_rollout_routing(moe_path, dist_env, tmp_path):
    """R3 under EP: every rank replays its samples' global expert ids (checked token for token in the
    workers) and the replayed step equals the single rank replaying the same routing. The ranks get one and
    two microbatches: the first runs an idle pass, forward and backward, to keep the dispatcher in step."""
    samples = _with_routing(make_samples(3, seed=40))
    _compare(moe_path, _cfg(dp_size=2, ep_size=2, max_tokens_per_microbatch=24), samples, tmp_path)


def test_pp2_dense_mopd_top_k_equals_single_rank(dense_path, dist_env, tmp_path):
    """Two pipeline stages (one layer each; embedding on the first, head on the last)."""
    samples = _with_top_k(make_samples(5, seed=38))
    _compare(dense_path, _cfg(pp_size=2), samples, tmp_path, adv=AdvantageConfig(alpha=0.5, teacher_top_k=3),
             temperature=0.8)


def test_r3_replay_at_pp2_equals_rollout_routing(moe_path, dist_env, tmp_path):
    """R3 under PP: the second stage holds the MoE layer (global index 1) and replays its routing."""
    _compare(moe_path, _cfg(pp_size=2), _with_routing(make_samples(4, seed=39)), tmp_path)


def test_tp2_moe_equals_single_rank(moe_path, dist_env, tmp_path):
    _compare(moe_path, _cfg(tp_size=2), make_samples(5, seed=33), tmp_path)


@pytest.mark.parametrize("sizes, expected", [
    ({"ep_size": 2}, "trainer.ep_size`: expected a divisor of trainer.dp_size=1"),
])
def test_layout_checks_without_the_model(sizes, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        TrainerConfig(**sizes).validate()


@pytest.mark.parametrize("model, sizes, expected", [
    ("dense", {"tp_size": 3}, "trainer.tp_size`: expected a divisor of the model's num_attention_heads=4"),
    ("dense", {"tp_size": 4}, "trainer.tp_size`: expected a divisor of the model's num_key_value_heads=2"),
    ("dense", {"pp_size": 3}, "trainer.pp_size`: expected a divisor of the model's num_hidden_layers=2"),
    ("dense", {"dp_size": 2, "ep_size": 2}, "trainer.ep_size`: expected 1: the model (qwen3) has no routed experts"),
    ("moe", {"dp_size": 8, "ep_size": 8}, "trainer.ep_size`: expected a divisor of the model's number of experts=4"),
])
def test_layout_checks_against_the_model(dense_path, moe_path, model, sizes, expected):
    """What TrainerGroup checks before any rank starts (and TrainerRank again): every split must be even."""
    from transformers import AutoConfig

    cfg = TrainerConfig(**sizes)
    cfg.validate()
    with pytest.raises(ConfigError, match=re.escape(expected)):
        cfg.check_model(AutoConfig.from_pretrained(dense_path if model == "dense" else moe_path))
    TrainerConfig(dp_size=4, ep_size=4, tp_size=2).check_model(AutoConfig.from_pretrained(moe_path))  # a valid one


@pytest.mark.slow
def test_dp2_tp2_ep2_four_ranks_equal_single_rank(moe_path, dist_env, tmp_path):
    """All three at once on four ranks: two data-parallel TP groups, experts split over them and over TP."""
    samples = _with_top_k(_with_routing(make_samples(6, seed=37)))
    _compare(moe_path, _cfg(dp_size=2, tp_size=2, ep_size=2), samples, tmp_path,
             adv=AdvantageConfig(alpha=0.5, teacher_top_k=3), temperature=0.9)


@pytest.mark.slow
def test_tp2_pp2_four_ranks_equal_single_rank(moe_path, dist_env, tmp_path):
    """TP inside each of two pipeline stages (sequence-parallel activations on the wire), MoE with R3."""
    samples = _with_top_k(_with_routing(make_samples(5, seed=44)))
    _compare(moe_path, _cfg(tp_size=2, pp_size=2), samples, tmp_path, adv=AdvantageConfig(alpha=0.5, teacher_top_k=3),
             temperature=0.9)


@pytest.mark.slow
def test_dp2_pp2_ep2_four_ranks_equal_single_rank(moe_path, dist_env, tmp_path):
    """EP across two pipelines: the ranks get one and two microbatches, so idle passes run through the
    stages too (forward and backward), with R3 on the MoE stage."""
    samples = _with_routing(make_samples(3, seed=40))
    _compare(moe_path, _cfg(dp_size=2, pp_size=2, ep_size=2, max_tokens_per_microbatch=24), samples, tmp_path)


def _save_worker(rank: int, world: int, port: int, model_path: str, cfg: TrainerConfig, batches, out_dir: str) -> None:
    """Step on the first batch, save the training state, step on the second."""
    from trainer.checkpoint import save_trainer_state
    from trainer.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=cfg.tp_size, pp=cfg.pp_size, ep=cfg.ep_size)
    try:
        trainer = TrainerRank(model_path, cfg, ADV, num_steps=4)
        metrics = []
        for step, batch in enumerate(batches):
            shard = split_by_tokens(batch, cfg.dp_size)[trainer.dp_rank]
            metrics.append(trainer.train_step([batch[i] for i in shard], len(batch)))
            if step == 0:  # every rank writes its own part (trainer/sharded_checkpoint.py)
                save_trainer_state(f"{out_dir}/ckpt", trainer, rank)
        if rank == 0:
            torch.save(metrics, f"{out_dir}/metrics.pt")
    finally:
        shutdown_distributed()


@pytest.mark.slow
def test_checkpoint_reshards_from_pp2_ep2_to_one_rank(moe_path, dist_env, tmp_path):
    """Saved at DP2 x PP2 x EP2 (four ranks), resumed by one rank: the next step is the same (1e-6)."""
    from tests.trainer.test_sharded_checkpoint import _stored
    from trainer.checkpoint import load_trainer_state
    from trainer.dist import free_port

    cfg = _cfg(dp_size=2, pp_size=2, ep_size=2)
    batches = [make_samples(4, seed=45), make_samples(4, seed=46), make_samples(4, seed=47)]
    mp.spawn(_save_worker, args=(cfg.world_size, free_port(), moe_path, cfg, batches, str(tmp_path)),
             nprocs=cfg.world_size, join=True)
    saved = torch.load(tmp_path / "metrics.pt", weights_only=False)
    one = TrainerRank(moe_path, dataclasses.replace(cfg, dp_size=1, pp_size=1, ep_size=1), ADV, num_steps=4)
    # each value stored once, though two DP replicas hold the dense weights: ranks 0, 1 are stage 0 (dense
    # layer 0; rank 1 a replica, it writes nothing), ranks 2, 3 stage 1 (the MoE layer, experts split over both)
    _, nbytes = _stored(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("shards_rank*.safetensors"))
    print(f"DP2 x PP2 x EP2 checkpoint: {nbytes} B of tensors in {files}")
    assert files == [f"shards_rank{r}_00000.safetensors" for r in (0, 2, 3)]
    load_trainer_state(tmp_path / "ckpt", one, 0)
    # step 2's loss reads the weights; step 3's also the AdamW moments and the schedule after step 2
    for step in (1, 2):
        resumed = one.train_step(batches[step], len(batches[step]))
        diff = abs(resumed["train/loss"] - saved[step]["train/loss"])
        print(f"resharded resume DP2 x PP2 x EP2 -> 1 rank, step {step + 1}: |loss diff| = {diff:.1e}")
        assert diff < 1e-6
        assert resumed["train/grad_norm"] == pytest.approx(saved[step]["train/grad_norm"], rel=1e-5)
        assert resumed["train/step"] == saved[step]["train/step"] == step + 1
