"""R3: the trainer's MoE layers use the rollout's experts in forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.transformer.moe.router import TopKRouter

from mopd.core.algo import AdvantageConfig
from tests.trainer.conftest import make_samples
from trainer.batching import plan_microbatches
from trainer.config import TrainerConfig
from trainer.rank import TrainerRank
from trainer.routing_replay import replay_tensors


def _capture_routing(model):
    """Forward hooks that keep each MoE router's routing map ([tokens, experts] bool)."""
    maps: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().clone()))
               for m in model.modules() if isinstance(m, TopKRouter)]
    return maps, handles


def _routing_per_sample(routing_map: torch.Tensor, seq_len: int, batch: int, b: int, n: int) -> torch.Tensor:
    """Rows of sample b (first n positions) out of a [S*B, E] map."""
    return routing_map.view(seq_len, batch, -1)[:n, b]


def _to_sglang(samples, maps_by_sample, num_layers: int, top_k: int, moe_layer: int) -> None:
    """Store routing as SGLang would: [T-1, L, K], dense layer 0 filled with garbage."""
    for s, rmap in zip(samples, maps_by_sample):
        arr = np.full((len(s.tokens) - 1, num_layers, top_k), 77, dtype=np.int32)
        idx = torch.nonzero(rmap[: len(s.tokens) - 1])[:, 1].view(-1, top_k)
        arr[:, moe_layer, :] = idx.numpy()
        s.routed_experts = arr


def _engine(path: str, replay: bool = True) -> TrainerRank:
    return TrainerRank(path, TrainerConfig(routing_replay=replay, max_tokens_per_microbatch=4096, lr=1e-3),
                       AdvantageConfig(), num_steps=1)


def test_replay_tensor_layout():
    from mopd.core.types import Sample

    s0 = Sample(0, 0, "d", prompt_ids=[1, 2], response_ids=[3, 4])  # T=4, rows 0..2
    s1 = Sample(1, 0, "d", prompt_ids=[1], response_ids=[3])  # T=2, row 0
    s0.routed_experts = np.arange(3 * 2 * 2, dtype=np.int32).reshape(3, 2, 2) % 4
    s1.routed_experts = np.array([[[9, 9], [3, 2]]], dtype=np.int32)
    (layer1,) = replay_tensors([s0, s1], 4, [1], num_layers=2, top_k=2, num_experts=4)
    grid = layer1.view(4, 2, 2)  # [S, B, K]: token-major, as the router flattens [S, B]
    assert grid[:3, 0].tolist() == s0.routed_experts[:, 1].tolist()
    assert grid[0, 1].tolist() == [3, 2]
    assert grid[3, 0].tolist() == [0, 1] and grid[1:, 1].tolist() == [[0, 1]] * 3  # filler
    s1.routed_experts = np.array([[[0, 0], [3, 5]]], dtype=np.int32)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        replay_tensors([s1], 2, [1], num_layers=2, top_k=2, num_experts=4)


def test_replay_matches_rollout_routing_and_closes_logprob_gap(moe_path, dist_env):
    engine = _engine(moe_path)
    cfg = engine.hf_config
    samples = make_samples(3, seed=11)
    # "rollout": natural routing and logprobs of the unperturbed policy
    maps, handles = _capture_routing(engine.model)
    rollout_lps = [engine.compute_logprobs([s])[0] for s in samples]
    for h in handles:
        h.remove()
    _to_sglang(samples, maps, cfg.num_hidden_layers, cfg.num_experts_per_tok, moe_layer=1)
    # perturb the router so natural routing changes
    router = next(m for m in engine.model.modules() if isinstance(m, TopKRouter))
    with torch.no_grad():
        router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)

    maps, handles = _capture_routing(engine.model)
    replayed = engine.compute_logprobs(samples)  # one microbatch of 3, right-padded
    for h in handles:
        h.remove()
    seq_len = max(len(s.tokens) for s in samples)
    natural_maps, handles = _capture_routing(engine.model)
    bare = [engine.compute_logprobs([_without_routing(s)])[0] for s in samples]
    for h in handles:
        h.remove()
    (order,) = plan_microbatches([len(s.tokens) for s in samples], 4096)  # row b of the batch = order[b]
    differ = 0
    for b, s in enumerate(samples):
        n = len(s.tokens) - 1
        got = _routing_per_sample(maps[0], seq_len, len(samples), order.index(b), n)
        want = torch.zeros_like(got)
        want.scatter_(1, torch.from_numpy(s.routed_experts[:, 1, :]).long(), True)
        assert torch.equal(got, want), f"sample {b}: replayed routing differs from the rollout's"
        differ += int((natural_maps[b][:n] != want).any(-1).sum())
    assert differ > 0, "perturbation did not change natural routing; the test would prove nothing"
    gap_replay = np.mean([np.abs(r - x).mean() for r, x in zip(rollout_lps, replayed)])
    gap_bare = np.mean([np.abs(r - x).mean() for r, x in zip(rollout_lps, bare)])
    print(f"tokens re-routed without replay: {differ}; mean |logprob gap| replay={gap_replay:.4e} "
          f"no-replay={gap_bare:.4e}")
    assert gap_replay < gap_bare


def _without_routing(s):
    import copy

    c = copy.copy(s)
    c.routed_experts = None
    return c


def test_replay_holds_in_backward(moe_path, dist_env):
    """Route every token to experts {0, 1}: experts 2 and 3 must get exactly zero gradient."""
    samples = make_samples(4, seed=5)
    for s in samples:
        s.routed_experts = np.tile(np.array([1, 0], dtype=np.int32), (len(s.tokens) - 1, 2, 1))
    engine = _engine(moe_path)
    engine.train_step(samples, len(samples))
    grads = {n: p.grad for n, p in engine.model.named_parameters() if "local_experts" in n}
    for e in (2, 3):
        assert all(g.abs().max() == 0 for n, g in grads.items() if f"local_experts.{e}." in n)
    for e in (0, 1):
        assert all(g.abs().max() > 0 for n, g in grads.items() if f"local_experts.{e}." in n)
    # without replay the natural routing reaches the other experts too
    engine_off = _engine(moe_path, replay=False)
    engine_off.train_step(samples, len(samples))
    assert any(p.grad.abs().max() > 0 for n, p in engine_off.model.named_parameters()
               if "local_experts.2." in n or "local_experts.3." in n)


def test_bad_routed_experts_shape(moe_path, dist_env):
    engine = _engine(moe_path)
    s = make_samples(1, seed=2)[0]
    s.routed_experts = np.zeros((len(s.tokens) - 1, 2, 3), dtype=np.int32)
    with pytest.raises(ValueError, match=r"routed_experts has shape .* expected .*num_experts_per_tok"):
        engine.compute_logprobs([s])
