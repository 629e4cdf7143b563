"""Weight push from a TP=2 trainer against the machine's memory-copy bandwidth, in one run (issue #18).

Measures, side by side: torch `copy_` of a large buffer (GB/s, before and after), then for each bucket size
the stages of a push of a synthetic Qwen3 (~1 GiB fp32) from two gloo ranks (TP=2) to the local engine
(rollout/hf_server.py, TP=1): the gather alone (shards -> full HF buckets), tensor mode over HTTP, tensor
mode with the snapshot for restarted engines (what the trainer runs), and disk mode. Per row: throughput
(GB of weights / s), its ratio to memcpy, where the time went, how long the engines were paused and the
peak extra RSS of each rank. Writes results.json and results.md under --out; README.md says what they show.

    python benchmarks/weight_push/run.py                 # ~1 GiB model, buckets 16 MB .. 1 GB
    python benchmarks/weight_push/run.py --quick         # tiny model, same code path
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MB = 2**20
# The local engine's wire format (base64 of safetensors inside JSON) holds ~8 copies of a bucket on the
# trainer and several on the engine: a 1 GB bucket over HTTP would need >12 GB on this 23 GB machine.
HTTP_MAX_BUCKET_MB = 256
# Its default --max-request-bytes (256 MiB of body) takes buckets up to ~190 MB; raised here for 256 MB ones.
MAX_REQUEST_BYTES = 2**30


def memcpy_gbps(nbytes: int = 512 * MB, repeats: int = 7, threads: int = 1) -> float:
    """Median bandwidth of `dst.copy_(src)` on fp32 buffers of `nbytes` (bytes copied / s)."""
    torch.set_num_threads(threads)
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def make_model(path: Path, *, hidden: int, layers: int, inter: int, vocab: int, heads: int, kv: int) -> Path:
    """A random Qwen3 checkpoint of the given size, written shard by shard (never whole in memory)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mopd.toy.tokenizer import build_char_tokenizer
    from trainer.hf_shards import ShardWriter

    if (path / "config.json").exists():
        return path
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in Qwen3ForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * shape.numel()
        if groups[-1] and size + nbytes > 256 * MB:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    src = path.with_name(path.name + ".src")
    src.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(src)
    build_char_tokenizer().save_pretrained(src)
    writer = ShardWriter(path, len(groups))
    for names in groups:
        writer.add([(n, torch.ones(shapes[n]) if n.endswith("norm.weight") else
                     torch.randn(shapes[n], generator=gen) * 0.02) for n in names])
    writer.finish(src)
    shutil.rmtree(src)
    return path


@contextlib.contextmanager
def engine(model_path: Path) -> Iterator[str]:
    from trainer.dist import free_port

    port = free_port()
    command = [sys.executable, "-m", "rollout.hf_server", "--model-path", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/model_info", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    raise RuntimeError(f"local engine did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _status(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def _reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def _modes(bucket_mb: int) -> list[str]:
    http = ["tensor", "tensor+snapshot"] if bucket_mb <= HTTP_MAX_BUCKET_MB else []
    return ["gather", *http, "disk"]


def _worker(rank: int, world: int, port: int, model_path: str, url: str, bucket_mbs: list[int], out: str) -> None:
    import dataclasses

    import torch.distributed as dist

    from mopd.core.algo import AdvantageConfig
    from trainer.config import TrainerConfig
    from trainer.dist import init_distributed, shutdown_distributed
    from trainer.rank import TrainerRank
    from trainer.weight_push import Pusher
    from trainer.weight_sync import PushTimes, send_tensor_buckets

    torch.set_num_threads(1)
    # peak RSS then follows the live buffers (see tests/trainer/test_sharded_weight_push.py)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 256 * 1024)
    libc.mallopt(-8, 1)
    init_distributed(rank, world, "127.0.0.1", port, use_cuda=False, tp=world)
    try:
        cfg = TrainerConfig(device="cpu", tp_size=world, weight_sync="tensor", weight_sync_format="safetensors",
                            weight_sync_dir=f"{out}/sync", weight_sync_timeout_s=1800)
        trainer = TrainerRank(model_path, cfg, AdvantageConfig(), num_steps=1)
        rows, version = [], 0
        for mb in bucket_mbs:
            for mode in _modes(mb):
                version += 1
                times = PushTimes()
                dist.barrier()
                base = _reset_peak()
                start = time.perf_counter()
                stream = trainer.hf_buckets(mb * MB, keep=rank == 0)
                if rank != 0 or mode == "gather":
                    for bucket in stream:
                        del bucket
                elif mode == "tensor":
                    send_tensor_buckets(stream, [url], version, cfg, times=times)
                else:
                    pusher = Pusher(dataclasses.replace(cfg, weight_sync=mode.split("+")[0]), model_path)
                    times = pusher.push(stream, [url], version)
                    pusher.close()
                wall = time.perf_counter() - start
                peak = _status("VmHWM") - base
                dist.barrier()
                shutil.rmtree(f"{out}/sync/v{version}", ignore_errors=True)
                rows.append({"rank": rank, "mode": mode, "bucket_mb": mb, "buckets": len(stream), "wall_s": wall,
                             "nbytes": stream.nbytes, "peak_rss_bytes": peak,
                             "gathered_alive_bytes": stream.stats.peak_alive_bytes,
                             "largest_group_bytes": stream.largest_group_bytes,
                             **{k: v for k, v in dataclasses.asdict(times).items() if k.endswith("_s")}})
                if rank == 0:
                    print(f"  {mode:16s} bucket {mb:5d} MB: {stream.nbytes / wall / 1e9:.3f} GB/s, {wall:.1f} s, "
                          f"peak RSS +{peak / MB:.0f} MiB", flush=True)
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(rows))
    finally:
        shutdown_distributed()


def table(result: dict) -> str:
    memcpy = result["memcpy_gbps"]
    lines = [("| stage | bucket | GB/s | / memcpy | wall s | gather s | write s | send s | engines paused s | "
              "peak extra RSS rank 0 / 1 | gathered alive (rank 0) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["mode"], r["bucket_mb"], r["rank"]): r for r in result["rows"]}
    for (mode, mb, rank), r in by_key.items():
        if rank != 0:
            continue
        other = by_key.get((mode, mb, 1), {}).get("peak_rss_bytes", 0)
        rate = r["nbytes"] / r["wall_s"] / 1e9
        gather = r["wall_s"] if mode == "gather" else r["gather_s"]
        lines.append(f"| {mode} | {mb} MB | {rate:.3f} | {rate / memcpy:.1%} | {r['wall_s']:.1f} | {gather:.1f} | "
                     f"{r['write_s']:.1f} | {r['send_s']:.1f} | {r['paused_s']:.1f} | "
                     f"{r['peak_rss_bytes'] / MB:.0f} / {other / MB:.0f} MiB | {r['gathered_alive_bytes'] / MB:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/weight_push")
    parser.add_argument("--quick", action="store_true", help="a tiny model and small buckets (same code path)")
    parser.add_argument("--buckets", default="16,64,256,1024", help="bucket sizes in MB")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shape = {"hidden": 256, "layers": 2, "inter": 512, "vocab": 1024, "heads": 4, "kv": 2} if args.quick else \
        {"hidden": 1024, "layers": 16, "inter": 3072, "vocab": 32768, "heads": 16, "kv": 8}
    bucket_mbs = [1, 2] if args.quick else [int(b) for b in args.buckets.split(",")]
    result: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "uptime_before": _uptime(),
                    "model": shape, "bucket_mbs": bucket_mbs}
    result["memcpy_gbps_1thread_before"] = memcpy_gbps(threads=1)
    result["memcpy_gbps_all_threads_before"] = memcpy_gbps(threads=os.cpu_count() or 1)
    print(f"memcpy: {result['memcpy_gbps_1thread_before']:.2f} GB/s (1 thread), "
          f"{result['memcpy_gbps_all_threads_before']:.2f} GB/s (all threads)", flush=True)
    model = make_model(out / ("model_quick" if args.quick else "model"), **shape)
    from trainer.dist import free_port

    with engine(model) as url:
        mp.spawn(_worker, args=(2, free_port(), str(model), url, bucket_mbs, str(out)), nprocs=2, join=True)
    result["rows"] = [row for r in range(2) for row in json.loads((out / f"rank{r}.json").read_text())]
    result["memcpy_gbps_1thread_after"] = memcpy_gbps(threads=1)
    result["memcpy_gbps_all_threads_after"] = memcpy_gbps(threads=os.cpu_count() or 1)
    result["uptime_after"] = _uptime()
    # the baseline: the best the machine copied in this run (the push itself runs one thread per rank)
    result["memcpy_gbps"] = max(v for k, v in result.items() if k.startswith("memcpy_gbps_"))
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = (f"{result['date']}; memcpy {result['memcpy_gbps']:.2f} GB/s (best of before/after, 1 thread and all); "
          f"model {result['rows'][0]['nbytes'] / 1e9:.2f} GB fp32, TP=2 trainer (gloo) -> TP=1 local engine\n\n"
          + table(result) + "\n")
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
