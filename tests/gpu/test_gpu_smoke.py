"""GPU smoke check (issue 14 item 5), at most ~8 minutes on one GPU.

1. a real SGLang server, launched through mopd's engine actor (rollout.engines.launch_engines), rolls out with
   routed experts (R3) through RolloutManager;
2. teacher scoring through SGLang (rollout.teacher_scoring.score_samples) equals a direct HF forward;
3. Megatron on CUDA (Transformer Engine layer specs) routes the rollout tokens as SGLang did (agreement
   reported, 100% expected) and, replaying SGLang's routing, its logprobs are close to the rollout's;
4. weight push by tensor (SGLang's serializer, CUDA IPC) and the engine's logprobs equal the trainer's after;
5. weight push by NCCL (trainer.weight_sync_nccl.DistributedPusher): needs a second GPU (NCCL refuses two ranks on
   one device), skipped otherwise;
6. MiMo-V2-Flash (issue 16 item 4): the engine launch passes SGLang's MTP speculative flags (drafts are
   accepted), and a tensor push reaches the draft (MTP) weights: noise in them lowers acceptance with the
   output unchanged, the original weights restore it.
Numbers are printed (run with -s) so they can be copied into trainer/README.md.

Not yet run: written without a GPU at hand (see benchmarks/gpu_smoke/README.md).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mopd.core.algo import AdvantageConfig
from mopd.core.model_shape import read_model_shape
from mopd.core.types import Sample
from mopd.toy.models import create_toy_mimo
from mopd.toy.mtp import train_mtp_heads
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.config import RolloutConfig
from rollout.engine_client import EngineClient
from rollout.engines import launch_engines
from rollout.rollout_manager import RolloutManager
from rollout.sglang_api import GenerateRequest
from rollout.speculative import spec_accept_len
from rollout.teacher_scoring import score_samples
from trainer import routing_replay, weight_sync, weight_sync_nccl
from trainer.config import TrainerConfig

# SGLang flags for a tiny float32 model; override with MOPD_GPU_SGLANG_ARGS='{"attention_backend": "..."}'.
SGLANG_ARGS: dict[str, Any] = {"dtype": "float32", "attention_backend": "triton", "disable_cuda_graph": True,
                               "random_seed": 0, **json.loads(os.environ.get("MOPD_GPU_SGLANG_ARGS", "{}"))}
LOGPROB_ATOL = float(os.environ.get("MOPD_GPU_LOGPROB_ATOL", "2e-3"))  # fp32 on both sides, different kernels
R3_MIN_AGREEMENT = float(os.environ.get("MOPD_GPU_R3_MIN_AGREEMENT", "1.0"))


def _rollout_cfg(**overrides: Any) -> RolloutConfig:
    base: dict[str, Any] = {"backend": "sglang", "num_engines": 1, "gpus_per_engine": 1, "cpus_per_engine": 1,
                            "mem_fraction_static": 0.3, "max_context_len": 512, "max_new_tokens": 24,
                            "temperature": 1.0, "routing_replay": True, "startup_timeout_s": 300,
                            "sglang_args": dict(SGLANG_ARGS)}
    base.update(overrides)
    return RolloutConfig(**base)


@pytest.fixture(scope="module")
def engine(tiny_moe: Path, ray_cluster: None) -> Iterator[Any]:
    group = launch_engines(str(tiny_moe), _rollout_cfg(), name="gpu-smoke")
    try:
        yield group
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def rollout(engine: Any, tiny_moe: Path) -> list[Sample]:
    tok = build_char_tokenizer()
    manager = RolloutManager(engine.urls, _rollout_cfg(), eos_token_id=tok.eos_token_id, tokenizer=tok,
                             model_path=str(tiny_moe))

    async def go() -> list[Sample]:
        await manager.check_engines()
        prompts = ["what is 2+3?", "name a colour", "count to five", "say hello"]
        samples = [Sample(prompt_index=i, group_index=0, domain="math",
                          prompt_ids=tok(p, add_special_tokens=False)["input_ids"]) for i, p in enumerate(prompts)]
        return await manager.generate(samples)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def trainer(tiny_moe: Path) -> Iterator[Any]:
    """One Megatron rank in this process (NCCL world of 1), float32, R3 on, TE specs when TE is installed."""
    from trainer.dist import free_port, init_distributed, shutdown_distributed
    from trainer.model_builder import _have_te
    from trainer.rank import TrainerRank

    assert _have_te(), "Transformer Engine is not installed: the GPU smoke check runs Megatron with TE specs"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_distributed(0, 1, "127.0.0.1", free_port(), use_cuda=True)
    cfg = TrainerConfig(device="cuda", dtype="float32", routing_replay=True, weight_sync_format="sglang")
    try:
        yield TrainerRank(str(tiny_moe), cfg, AdvantageConfig(), num_steps=1, rollout_temperature=1.0)
    finally:
        shutdown_distributed()


async def _engine_scores(url: str, samples: list[Sample], num_layers: int, top_k: int) -> list[Sample]:
    """The engine's logprobs of each response under SGLang's semantics (start one token early, drop the None),
    with the routing it used, as samples the trainer can score with replay."""
    out = []
    async with EngineClient(url, num_layers=num_layers, top_k=top_k) as client:
        for s in samples:
            ids = s.prompt_ids + s.response_ids
            p = len(s.prompt_ids)
            resp = await client.generate(GenerateRequest(
                input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 1.0}, return_logprob=True,
                logprob_start_len=p - 1, return_routed_experts=True))
            values = resp.input_logprobs or []
            assert values and values[0] is None and len(values) == len(ids) - p + 1, values[:3]
            scored = Sample(prompt_index=s.prompt_index, group_index=0, domain=s.domain, prompt_ids=list(s.prompt_ids),
                            response_ids=list(s.response_ids), loss_mask=[1] * len(s.response_ids),
                            rollout_logprobs=[float(v) for v in values[1:]],
                            weight_versions=[0] * len(s.response_ids))
            assert resp.routed_experts is not None
            scored.routed_experts = resp.routed_experts[:len(ids) - 1]
            out.append(scored)
    return out


def test_rollout_with_routed_experts(rollout: list[Sample], tiny_moe: Path) -> None:
    shape = read_model_shape(str(tiny_moe))
    num_layers, top_k = shape.num_layers, shape.top_k
    for s in rollout:
        assert s.response_ids and len(s.rollout_logprobs) == len(s.response_ids)
        assert s.routed_experts is not None
        assert s.routed_experts.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, num_layers, top_k)


def test_teacher_scoring_equals_hf_forward(engine: Any, rollout: list[Sample], tiny_moe: Path) -> None:
    from transformers import AutoModelForCausalLM

    scores = asyncio.run(score_samples(engine.urls, rollout))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe), torch_dtype=torch.float32).cuda().eval()
    gaps = []
    with torch.no_grad():
        for s, sc in zip(rollout, scores):
            ids = torch.tensor([s.prompt_ids + s.response_ids], device="cuda")
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            p = len(s.prompt_ids)
            hf = logp[p - 1:, :].gather(1, ids[0, p:, None])[:, 0].cpu().numpy()
            gaps.append(float(np.max(np.abs(hf - np.asarray(sc.logprobs)))))
    print(f"\n[gpu-smoke] teacher scoring through SGLang vs HF forward: max |gap| = {max(gaps):.2e}")
    assert max(gaps) <= LOGPROB_ATOL


def test_r3_routing_agreement_and_logprob_gap(trainer: Any, rollout: list[Sample], tiny_moe: Path) -> None:
    hf_config = trainer.hf_config
    moe_layers = trainer.moe_layers
    agree = total = 0
    for s in rollout:
        mb = trainer._microbatches([s])[0]
        with torch.no_grad(), routing_replay.recording(trainer.model) as recorded:
            trainer._forward(mb)
        rows = len(s.prompt_ids) + len(s.response_ids) - 1
        for j, layer in enumerate(moe_layers):
            mine = np.sort(recorded[j][:rows].cpu().numpy(), axis=1)
            theirs = np.sort(s.routed_experts[:, layer, :], axis=1)
            agree += int((mine == theirs).all(axis=1).sum())
            total += rows
    agreement = agree / total
    replayed = trainer.compute_logprobs(rollout)
    gap = max(float(np.max(np.abs(lp - np.asarray(s.rollout_logprobs)))) for lp, s in zip(replayed, rollout))
    print(f"\n[gpu-smoke] R3: Megatron's own routing agrees with SGLang's on {agreement:.2%} of token-layers "
          f"({total} rows, {hf_config.num_experts} experts, top-{hf_config.num_experts_per_tok}); "
          f"with replay, max |log pi_megatron - log mu| = {gap:.2e}")
    assert agreement >= R3_MIN_AGREEMENT
    assert gap <= 0.05  # sampling logprobs of the engine vs a recompute: reported; a bound catches gross errors


def _perturb(trainer: Any, seed: int) -> None:
    """New weights, as a training step would give (without needing rewards): the push must carry them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.02)


def _engine_matches_trainer(url: str, trainer: Any, rollout: list[Sample], tiny_moe: Path, version: int) -> float:
    shape = read_model_shape(str(tiny_moe))
    num_layers, top_k = shape.num_layers, shape.top_k
    scored = asyncio.run(_engine_scores(url, rollout, num_layers, top_k))
    mine = trainer.compute_logprobs(scored)
    gap = max(float(np.max(np.abs(lp - np.asarray(s.rollout_logprobs)))) for lp, s in zip(mine, scored))
    assert weight_sync.engine_weight_version(url, 30) == str(version)
    return gap


def test_weight_push_by_tensor(engine: Any, trainer: Any, rollout: list[Sample], tiny_moe: Path) -> None:
    _perturb(trainer, 1)
    n = weight_sync.push_tensor(trainer.hf_state(), engine.urls, 1, trainer.cfg, bucket_bytes=1 << 20)
    gap = _engine_matches_trainer(engine.urls[0], trainer, rollout, tiny_moe, 1)
    print(f"\n[gpu-smoke] tensor push ({n} buckets): max |engine - trainer| logprob = {gap:.2e}")
    assert gap <= LOGPROB_ATOL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight push needs 2 GPUs (one rank per device)")
def test_weight_push_by_nccl(trainer: Any, rollout: list[Sample], tiny_moe: Path, ray_cluster: None) -> None:
    # The engine on GPU 1, the trainer (this process) on GPU 0 (ray_cluster leaves CUDA_VISIBLE_DEVICES alone).
    group = launch_engines(str(tiny_moe), _rollout_cfg(sglang_args={**SGLANG_ARGS, "base_gpu_id": 1}),
                           name="gpu-smoke-nccl")
    try:
        _perturb(trainer, 2)
        pusher = weight_sync_nccl.DistributedPusher(group.urls, trainer.cfg)
        pusher.push(trainer.hf_state(), 2)
        gap = _engine_matches_trainer(group.urls[0], trainer, rollout, tiny_moe, 2)
        print(f"\n[gpu-smoke] NCCL push: max |engine - trainer| logprob = {gap:.2e}")
        assert gap <= LOGPROB_ATOL
    finally:
        group.shutdown()


# -- MiMo-V2-Flash: MTP speculative decoding on SGLang and the push into its draft -------------------------------
MTP_STEPS = 2


@pytest.fixture(scope="module")
def tiny_mimo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiMo-V2-Flash in miniature at the released head dims (q/k 192, v 128 from hidden 512), window 8, its 3 MTP
    layers trained (on CPU, seconds) on the model's own greedy continuations so that SGLang accepts drafts."""
    path = create_toy_mimo(tmp_path_factory.mktemp("gpu_smoke") / "mimo", build_char_tokenizer(), mtp_layers=3,
                           hidden_size=512, num_layers=4, sliding_window=8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 60, (6,), generator=g).tolist() for _ in range(32)]
    train_mtp_heads(path, prompts, steps=40, batch=8, new_tokens=16, temperature=0.0)
    return path


def _greedy(url: str, n: int = 32) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(9)
    bodies = [{"input_ids": torch.randint(5, 60, (6,), generator=g).tolist(),
               "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}} for _ in range(4)]
    replies = [httpx.post(f"{url}/generate", json=b, timeout=120) for b in bodies]
    for r in replies:
        r.raise_for_status()
    return [r.json() for r in replies]


def test_mimo_mtp_speculative_and_draft_weight_push(tiny_mimo: Path, ray_cluster: None) -> None:
    group = launch_engines(str(tiny_mimo), _rollout_cfg(speculative_num_steps=MTP_STEPS, routing_replay=False),
                           name="gpu-smoke-mtp")
    try:
        url = group.urls[0]
        before = _greedy(url)
        accept = spec_accept_len(before)
        assert accept is not None and accept > 1.0, [r["meta_info"] for r in before]  # the MTP flags reached SGLang
        state = load_file(str(tiny_mimo / "model.safetensors"))
        g = torch.Generator().manual_seed(3)
        noisy = {n: torch.randn(t.shape, generator=g) if n.startswith("model.mtp.") else t for n, t in state.items()}
        cfg = TrainerConfig(device="cuda", dtype="float32", weight_sync_format="sglang")
        weight_sync.push_tensor({n: t.cuda() for n, t in noisy.items()}, [url], 1, cfg, bucket_bytes=1 << 20)
        noised = _greedy(url)
        weight_sync.push_tensor({n: t.cuda() for n, t in state.items()}, [url], 2, cfg, bucket_bytes=1 << 20)
        again = _greedy(url)
        drop, back = spec_accept_len(noised), spec_accept_len(again)
        print(f"\n[gpu-smoke] MiMo MTP K={MTP_STEPS} on SGLang: accept length {accept:.2f} tokens per verify; "
              f"{drop:.2f} with noise pushed into the MTP layers; {back:.2f} after pushing them back")
        # the target's greedy tokens do not depend on the draft; only its acceptance does
        assert [r["output_ids"] for r in noised] == [r["output_ids"] for r in before]
        assert drop is not None and drop < accept
        assert back == pytest.approx(accept, abs=0.05)
        assert weight_sync.engine_weight_version(url, 30) == "2"
    finally:
        group.shutdown()
