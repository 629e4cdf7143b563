"""Weight push from a sharded trainer (trainer/weight_gather.py): the model gathered one bucket at a time
from its TP / PP / EP shards, pushed to a real local engine (TP 1, unlike the trainer), and the engine's
logprobs equal the trainer's; the pushed tensors equal the single-rank ones bit for bit; and the extra
memory of a push is about one bucket, measured (process peak RSS and freed storages), not counted."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from mopd.core.algo import AdvantageConfig
from tests.trainer.conftest import make_samples
from tests.trainer.test_weight_push import _engine_logprobs, local_engine
from trainer.config import TrainerConfig
from trainer.group import split_by_tokens
from trainer.hf_io import load_hf_state
from trainer.rank import TrainerRank
from trainer.weight_push import Pusher

ADV = AdvantageConfig(alpha=0.5)


def _cfg(tmp_path: Path, **kw) -> TrainerConfig:
    base = {"lr": 2e-2, "device": "cpu", "weight_sync": "tensor", "weight_sync_format": "safetensors",
            "weight_sync_dir": str(tmp_path / "sync"), "max_tokens_per_microbatch": 64}
    return TrainerConfig(**{**base, **kw})


def _reset_peak_rss() -> int:
    """Start a new peak-RSS window (Linux: /proc/self/clear_refs); returns the RSS now, in bytes."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _rss_follows_live_buffers() -> None:
    """glibc serves big blocks from mmap (returned to the OS when freed) only up to a threshold that it
    raises as they are freed; above it freed buffers stay in the heap and peak RSS would show the
    allocator's history rather than what is alive. Fix the threshold (256 KiB) and use one arena."""
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 256 * 1024) == 1 and libc.mallopt(-8, 1) == 1  # M_MMAP_THRESHOLD, M_ARENA_MAX


def _status(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert m is not None, field
    return int(m.group(1)) * 1024


def _push(trainer: TrainerRank, pusher: Pusher | None, url: str, version: int, bucket_bytes: int):
    """Every rank iterates the gather; rank 0 (the one with a pusher) streams it to the engine."""
    stream = trainer.hf_buckets(bucket_bytes, keep=pusher is not None)
    if pusher is None:
        for _ in stream:
            pass
    else:
        pusher.push(stream, [url], version)
    return stream


def _worker(rank: int, world: int, port: int, model_path: str, cfg: TrainerConfig, url: str, bucket_bytes: int,
            samples, out_dir: str) -> None:
    """Push the checkpoint (v1), train a step, push it by tensor (v2) and by disk (v3), each push's peak
    RSS measured, then the whole-model gather the push replaced (the control)."""
    from trainer.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    _rss_follows_live_buffers()
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=cfg.tp_size, pp=cfg.pp_size, ep=cfg.ep_size)
    try:
        trainer = TrainerRank(model_path, cfg, ADV, num_steps=2)
        pusher = Pusher(cfg, model_path) if rank == 0 else None
        disk = Pusher(dataclasses.replace(cfg, weight_sync="disk"), model_path) if rank == 0 else None
        _push(trainer, pusher, url, 1, bucket_bytes)  # the checkpoint's weights, gathered from the shards
        shard = split_by_tokens(samples, cfg.dp_size)[trainer.dp_rank]
        mine = [samples[i] for i in shard]
        trainer.train_step(mine, len(samples))
        lps = dict(zip(shard, trainer.compute_logprobs(mine)))
        peaks = {}
        for name, version, who in (("tensor", 2, pusher), ("disk", 3, disk), ("whole-model gather", 0, None)):
            base = _reset_peak_rss()
            if version:
                stream = _push(trainer, who, url, version, bucket_bytes)
            else:
                full = trainer.hf_state()
            peaks[name] = _status("VmHWM") - base
        out = {"lps": lps, "peaks": peaks, "stats": dataclasses.asdict(stream.stats), "nbytes": stream.nbytes,
               "largest": stream.largest_group_bytes, "buckets": len(stream)}
        if pusher is not None:
            out.update(full=full, snapshots=[str(p) for p in pusher.snapshots.kept])
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown_distributed()


def _run(model_path: str, cfg: TrainerConfig, samples, bucket_bytes: int, tmp_path: Path) -> list[dict]:
    from trainer.dist import free_port

    with local_engine(model_path) as url:
        mp.spawn(_worker, args=(cfg.world_size, free_port(), model_path, cfg, url, bucket_bytes, samples,
                                str(tmp_path)), nprocs=cfg.world_size, join=True)
        results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(cfg.world_size)]
        engine = [_engine_logprobs(url, s) for s in samples]
    trained = {i: lp for res in results for i, lp in res["lps"].items()}
    gap = max(np.abs(engine[i] - trained[i]).max() for i in range(len(samples)))
    rank0 = results[0]
    v1, v2 = (load_hf_state(p) for p in rank0["snapshots"])
    single = TrainerRank(model_path, dataclasses.replace(cfg, dp_size=1, tp_size=1, pp_size=1, ep_size=1), ADV,
                         num_steps=1).hf_state()
    print(f"tp={cfg.tp_size} pp={cfg.pp_size} ep={cfg.ep_size}: {rank0['buckets']} buckets of <= {bucket_bytes} B; "
          f"max |engine - trainer logprob| after the push {gap:.1e}")
    assert gap < 1e-4
    assert set(v1) == set(single) and all(torch.equal(v1[k], single[k]) for k in single), \
        "untrained push != single rank"
    assert set(v2) == set(rank0["full"]) and all(torch.equal(v2[k], rank0["full"][k]) for k in v2), \
        "trained push != the whole-model gather"
    for res in results:
        stats = res["stats"]
        assert stats["buckets"] == res["buckets"] > 1
        # gloo lets go of the last tensor it received (a broadcast from a pipeline stage, an all-gather's
        # output) only at its next collective, the next bucket's first, and when it does depends on timing
        # (seen under load at every layout): up to one tensor may overlap, never a bucket's worth
        assert stats["leftover_bytes"] <= res["largest"], "a bucket was still alive when the next one was gathered"
        assert stats["peak_alive_bytes"] <= bucket_bytes + res["largest"]
    return results


def test_buckets_equal_hf_state_and_are_freed(moe_path, mimo_path, dist_env):
    """One rank: the stream is hf_state() cut into buckets (bit for bit, in order of the model), every bucket
    at most the size unless one tensor group is bigger; a consumer that keeps a bucket is seen keeping it."""
    for path in (moe_path, mimo_path):
        trainer = TrainerRank(path, TrainerConfig(device="cpu"), ADV, num_steps=1)
        want = trainer.hf_state()
        stream = trainer.hf_buckets(30_000, keep=True)
        got: dict[str, torch.Tensor] = {}
        for bucket in stream:
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            assert size <= max(30_000, stream.largest_group_bytes)
            got.update((n, t.clone()) for n, t in bucket)
            del bucket
        assert list(got) != [] and set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert len(stream) > 3 and stream.stats.leftover_bytes == 0
        kept = trainer.hf_buckets(30_000, keep=True)
        hoard = list(kept)  # a consumer that keeps every bucket: the gather sees its copies (q/k/v) alive
        assert kept.stats.leftover_bytes > 0 and len(hoard) == len(kept)


def test_tp2_push_to_a_tp1_engine_holds_one_bucket(tmp_path, tokenizer, dist_env):
    """Trainer TP=2 (gloo), engine TP=1: the push's extra memory on each rank is about one bucket (peak
    RSS over the whole push, files and HTTP included), while the whole-model gather it replaces costs
    about the model, in the same measurement."""
    from mopd.toy.models import create_tiny_model

    path = str(create_tiny_model(tmp_path / "model", tokenizer, arch="qwen3", hidden_size=384, num_layers=16))
    bucket = 2**20
    results = _run(path, _cfg(tmp_path, tp_size=2), make_samples(3, seed=51), bucket, tmp_path)
    model = results[0]["nbytes"]
    for rank, res in enumerate(results):
        peaks = ", ".join(f"{k} +{v / 2**20:.1f} MiB" for k, v in res["peaks"].items())
        print(f"rank {rank}: model {model / 2**20:.0f} MiB, bucket {bucket / 2**20:.0f} MiB, largest group "
              f"{res['largest'] / 2**20:.1f} MiB, gathered alive at most {res['stats']['peak_alive_bytes'] / 2**20:.1f}"
              f" MiB; peak RSS: {peaks}")
        assert res["peaks"]["whole-model gather"] > 0.75 * model, "the control: a whole gather shows in peak RSS"
        assert res["peaks"]["disk"] < 0.2 * model
        # the local engine's wire format: base64 of safetensors inside JSON, encoded by httpx (~8 copies of a
        # bucket, plus ~20 MiB of client set-up per request); CUDA IPC / NCCL on GPU carry no such copies
        assert res["peaks"]["tensor"] < 0.5 * model


def test_pp2_push_equals_single_rank(moe_path, dist_env, tmp_path):
    """Two pipeline stages: the second stage's layers reach rank 0 bucket by bucket."""
    _run(moe_path, _cfg(tmp_path, pp_size=2), make_samples(3, seed=52), 30_000, tmp_path)


def test_ep2_push_equals_single_rank(moe_path, dist_env, tmp_path):
    """Experts split over two data-parallel ranks: every expert reaches the engine under its global id."""
    _run(moe_path, _cfg(tmp_path, dp_size=2, ep_size=2), make_samples(4, seed=53), 30_000, tmp_path)
