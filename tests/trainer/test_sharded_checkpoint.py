"""Trainer checkpoints written in parts (trainer/sharded_checkpoint.py) and the HF export written bucket by
bucket (trainer/checkpoint.py export_hf): each tensor is written once whatever the layout, a checkpoint
resumes exactly at another layout (TP=1 -> TP=2 -> TP=1), format 1 checkpoints still load, a broken
checkpoint fails naming the file or tensor, and the export of a TP=2 trainer equals one rank's bit for bit
while the gather holds about one bucket at a time."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from mopd.core.algo import AdvantageConfig
from tests.trainer.conftest import make_samples
from trainer import checkpoint, sharded_checkpoint
from trainer.config import TrainerConfig
from trainer.hf_io import load_hf_state
from trainer.rank import TrainerRank

ADV = AdvantageConfig(alpha=0.5)
BUCKET = 30_000  # bytes: the tiny models span several buckets, so the export has several shards


def _cfg(**kw) -> TrainerConfig:
    base = {"lr": 5e-3, "lr_schedule": "cosine", "warmup_steps": 1, "total_steps": 4, "max_tokens_per_microbatch": 48,
            "device": "cpu"}
    return TrainerConfig(**{**base, **kw})


def _flat(trainer: TrainerRank) -> dict[str, object]:
    """Everything a resume restores, comparable with ==/torch.equal."""
    state = trainer.state_dict()
    optim = state["optim"]["optimizer"]
    out: dict[str, object] = {f"model/{k}": v for k, v in state["model"].items()}
    for i, s in optim["state"].items():
        out.update({f"adam/{i}/{k}": v for k, v in s.items()})
    for i, m in enumerate(state["optim"]["masters"] or []):
        out[f"master/{i}"] = m
    out["groups"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
    out["scheduler"] = state["optim"]["scheduler"]
    out["step"] = state["step"]
    return out


def _assert_same(a: TrainerRank, b: TrainerRank) -> None:
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for k, v in fa.items():
        same = torch.equal(v, fb[k]) if isinstance(v, torch.Tensor) else v == fb[k]
        assert same, k


def _stored(path: Path) -> tuple[dict[tuple[str, str], int], int]:
    """Per (kind, name), how many values the checkpoint holds, each full tensor's exactly once; and the bytes
    of all its tensors (read from the files)."""
    index = json.loads((path / "index.json").read_text())
    values: dict[tuple[str, str], int] = {}
    full: dict[tuple[str, str], int] = {}
    nbytes = 0
    for e in index["tensors"]:
        key = (e["kind"], e["name"])
        values[key] = values.get(key, 0) + sum(math.prod(b["shape"]) for b in e["boxes"])
        full[key] = math.prod(e["full_shape"])
        with safe_open(str(path / e["file"]), framework="pt") as f:
            t = f.get_tensor(e["key"])
        nbytes += t.numel() * t.element_size()
    assert values == full, "a tensor is stored more than once or in part"
    return values, nbytes


def _gathered_format_1(trainer: TrainerRank) -> dict[str, object]:
    """A format 1 state.pt of layout "full" (trainer/parallel_checkpoint.py reads it), of a one-rank trainer."""
    optim = trainer.optim
    names = [n for n, _ in trainer.model.named_parameters()]
    adam = optim.optimizer.state
    return {"layout": "full", "step": trainer.step, "scheduler": optim.scheduler.state_dict(),
            "hyper": [{k: v for k, v in g.items() if k != "params"} for g in optim.optimizer.state_dict()["param_groups"]],
            "model": {k: v for k, v in trainer.model.state_dict().items() if not k.endswith("_extra_state")},
            "masters": dict(zip(names, optim.masters)),
            "adam": {"exp_avg": {n: adam[m]["exp_avg"] for n, m in zip(names, optim.masters)},
                     "exp_avg_sq": {n: adam[m]["exp_avg_sq"] for n, m in zip(names, optim.masters)},
                     "step": float(adam[optim.masters[0]]["step"])}}


def test_bf16_round_trip_and_format_1(moe_path, dist_env, tmp_path):
    """One rank, bf16 (fp32 masters): the sharded checkpoint and format 1 state.pt files (unsharded, and
    gathered under single-rank names) all restore model, masters, AdamW moments, schedule and step exactly,
    and the next step is the same."""
    cfg = _cfg(dtype="bfloat16")
    batch1, batch2 = make_samples(4, seed=61), make_samples(3, seed=62)
    trainer = TrainerRank(moe_path, cfg, ADV, num_steps=4)
    trainer.train_step(batch1, len(batch1))
    sizes = checkpoint.save_trainer_state(tmp_path / "v2", trainer, 0)
    small = sharded_checkpoint.save(trainer, tmp_path / "v2_files", file_bytes=100_000)
    assert len(small) > 3 and sum(small.values()) == sum(sizes.values())
    (tmp_path / "v1").mkdir()
    torch.save({"format_version": 1, **trainer.state_dict()}, tmp_path / "v1" / "state.pt")
    (tmp_path / "v1_full").mkdir()  # what the gathering save of TP/PP/EP ranks wrote: single-rank names
    torch.save({"format_version": 1, **_gathered_format_1(trainer)}, tmp_path / "v1_full" / "state.pt")
    values, nbytes = _stored(tmp_path / "v2")
    assert list(sizes) == ["shards_rank0_00000.safetensors"] and sum(sizes.values()) == nbytes
    assert {kind for kind, _ in values} == {"model", "master", "exp_avg", "exp_avg_sq"}
    want = trainer.train_step(batch2, len(batch2))
    for version in ("v1", "v1_full", "v2", "v2_files"):
        fresh = TrainerRank(moe_path, cfg, ADV, num_steps=4)
        rng = checkpoint.load_trainer_state(tmp_path / version, fresh, 0)
        assert (rng is None) == (version != "v2")  # only save_trainer_state adds the RNG
        fresh_ref = TrainerRank(moe_path, cfg, ADV, num_steps=4)
        fresh_ref.load_state_dict({k: v for k, v in torch.load(tmp_path / "v1" / "state.pt",
                                                                weights_only=False).items() if k != "format_version"})
        _assert_same(fresh, fresh_ref)
        got = fresh.train_step(batch2, len(batch2))
        assert got["train/loss"] == want["train/loss"] and got["train/lr"] == want["train/lr"], version


def test_broken_checkpoints_fail_naming_the_file_or_tensor(dense_path, tokenizer, dist_env, tmp_path):
    """A different model's checkpoint, a missing shard file, no checkpoint: clear errors, and a checkpoint
    missing its last file fails before any weight is overwritten."""
    from mopd.toy.models import create_tiny_model

    trainer = TrainerRank(dense_path, _cfg(), ADV, num_steps=2)
    checkpoint.save_trainer_state(tmp_path / "ckpt", trainer, 0)
    wider = str(create_tiny_model(tmp_path / "wider", tokenizer, arch="qwen3", hidden_size=48))
    with pytest.raises(ValueError, match=r"model tensor 'embedding\.word_embeddings\.weight' has shape \[\d+, 64\] in "
                                         r"shards_rank0_00000\.safetensors, this model expects \[\d+, 48\]"):
        checkpoint.load_trainer_state(tmp_path / "ckpt", TrainerRank(wider, _cfg(), ADV, num_steps=2), 0)
    sharded_checkpoint.save(trainer, tmp_path / "files", file_bytes=20_000)
    last = max((tmp_path / "files").glob("shards_rank0_*.safetensors"))
    last.unlink()
    other = TrainerRank(dense_path, _cfg(), ADV, num_steps=2)
    samples = make_samples(3, seed=66)
    other.train_step(samples, len(samples))
    before = {k: v.clone() for k, v in other.model.state_dict().items() if not k.endswith("_extra_state")}
    with pytest.raises(FileNotFoundError, match=re.escape(f"shard file {last.name} is missing")):
        checkpoint.load_trainer_state(tmp_path / "files", other, 0)
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in before.items()), "a failed load changed weights"
    with pytest.raises(FileNotFoundError, match="no trainer state at"):
        checkpoint.load_trainer_state(tmp_path / "nothing", trainer, 0)


def _tp2_worker(rank: int, world: int, port: int, model_path: str, cfg: TrainerConfig, batch, out_dir: str) -> None:
    """At TP=2: export the untrained model; load the TP=1 checkpoint, save it again at TP=2, take the next step."""
    from trainer.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=cfg.tp_size)
    try:
        out = Path(out_dir)
        trainer = TrainerRank(model_path, cfg, ADV, num_steps=4)
        stream = trainer.hf_buckets(BUCKET, keep=rank == 0)
        if rank == 0:
            checkpoint.export_hf(out / "hf_tp2", stream, model_path)
        else:
            for _ in stream:
                pass
        checkpoint.load_trainer_state(out / "ckpt_tp1", trainer, rank)
        sizes = checkpoint.save_trainer_state(out / "ckpt_tp2", trainer, rank)
        metrics = trainer.train_step(batch, len(batch))
        torch.save({"sizes": sizes, "metrics": metrics, "stats": dataclasses.asdict(stream.stats),
                    "largest": stream.largest_group_bytes, "buckets": len(stream)}, out / f"rank{rank}.pt")
    finally:
        shutdown_distributed()


def test_tp1_to_tp2_and_back_and_tp2_export(dense_path, dist_env, tmp_path):
    """A TP=1 checkpoint resumed at TP=2 takes the single rank's next step; saved again at TP=2 it holds each
    value once (both ranks write half of the split weights, rank 0 the replicated ones) and resumed at TP=1
    it is the original state bit for bit. The TP=2 export (several shards + index) equals the single rank's."""
    from transformers import AutoModelForCausalLM

    from trainer.dist import free_port

    batch1, batch2 = make_samples(5, seed=63), make_samples(4, seed=64)
    single = TrainerRank(dense_path, _cfg(), ADV, num_steps=4)
    checkpoint.export_hf(tmp_path / "hf_single", single.hf_buckets(BUCKET, keep=True), dense_path)
    single.train_step(batch1, len(batch1))
    checkpoint.save_trainer_state(tmp_path / "ckpt_tp1", single, 0)
    saved = TrainerRank(dense_path, _cfg(), ADV, num_steps=4)
    checkpoint.load_trainer_state(tmp_path / "ckpt_tp1", saved, 0)
    want = single.train_step(batch2, len(batch2))

    cfg = _cfg(tp_size=2)
    mp.spawn(_tp2_worker, args=(2, free_port(), dense_path, cfg, batch2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    got = ranks[0]["metrics"]
    print(f"TP=1 checkpoint resumed at TP=2: |loss diff| {abs(got['train/loss'] - want['train/loss']):.1e}")
    assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5, abs=1e-6)
    assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-5)
    assert got["train/lr"] == want["train/lr"] and got["train/step"] == want["train/step"] == 2

    values1, bytes1 = _stored(tmp_path / "ckpt_tp1")
    values2, bytes2 = _stored(tmp_path / "ckpt_tp2")
    written = [sum(r["sizes"].values()) for r in ranks]
    print(f"checkpoint bytes: TP=1 {bytes1}, TP=2 rank 0 {written[0]} + rank 1 {written[1]}")
    assert values2 == values1
    assert bytes2 == bytes1 == sum(written) and min(written) > 0
    back = TrainerRank(dense_path, _cfg(), ADV, num_steps=4)
    checkpoint.load_trainer_state(tmp_path / "ckpt_tp2", back, 0)
    _assert_same(back, saved)

    ours, ref = load_hf_state(tmp_path / "hf_tp2"), load_hf_state(tmp_path / "hf_single")
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ref)
    index = json.loads((tmp_path / "hf_tp2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == ranks[0]["buckets"] > 1
    assert (tmp_path / "hf_tp2" / "tokenizer.json").exists()
    for r in ranks:
        stats = r["stats"]
        print(f"export at TP=2: {r['buckets']} buckets of <= {BUCKET} B, gathered alive at most "
              f"{stats['peak_alive_bytes']} B, largest group {r['largest']} B")
        assert stats["leftover_bytes"] <= r["largest"] and stats["peak_alive_bytes"] <= BUCKET + r["largest"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_tp2"), dtype=torch.float32)
    assert all(torch.equal(p, ref[n]) for n, p in model.state_dict().items() if n in ref)



def _memory_worker(rank: int, world: int, port: int, model_path: str, cfg: TrainerConfig, batch, out_dir: str) -> None:
    """After one step at TP=2: peak RSS of the export, of the checkpoint save and of the whole-model gather."""
    from tests.trainer.test_sharded_weight_push import _reset_peak_rss, _rss_follows_live_buffers, _status
    from trainer.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    _rss_follows_live_buffers()
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=cfg.tp_size)
    try:
        out = Path(out_dir)
        trainer = TrainerRank(model_path, cfg, ADV, num_steps=2)
        trainer.train_step(batch, len(batch))
        peaks, bucket = {}, 2**20
        base = _reset_peak_rss()
        stream = trainer.hf_buckets(bucket, keep=rank == 0)
        if rank == 0:
            checkpoint.export_hf(out / "hf", stream, model_path)
        else:
            for _ in stream:
                pass
        peaks["export"] = _status("VmHWM") - base
        base = _reset_peak_rss()
        sizes = checkpoint.save_trainer_state(out / "ckpt", trainer, rank)
        peaks["save"] = _status("VmHWM") - base
        base = _reset_peak_rss()
        full = trainer.hf_state()
        peaks["whole-model gather"] = _status("VmHWM") - base
        del full
        torch.save({"peaks": peaks, "sizes": sizes, "nbytes": stream.nbytes, "stats": dataclasses.asdict(stream.stats)},
                   out / f"rank{rank}.pt")
    finally:
        shutdown_distributed()


def test_tp2_export_and_checkpoint_hold_no_whole_model(tmp_path, tokenizer, dist_env):
    """A 16-layer model at TP=2: the export's extra memory on each rank is about one bucket and the checkpoint
    save's about nothing (peak RSS, measured), while the whole-model gather they replaced costs the model; each
    rank writes about half of the state (weights + AdamW moments)."""
    from mopd.toy.models import create_tiny_model
    from trainer.dist import free_port

    path = str(create_tiny_model(tmp_path / "model", tokenizer, arch="qwen3", hidden_size=384, num_layers=16))
    cfg = _cfg(tp_size=2, lr=1e-3)
    mp.spawn(_memory_worker, args=(2, free_port(), path, cfg, make_samples(2, seed=65), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = ranks[0]["nbytes"]
    written = [sum(r["sizes"].values()) for r in ranks]
    _, total = _stored(tmp_path / "ckpt")
    for rank, (res, wrote) in enumerate(zip(ranks, written)):
        peaks = ", ".join(f"{k} +{v / 2**20:.1f} MiB" for k, v in res["peaks"].items())
        print(f"rank {rank}: model {model / 2**20:.1f} MiB, wrote {wrote / 2**20:.1f} of {total / 2**20:.1f} MiB of "
              f"checkpoint; gathered alive at most {res['stats']['peak_alive_bytes'] / 2**20:.1f} MiB; peak RSS: {peaks}")
        assert res["peaks"]["whole-model gather"] > 0.75 * model, "the control: a whole gather shows in peak RSS"
        assert res["peaks"]["export"] < 0.2 * model and res["peaks"]["save"] < 0.1 * model
        assert 0.4 * total < wrote < 0.6 * total
    assert sum(written) == total and total > 2.9 * model  # weights + two moments, each stored once
