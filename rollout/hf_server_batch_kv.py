"""The local engine's KV cache as one batched tensor per layer that steps feed into, not rebuild.

A step's cache is [rows, heads, width, dim] per layer plus the position of every key column
(`BatchKV.kpos`, -1 where a row has no key). A request's cache is a row of one step's `BatchKV`
(`RowKV`, positions [0, length)). The next step takes the rows of the requests it runs from
the states they live in (one index_select per layer and state; none at all when a decode step runs
exactly the previous step's requests) and pads the parts to one width, so a step's KV work does
not grow with batch x context in Python calls. Keys of other positions (padding, drafts a
speculative step rejected, a parent's tail a child did not take) stay in the tensor masked out;
leading columns no row uses are cut and a state with more than `_SLACK` such columns per row is
compacted, so the width stays near the longest row. A request's own (K, V) per layer are
materialised only when asked (`RowKV[layer]`, a session context, a test).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LayerKV = tuple[torch.Tensor, torch.Tensor]
_SLACK = 32  # masked columns tolerated per state before it is compacted (plus half the longest row)


@dataclass(eq=False)
class BatchKV:
    """One step's cache: per layer (K, V) [rows, heads, width, dim], kpos [rows, width] (-1 = no key)."""
    layers: list[LayerKV]
    kpos: torch.Tensor
    lengths: list[int]  # each row's positions [0, length) are keys, each exactly once


class RowKV(Sequence[LayerKV]):
    """A request's cache: positions [0, length) of one row of a BatchKV; reads like a list of (K, V)."""

    def __init__(self, state: BatchKV, row: int, length: int) -> None:
        self.state, self.row, self.length = state, row, length
        self._own: list[LayerKV] | None = None

    def __len__(self) -> int:
        return len(self.state.layers)

    def __getitem__(self, layer: int) -> LayerKV:  # type: ignore[override]
        return self.materialize()[layer]

    def __iter__(self) -> Iterator[LayerKV]:
        return iter(self.materialize())

    def prefix(self, n: int) -> RowKV:
        """The first n positions (a speculative step keeps only what it accepted)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"prefix of {n} positions from a cache of {self.length}")
        return RowKV(self.state, self.row, n)

    def materialize(self) -> list[LayerKV]:
        """This request's own contiguous (K, V) [heads, length, dim] per layer, made once."""
        if self._own is None:
            kp = self.state.kpos[self.row]
            cols = torch.nonzero((kp >= 0) & (kp < self.length)).flatten()
            self._own = [(k[self.row].index_select(1, cols.to(k.device)), v[self.row].index_select(1, cols.to(v.device)))
                         for k, v in self.state.layers]
        return self._own


KV = list[LayerKV] | RowKV


def own_kv(kv: KV | None) -> list[LayerKV] | None:
    """Contiguous per-request tensors: what a session keeps, so it holds no step's whole batch alive."""
    if kv is None:
        return None
    return kv.materialize() if isinstance(kv, RowKV) else [(k.contiguous(), v.contiguous()) for k, v in kv]


@dataclass
class _Part:
    rows: list[int]  # indices into the step's inputs, in this part's row order
    layers: list[LayerKV] | None
    kpos: torch.Tensor  # [len(rows), width]


@dataclass
class Assembled:
    """A step's past: the inputs' order in the batch, per layer (K, V) and kpos, all of one width."""
    order: list[int]
    layers: list[LayerKV] | None
    kpos: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.kpos.shape[1])


def assemble(kvs: list[KV | None], lens: list[int], device: torch.device) -> Assembled:
    """Gather the inputs' caches (`kvs[i]`, positions [0, lens[i])) into one padded batch past.

    Rows already in a step's BatchKV are taken from it as a block; caches given as lists (a session
    child, a caller's own tensors) are copied in right-aligned; requests with no cache get padding.
    """
    by_state: dict[int, tuple[BatchKV, list[int]]] = {}
    loose, fresh = [], []
    for i, (kv, n) in enumerate(zip(kvs, lens)):
        if n == 0 or kv is None:
            fresh.append(i)
        elif isinstance(kv, RowKV):
            if n > kv.length:
                raise ValueError(f"kv_len {n} exceeds the request's cache of {kv.length} positions")
            by_state.setdefault(id(kv.state), (kv.state, []))[1].append(i)
        else:
            loose.append(i)
    parts = [_from_state(state, rows, kvs, lens) for state, rows in by_state.values()]
    if loose:
        parts.append(_from_lists(loose, kvs, lens, device))
    ref = next((p.layers for p in parts if p.layers is not None), None)
    width = max((int(p.kpos.shape[1]) for p in parts), default=0)
    if fresh:
        parts.append(_Part(fresh, None, torch.full((len(fresh), 0), -1, dtype=torch.long)))
    order = [i for p in parts for i in p.rows]
    kpos = torch.cat([F.pad(p.kpos, (width - p.kpos.shape[1], 0), value=-1) if p.kpos.shape[1] < width else p.kpos
                      for p in parts])
    if ref is None or width == 0:
        return Assembled(order, None, kpos[:, :0])
    layers = []
    for layer, (rk, rv) in enumerate(ref):
        ks, vs = [], []
        for p in parts:
            if p.layers is None:
                ks.append(rk.new_zeros(len(p.rows), rk.shape[1], width, rk.shape[3]))
                vs.append(rv.new_zeros(len(p.rows), rv.shape[1], width, rv.shape[3]))
            else:
                k, v = p.layers[layer]
                pad = width - k.shape[2]
                ks.append(F.pad(k, (0, 0, pad, 0)) if pad else k)
                vs.append(F.pad(v, (0, 0, pad, 0)) if pad else v)
        layers.append((torch.cat(ks) if len(ks) > 1 else ks[0], torch.cat(vs) if len(vs) > 1 else vs[0]))
    return Assembled(order, layers, kpos)


def _from_state(state: BatchKV, rows: list[int], kvs: list[KV | None], lens: list[int]) -> _Part:
    """Rows of one state: selected, their masked columns cut at the left or compacted away."""
    src = [kvs[i].row for i in rows]  # type: ignore[union-attr]
    want = [lens[i] for i in rows]
    whole = src == list(range(len(state.lengths)))
    index = None if whole else torch.tensor(src)
    kpos = state.kpos if index is None else state.kpos.index_select(0, index)
    if want != [state.lengths[r] for r in src]:
        kpos = kpos.masked_fill(kpos >= torch.tensor(want)[:, None], -1)
    layers = state.layers if index is None else [(k.index_select(0, index.to(k.device)),
                                                   v.index_select(0, index.to(v.device))) for k, v in state.layers]
    used = torch.nonzero((kpos >= 0).any(0)).flatten()
    first = int(used[0]) if used.numel() else kpos.shape[1]
    longest = max(want)
    if kpos.shape[1] - first > longest + _SLACK + longest // 2:
        return _compact(rows, layers, kpos, longest)
    if first:
        kpos = kpos[:, first:]
        layers = [(k[:, :, first:], v[:, :, first:]) for k, v in layers]
    return _Part(rows, layers, kpos)


def _compact(rows: list[int], layers: list[LayerKV], kpos: torch.Tensor, longest: int) -> _Part:
    """Move every row's keys to the right end in position order: width = the longest row."""
    cols = torch.arange(kpos.shape[1]).expand_as(kpos)
    src = torch.where(kpos >= 0, cols, -1).sort(dim=1).values[:, -longest:]  # used columns last, in order
    present = src >= 0
    src = src.clamp(min=0)
    new_kpos = torch.where(present, kpos.gather(1, src), -1)
    out = []
    for k, v in layers:
        idx = src.to(k.device)[:, None, :, None]
        out.append((k.gather(2, idx.expand(k.shape[0], k.shape[1], longest, k.shape[3])),
                    v.gather(2, idx.expand(v.shape[0], v.shape[1], longest, v.shape[3]))))
    return _Part(rows, out, new_kpos)


def _from_lists(rows: list[int], kvs: list[KV | None], lens: list[int], device: torch.device) -> _Part:
    """Caches given as per-layer lists, copied right-aligned into one block."""
    width = max(lens[i] for i in rows)
    kpos = torch.full((len(rows), width), -1, dtype=torch.long)
    for j, i in enumerate(rows):
        kpos[j, width - lens[i]:] = torch.arange(lens[i])
    layers = []
    first: list[LayerKV] = kvs[rows[0]]  # type: ignore[assignment]
    for layer, (rk, rv) in enumerate(first):
        k = rk.new_zeros(len(rows), rk.shape[0], width, rk.shape[2], device=device)
        v = rv.new_zeros(len(rows), rv.shape[0], width, rv.shape[2], device=device)  # v_head_dim may differ
        for j, i in enumerate(rows):
            ck, cv = kvs[i][layer]  # type: ignore[index]
            k[j, :, width - lens[i]:] = ck[:, :lens[i]]
            v[j, :, width - lens[i]:] = cv[:, :lens[i]]
        layers.append((k, v))
    return _Part(rows, layers, kpos)
