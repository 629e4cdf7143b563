"""Full HF-named weights of a sharded trainer, one bucket at a time (what the weight push streams).

Gathering the whole model first (trainer/model_builder.py `canonical_state` + the converter) costs every
rank one full copy of the model. Here each tensor is gathered from its TP / EP shards and pipeline stage
only when its bucket is built, converted to HF names, handed to the consumer and released before the next
bucket is gathered. Peak extra memory on every rank: about one bucket (`bucket_bytes` of HF tensors,
or the largest group of HF tensors cut from one Megatron tensor when that is bigger: a fused
linear_qkv is gathered whole before its q/k/v are cut out), plus the consumer's own copies of that bucket
(e.g. its serialized payload) and the all-gather's receive buffers (gloo allocates its own even for
all_gather_into_tensor: twice the largest TP-split tensor at the peak, measured in benchmarks/weight_push).
tests/trainer/test_sharded_weight_push.py measures it (peak RSS, and `GatherStats` from the storages).

Which Megatron tensors each HF tensor is made of is read off the architecture's own converter
(`Architecture.megatron_to_hf`), run once on shape-only ("meta") tensors that record their sources;
a bucket's HF tensors are then made by the same converter from the bucket's real tensors (the others
stay meta), so the result equals `TrainerRank.hf_state()` bit for bit.

Every rank of the trainer iterates the same buckets (the gathers are collectives); only ranks built with
`keep=True` (the pushing rank) keep and convert them, the others get empty buckets. A consumer must let go
of a bucket before asking for the next (`for b in stream: ...; del b`; not `enumerate(stream)`, whose
cached result tuple holds the previous bucket while the next is gathered).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from trainer import parallel
from trainer.model_builder import TE_ALIASES
from trainer.models import Architecture

Tensor = torch.Tensor
Bucket = list[tuple[str, Tensor]]


@dataclass(frozen=True)
class _Unit:
    """One local weight of one pipeline stage and the full tensors it gathers into."""

    stage: int
    local_key: str
    full: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # (single-rank name, shape, dtype)


@dataclass
class _Group:
    """HF tensors made from the same Megatron tensors (a bucket holds whole groups)."""

    names: list[str]
    units: set[int]
    nbytes: int


@dataclass
class GatherStats:
    """What a pass measured: bytes of gathered tensors alive at once, tracked by their storages (a
    storage counts until its memory is really freed, whoever still holds a view of it)."""

    peak_alive_bytes: int = 0  # most bytes alive right after a bucket was built
    leftover_bytes: int = 0  # most bytes of earlier buckets still alive when the next one was started
    buckets: int = 0
    _alive: dict[int, int] = field(default_factory=dict)  # storage data_ptr -> bytes
    _own: set[int] = field(default_factory=set)  # the model's own storages (a weight that needs no gather)

    def track(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._alive and ptr not in self._own:
                self._alive[ptr] = storage.nbytes()
                weakref.finalize(storage, self._alive.pop, ptr, None)

    @property
    def alive_bytes(self) -> int:
        return sum(self._alive.values())


def canonical_name(key: str) -> str:
    """Local-spec name of a TE-spec weight (the converters read local-spec names)."""
    for local, te in TE_ALIASES.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


def _local_units(model: torch.nn.Module, stage: int) -> list[_Unit]:
    params = dict(model.named_parameters())
    local, offset = parallel.num_local_experts(model), parallel.layer_offset(model)
    ep = ps.get_expert_model_parallel_world_size()
    units = []
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        shape = list(value.shape)
        param = params.get(key)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= parallel.tp_size_of(key)
        expert = parallel.is_expert(key) and ep > 1
        names = [parallel.full_key(key, local, offset, ep_rank=r) for r in range(ep)] if expert else \
            [parallel.full_key(key, local, offset)]
        units.append(_Unit(stage, key, tuple((canonical_name(n), tuple(shape), value.dtype) for n in names)))
    return units


def _all_units(model: torch.nn.Module) -> list[_Unit]:
    """Every stage's units, in stage order (the same list on every rank)."""
    stage = ps.get_pipeline_model_parallel_rank()
    mine = _local_units(model, stage)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return mine
    stages: list[list[_Unit] | None] = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return [u for s in stages for u in (s or [])]


class _Traced(torch.Tensor):
    """A meta tensor that remembers which units it was made from, through any torch operation."""

    units: frozenset[int] = frozenset()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        found: set[int] = set()
        _collect((args, kwargs or {}), found)
        out = super().__torch_function__(func, types, args, kwargs or {})
        _tag(out, frozenset(found))
        return out


def _collect(obj: Any, found: set[int]) -> None:
    if isinstance(obj, _Traced):
        found.update(obj.units)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _collect(x, found)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, found)


def _tag(obj: Any, units: frozenset[int]) -> None:
    if isinstance(obj, _Traced):
        obj.units = obj.units | units
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _tag(x, units)


def _groups(units: list[_Unit], arch: Architecture, hf_config: Any) -> tuple[list[_Group], dict[str, Tensor]]:
    """The HF tensors grouped by the units they are made of, in model order; and the meta state."""
    meta: dict[str, Tensor] = {}
    traced: dict[str, Tensor] = {}
    for i, unit in enumerate(units):
        for name, shape, dtype in unit.full:
            meta[name] = torch.empty(shape, dtype=dtype, device="meta")
            t = meta[name].as_subclass(_Traced)
            t.units = frozenset({i})
            traced[name] = t
    hf = arch.megatron_to_hf(traced, hf_config)
    parent = list(range(len(units)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for name, t in hf.items():
        sources = sorted(getattr(t, "units", ()))
        if not sources:
            raise ValueError(f"{arch.model_type} converter: HF weight {name!r} is made of no model weight")
        for s in sources[1:]:
            parent[root(s)] = root(sources[0])
    by_root: dict[int, _Group] = {}
    for name, t in hf.items():
        r = root(min(t.units))
        group = by_root.setdefault(r, _Group([], set(), 0))
        group.names.append(name)
        group.units.update(t.units)
        group.nbytes += t.numel() * t.element_size()
    return sorted(by_root.values(), key=lambda g: min(g.units)), meta


def _pack(groups: list[_Group], bucket_bytes: int) -> list[list[_Group]]:
    out: list[list[_Group]] = []
    size = 0
    for g in groups:
        if not out or (out[-1] and size + g.nbytes > bucket_bytes):
            out.append([])
            size = 0
        out[-1].append(g)
        size += g.nbytes
    return out


class GatheredBuckets:
    """Iterate to gather the model bucket by bucket (a collective: every trainer rank iterates it, in step).

    `len()` is the number of buckets (the same on every rank); ranks with keep=False get empty buckets.
    """

    def __init__(self, model: torch.nn.Module, arch: Architecture, hf_config: Any, bucket_bytes: int, *,
                 keep: bool) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes: expected >= 1, got {bucket_bytes}")
        self.model, self.arch, self.hf_config, self.keep = model, arch, hf_config, keep
        self.units = _all_units(model)
        groups, self._meta = _groups(self.units, arch, hf_config)
        self._buckets = _pack(groups, bucket_bytes)
        self.nbytes = sum(g.nbytes for g in groups)  # of the whole model's HF tensors
        self.largest_group_bytes = max((g.nbytes for g in groups), default=0)
        self.stats = GatherStats()

    def __len__(self) -> int:
        return len(self._buckets)

    def _gather_unit(self, unit: _Unit, state: dict[str, Tensor], params: dict[str, Tensor],
                     pp_ranks: list[int]) -> dict[str, Tensor]:
        """The unit's full tensors on this rank (after the collectives of its stage and the pipeline)."""
        got: dict[str, Tensor] = {}
        if unit.stage == ps.get_pipeline_model_parallel_rank():
            gathered = parallel.gather_weight(self.model, unit.local_key, state[unit.local_key], params)
            got = {canonical_name(k): v for k, v in gathered.items()}
        if pp_ranks:  # the owning stage hands its full tensors to the other stages
            device = next(self.model.parameters()).device
            for name, shape, dtype in unit.full:
                t = got[name].contiguous() if name in got else torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(t, src=pp_ranks[unit.stage], group=ps.get_pipeline_model_parallel_group())
                got[name] = t
        return got

    def _build(self, groups: list[_Group], state: dict[str, Tensor], params: dict[str, Tensor],
               pp_ranks: list[int]) -> Bucket:
        real: dict[str, Tensor] = {}
        for i in sorted(set().union(*(g.units for g in groups))):
            got = self._gather_unit(self.units[i], state, params, pp_ranks)
            if self.keep:
                real.update(got)
                self.stats.track(list(got.values()))
        if not self.keep:
            return []
        hf = self.arch.megatron_to_hf({**self._meta, **real}, self.hf_config)
        bucket = [(name, hf[name].detach()) for g in groups for name in g.names]
        meta = [name for name, t in bucket if t.device.type == "meta"]
        if meta:
            raise RuntimeError(f"weight gather: HF weights {meta[:4]} were not made from their bucket's tensors")
        self.stats.track([t for _, t in bucket])
        return bucket

    def __iter__(self) -> Iterator[Bucket]:
        pp = ps.get_pipeline_model_parallel_world_size()
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else []
        state = {k: v.detach() for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        params = dict(self.model.named_parameters())
        self.stats._own = {t.untyped_storage().data_ptr() for t in state.values()}
        for groups in self._buckets:
            self.stats.leftover_bytes = max(self.stats.leftover_bytes, self.stats.alive_bytes)
            bucket = self._build(groups, state, params, pp_ranks)
            self.stats.peak_alive_bytes = max(self.stats.peak_alive_bytes, self.stats.alive_bytes)
            self.stats.buckets += 1
            yield bucket
            del bucket
