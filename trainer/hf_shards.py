"""HF sharded checkpoints written and read one bucket at a time (the weight push's snapshots and disk mode).

The layout is transformers' own (`save_pretrained`): `model-0000i-of-0000n.safetensors` files and a
`model.safetensors.index.json` whose `weight_map` names each tensor's file, or one `model.safetensors` and
no index when there is one shard, so `from_pretrained`,
SGLang and the local engine (rollout/hf_server.py reads every *.safetensors file) load it, and
trainer/hf_io.py reads it back. Neither side holds more than one bucket of tensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.hf_io import MODEL_FILES

Bucket = list[tuple[str, torch.Tensor]]
INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Writes bucket i of n as shard i into a scratch directory; `finish` adds the index and the config and
    tokenizer files and moves it to `path` (a reader never sees a half-written checkpoint)."""

    def __init__(self, path: str | Path, num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards: expected >= 1, got {num_shards}")
        self.path = Path(path)
        self.scratch = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def add(self, bucket: Bucket) -> None:
        i = self.written + 1
        if i > self.num_shards:
            raise ValueError(f"shard {i} written to a checkpoint of {self.num_shards} shards")
        name = "model.safetensors" if self.num_shards == 1 else f"model-{i:05d}-of-{self.num_shards:05d}.safetensors"
        tensors = {n: t.detach().cpu().contiguous() for n, t in bucket}
        save_file(tensors, str(self.scratch / name), metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total_size += t.numel() * t.element_size()
        self.written = i

    def finish(self, source_dir: str | Path) -> Path:
        if self.written != self.num_shards:
            raise ValueError(f"checkpoint {self.path}: {self.written} of {self.num_shards} shards written")
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.scratch / INDEX).write_text(json.dumps(index, indent=2))
        for name in MODEL_FILES:
            src = Path(source_dir) / name
            if src.exists():
                shutil.copy2(src, self.scratch / name)
        shutil.rmtree(self.path, ignore_errors=True)
        self.scratch.rename(self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def write_sharded(stream: Iterator[Bucket], num_shards: int, path: str | Path, source_dir: str | Path) -> Path:
    """An HF checkpoint from `num_shards` buckets, written as they come."""
    writer = ShardWriter(path, num_shards)
    try:
        for bucket in stream:
            writer.add(bucket)
            del bucket
    except BaseException:
        writer.abort()
        raise
    return writer.finish(source_dir)


class CheckpointBuckets:
    """The tensors of an HF checkpoint directory (sharded or not) in buckets of about `bucket_bytes`, each
    read from disk only when iterated to (re-sending a snapshot to an engine that missed a push)."""

    def __init__(self, path: str | Path, bucket_bytes: int) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
            [p.name for p in sorted(self.path.glob("*.safetensors"))]
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights under {self.path}")
        self._groups: list[list[tuple[str, str]]] = [[]]
        size = 0
        for file in files:
            with safe_open(str(self.path / file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    sl = f.get_slice(name)
                    nbytes = _nbytes(sl.get_shape(), sl.get_dtype())
                    if self._groups[-1] and size + nbytes > bucket_bytes:
                        self._groups.append([])
                        size = 0
                    self._groups[-1].append((file, name))
                    size += nbytes

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[Bucket]:
        for group in self._groups:
            bucket: Bucket = []
            for file in dict.fromkeys(f for f, _ in group):
                with safe_open(str(self.path / file), framework="pt") as f:
                    bucket.extend((name, f.get_tensor(name)) for g, name in group if g == file)
            yield bucket
            del bucket


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(shape: list[int], dtype: str) -> int:
    n = _DTYPE_BYTES.get(dtype, 4)
    for d in shape:
        n *= d
    return n
