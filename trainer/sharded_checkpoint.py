"""Training checkpoints written in parts by the ranks that hold them and read in parts at any layout.

Each rank writes only the tensors it holds (model weights and buffers, fp32 masters of a bf16 model, AdamW
moments) to its own files `shards_rank<r>_<i>.safetensors` (about FILE_BYTES each), unconverted; a tensor
held by several ranks (data-parallel replicas, weights that tensor parallelism does not split) is written
once, by the lowest rank holding it.
Rank 0 writes `index.json`: step, scheduler and optimizer hyper-parameters, and for every written tensor its
single-rank (TP=PP=EP=1) name, full shape, file and which rows of the full tensor it holds. A rank at another
layout reads, for each of its own tensors, only the overlapping slices (safetensors `get_slice`: the files are
memory-mapped, nothing else is read). So no rank ever holds more than its own shard.

A local tensor covers one box of the full tensor, or two under a gated MLP (`linear_fc1` = [gate_r; up_r] of
the full [gate; up]): the same cut trainer/parallel.py `shard_state` makes, written out as boxes here.

Why not Megatron-core's `dist_checkpointing`: 0.16.1's torch_dist writer calls `torch.cuda.synchronize()`
(strategies/filesystem_async.py `preload_tensors`), so it cannot save on a CPU-only torch, and the
optimizer here is torch AdamW (trainer/optim.py) rather than a Megatron optimizer with sharded state.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open
from safetensors.torch import save_file

from trainer import parallel, parallel_checkpoint
from trainer.weight_gather import canonical_name

FORMAT_VERSION = 2  # 1: state.pt gathered on rank 0 (trainer/checkpoint.py still reads it)
INDEX = "index.json"
FILE_BYTES = 2**30  # a writing rank's parts go into files of about this size

Tensor = torch.Tensor
Box = dict[str, list[int]]  # {"local": start per dim in the local tensor, "full": start in the full tensor, "shape"}


def _tp_rank(key: str) -> int:
    return ps.get_expert_tensor_parallel_rank() if parallel.is_expert(key) else ps.get_tensor_model_parallel_rank()


def _layout(model: torch.nn.Module, key: str, value: Tensor, params: dict[str, Tensor]) -> tuple[str, list[int],
                                                                                                 list[Box]]:
    """Single-rank name, full shape and the boxes of the full tensor that local weight `key` holds."""
    name = canonical_name(parallel.full_key(key, parallel.num_local_experts(model), parallel.layer_offset(model)))
    shape = list(value.shape)
    param = params.get(key)
    size = parallel.tp_size_of(key)
    if param is None or not getattr(param, "tensor_model_parallel", False) or size == 1:
        return name, shape, [{"local": [0] * len(shape), "full": [0] * len(shape), "shape": shape}]
    dim, rank = param.partition_dim, _tp_rank(key)
    full = shape.copy()
    full[dim] *= size
    at = [0] * len(shape)
    if key.endswith("linear_fc1.weight") and getattr(model.config, "gated_linear_unit", False):
        half = shape[0] // 2  # [gate_r; up_r]: rows r of each half of the full [gate; up]
        piece = [half, *shape[1:]]
        return name, full, [{"local": [0, *at[1:]], "full": [rank * half, *at[1:]], "shape": piece},
                            {"local": [half, *at[1:]], "full": [full[0] // 2 + rank * half, *at[1:]], "shape": piece}]
    start = at.copy()
    start[dim] = rank * shape[dim]
    return name, full, [{"local": at, "full": start, "shape": shape}]


def _local_tensors(trainer: Any) -> dict[str, dict[str, Tensor]]:
    """This rank's tensors by kind (model, master, exp_avg, exp_avg_sq), under the model's local names."""
    model, optim = trainer.model, trainer.optim
    names = [n for n, _ in model.named_parameters()]
    out = {"model": {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}}
    if optim.mixed:
        out["master"] = {n: m.detach() for n, m in zip(names, optim.masters)}
    adam = optim.optimizer.state
    if adam:
        for key in parallel_checkpoint.MOMENTS:
            out[key] = {n: adam[m][key] for n, m in zip(names, optim.masters)}
    return out


def _files(written: list[dict[str, Any]], file_bytes: int) -> None:
    """Name each part's file: a writing rank's parts in files of about `file_bytes` (on a GPU each file is
    copied to host memory whole before it is written), the same on every rank."""
    count: dict[int, int] = {}
    size: dict[int, int] = {}
    for e in written:
        r = e["rank"]
        if size.get(r, 0) and size[r] + e["nbytes"] > file_bytes:
            count[r] += 1
            size[r] = 0
        count.setdefault(r, 0)
        size[r] = size.get(r, 0) + e["nbytes"]
        e["file"] = f"shards_rank{r}_{count[r]:05d}.safetensors"


def save(trainer: Any, path: str | Path, file_bytes: int = FILE_BYTES) -> dict[str, int]:
    """Write this rank's part of the training state into `path` (a collective: every rank calls it).
    Returns the bytes this rank wrote per file (empty when every tensor it holds is written by another)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    model, optim = trainer.model, trainer.optim
    params = dict(model.named_parameters())
    rank = dist.get_rank()
    mine: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    for kind, named in _local_tensors(trainer).items():
        for key, value in named.items():
            name, full, boxes = _layout(model, key, value, params)
            entry = {"kind": kind, "name": name, "full_shape": full, "dtype": str(value.dtype).removeprefix("torch."),
                     "key": f"{kind}/{key}", "boxes": boxes, "nbytes": value.numel() * value.element_size()}
            mine.append(entry)
            tensors[entry["key"]] = value
    everyone: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    parts: dict[tuple, dict[str, Any]] = {}  # what each tensor part is: its first holder writes it
    for r, entries in enumerate(everyone):
        for e in entries or []:
            parts.setdefault((e["kind"], e["name"], json.dumps(e["boxes"])), {**e, "rank": r})
    written = list(parts.values())
    _files(written, file_bytes)
    sizes: dict[str, int] = {}
    for file in dict.fromkeys(e["file"] for e in written if e["rank"] == rank):
        own = {e["key"]: tensors[e["key"]].cpu().contiguous() for e in written if e["file"] == file}
        tmp = d / (file + ".tmp")
        save_file(own, str(tmp), metadata={"format": "pt"})
        tmp.replace(d / file)
        sizes[file] = sum(t.numel() * t.element_size() for t in own.values())
        del own
    dist.barrier()  # every part is on disk before the index names it
    if rank == 0:
        adam = optim.optimizer.state
        index = {"format_version": FORMAT_VERSION, "step": trainer.step, "scheduler": optim.scheduler.state_dict(),
                 "hyper": [{k: v for k, v in g.items() if k != "params"}
                           for g in optim.optimizer.state_dict()["param_groups"]],
                 "adam_step": float(adam[optim.masters[0]]["step"]) if adam else None, "mixed": optim.mixed,
                 "saved_at": {"tp": ps.get_tensor_model_parallel_world_size(),
                              "pp": ps.get_pipeline_model_parallel_world_size(),
                              "ep": ps.get_expert_model_parallel_world_size(),
                              "dp": ps.get_data_parallel_world_size()},
                 "tensors": written}
        tmp = d / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index))
        tmp.replace(d / INDEX)
    return sizes


class _Reader:
    """The saved parts of every tensor, read slice by slice from memory-mapped files."""

    def __init__(self, d: Path, index: dict[str, Any], stack: contextlib.ExitStack) -> None:
        self.d, self.stack = d, stack
        self.parts: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for e in index["tensors"]:
            self.parts.setdefault((e["kind"], e["name"]), []).append(e)
        self.files: dict[str, Any] = {}

    def _open(self, file: str) -> Any:
        if file not in self.files:
            self.files[file] = self.stack.enter_context(safe_open(str(self.d / file), framework="pt"))
        return self.files[file]

    def check(self, kind: str, name: str, full: list[int]) -> list[dict[str, Any]]:
        """The saved parts of full tensor `name`, which must exist with this shape, in files that exist."""
        parts = self.parts.get((kind, name))
        if not parts:
            raise ValueError(f"trainer checkpoint {self.d}: no {kind} tensor {name!r} (this model needs it; was the "
                             "checkpoint written for another model?)")
        for part in parts:
            if part["full_shape"] != full:
                raise ValueError(f"trainer checkpoint {self.d}: {kind} tensor {name!r} has shape {part['full_shape']}"
                                 f" in {part['file']}, this model expects {full}")
            if not (self.d / part["file"]).is_file():
                raise FileNotFoundError(f"trainer checkpoint {self.d}: shard file {part['file']} is missing (its "
                                        "index.json names it; copy the whole checkpoint directory)")
        return parts

    def fill(self, kind: str, name: str, full: list[int], boxes: list[Box], out: Tensor) -> None:
        """Copy the saved values of `boxes` of full tensor `name` into local tensor `out`."""
        parts = self.check(kind, name, full)
        for box in boxes:
            covered = 0
            for part in parts:
                for saved in part["boxes"]:
                    lo = [max(a, b) for a, b in zip(box["full"], saved["full"])]
                    hi = [min(a + n, b + m) for a, n, b, m in zip(box["full"], box["shape"], saved["full"],
                                                                  saved["shape"])]
                    if any(h <= low for low, h in zip(lo, hi)):
                        continue
                    src = tuple(slice(s + low - f, s + h - f) for s, low, h, f in zip(saved["local"], lo, hi,
                                                                                      saved["full"]))
                    dst = tuple(slice(s + low - f, s + h - f) for s, low, h, f in zip(box["local"], lo, hi,
                                                                                      box["full"]))
                    piece = self._open(part["file"]).get_slice(part["key"])[src] if src else \
                        self._open(part["file"]).get_tensor(part["key"])
                    out[dst] = piece
                    covered += piece.numel()
            need = 1
            for n in box["shape"]:
                need *= n
            if covered != need:
                raise ValueError(f"trainer checkpoint {self.d}: {kind} tensor {name!r} rows {box['full']} + "
                                 f"{box['shape']}: {covered} of {need} values saved (a shard is missing or the index "
                                 "is inconsistent)")


def _read(reader: _Reader, kind: str, model: torch.nn.Module, named: dict[str, Tensor],
          params: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's `kind` tensors, each read on the host and moved to its device before the next is read."""
    out = {}
    for key, like in named.items():
        name, full, boxes = _layout(model, key, like, params)
        host = torch.empty(like.shape, dtype=like.dtype if kind == "model" else torch.float32)
        reader.fill(kind, name, full, boxes, host)
        out[key] = host.to(like.device)
    return out


def load(trainer: Any, path: str | Path) -> None:
    """This rank's part of a checkpoint written by `save` at any layout (no collective)."""
    d = Path(path)
    index = json.loads((d / INDEX).read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d / INDEX}: format_version {index.get('format_version')}, expected {FORMAT_VERSION}")
    model, optim = trainer.model, trainer.optim
    params = dict(model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    if optim.mixed and not index["mixed"]:
        raise ValueError(f"trainer checkpoint {d} has no fp32 master weights but the model is bf16 "
                         "(it was saved with trainer.dtype=float32)")
    local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    kinds = {"model": local, "master": params if optim.mixed else {},
             **{key: params if index["adam_step"] is not None else {} for key in parallel_checkpoint.MOMENTS}}
    with contextlib.ExitStack() as stack:
        reader = _Reader(d, index, stack)
        for kind, named in kinds.items():  # every name, shape and file first: a bad checkpoint changes nothing
            for key, like in named.items():
                reader.check(kind, *_layout(model, key, like, params)[:2])
        for key, own in local.items():  # one tensor at a time, straight into the model
            with torch.no_grad():
                own.copy_(_read(reader, "model", model, {key: own}, params)[key])
        if optim.mixed:
            for n, m in zip(names, optim.masters):
                with torch.no_grad():
                    m.copy_(_read(reader, "master", model, {n: m}, params)[n])
        moments = {key: _read(reader, key, model, params, params) for key in parallel_checkpoint.MOMENTS} \
            if index["adam_step"] is not None else None
    parallel_checkpoint.set_optimizer_state(trainer, index["hyper"], index["scheduler"], int(index["step"]),
                                            index["adam_step"], moments)
