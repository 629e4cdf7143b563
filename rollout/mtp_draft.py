"""MTP drafting with per-request caches of the MTP layers' keys and values: a step runs new positions only.

Positions: after a draft at P (a request's last position in the main model's KV cache, `kv_len - 1`;
the newest sampled token t_{P+1} is not in it yet), MTP layer k (0-based) at position i reads
t_{i+k+1} and layer k-1's output at i (rollout.mtp), so its values are final, built from verified
tokens only, for i <= P - k. A request's `DraftState` keeps per layer the rotated keys and scaled
values of its last window - 1 final positions and its output at P - k (layer k+1's input there).
The next draft at P' > P runs layer k on positions P - k + 1 .. P' only: the newly verified ones
and the k that read draft tokens (recomputed every step, whatever the verification kept), where
the window recompute ran every layer on K * (window - 1) + 1 positions.

Without a usable state (a new request, a session turn, a weight update, a step retried at the same
position, hidden rows that no longer reach back) a request starts over from its last
`receptive_field(K)` hidden rows. Every cached value that can still reach a later draft's last
position depends on rows inside that span only (each layer's sliding window bounds it), so drafts
equal the full-history computation (tests/rollout/test_mtp_draft.py checks it step by step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rollout.mtp import SLIDING, LayerWeights, MTPHead


@dataclass
class _LayerCache:
    keys: torch.Tensor  # [Hkv, n, head_dim] rotated keys of the layer's last final positions (n < window)
    values: torch.Tensor  # [Hkv, n, v_dim] scaled values
    out: torch.Tensor  # [0 or 1, H] the layer's output at its last final position (the next layer's input)


@dataclass
class DraftState:
    """One request's MTP caches: layer k is final through position `committed - k`."""
    req: Any  # the request it belongs to (keeps its id() from being reused while the entry lives)
    start: int  # first position of the span the state was started from
    committed: int  # P of the draft that built it
    version: int  # the runner's weights_version it was computed with
    layers: list[_LayerCache]


def _left_pad(rows: list[torch.Tensor], length: int, axis: int) -> torch.Tensor:
    """Stack per-request tensors into a batch, right-aligned along `axis` (zeros before)."""
    if len(rows) == 1 and rows[0].shape[axis] == length:
        return rows[0][None]
    shape = list(rows[0].shape)
    shape[axis] = length
    out = rows[0].new_zeros([len(rows), *shape])
    for b, r in enumerate(rows):
        n = r.shape[axis]
        if n:
            out[b].narrow(axis, length - n, n).copy_(r)
    return out


def _positions(spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """[B, length] positions first..last per request, right-aligned, -1 before (padding)."""
    out = torch.full((len(spans), length), -1, dtype=torch.long)
    for b, (first, last) in enumerate(spans):
        n = last - first + 1
        if n > 0:
            out[b, length - n:] = torch.arange(first, last + 1)
    return out


class MTPDrafter:
    """Chains the runner's MTP layers over the batch's requests, keeping each request's layer caches."""

    def __init__(self, runner: Any, k: int) -> None:
        self.runner, self.head, self.k = runner, runner.mtp, k
        self.window = int(self.head.window)
        self.reach = self.head.receptive_field(k)
        self.states: dict[int, DraftState] = {}
        self._cos = self._sin = torch.empty(0)
        self._masks: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    def _rope(self, firsts: list[int], lasts: list[int], q: int, like: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model's sliding-window RoPE (cos, sin) [B, q, rot] at positions first..last per request
        (right-aligned), from a table grown on demand: MiMo-V2-Flash's RoPE depends on the position only."""
        need = max(lasts) + 1
        if need > self._cos.shape[0]:
            n = max(need, 2 * self._cos.shape[0], 256)
            cos, sin = self.runner.model.model.rotary_emb(like, torch.arange(n, device=like.device)[None], SLIDING)
            self._cos, self._sin = cos[0], sin[0]
        if len(lasts) == 1 and lasts[0] - firsts[0] + 1 == q:
            return self._cos[None, firsts[0]:lasts[0] + 1], self._sin[None, firsts[0]:lasts[0] + 1]
        pos = _positions(list(zip(firsts, lasts)), q).clamp(min=0).to(like.device)
        return self._cos[pos], self._sin[pos]

    def _mask(self, past: list[int], counts: list[int], like: torch.Tensor) -> torch.Tensor:
        """[B, 1, 1, q, m + q] additive mask: causal, within the window, real keys only. Keys are [past | new],
        each right-aligned; it depends on the lengths only, so it is cached by them."""
        key = (tuple(past), tuple(counts))
        mask = self._masks.get(key)
        if mask is None:
            # positions relative to each request's first cached key: past 0..n-1, new n..n+count-1
            qpos = _positions([(n, n + c - 1) for n, c in zip(past, counts)], max(counts))
            kpos = torch.cat([_positions([(0, n - 1) for n in past], max(past)), qpos], dim=1)
            dist = qpos[:, :, None] - kpos[:, None, :]
            allowed = (kpos[:, None, :] >= 0) & (dist >= 0) & (dist < self.window)
            mask = torch.where(allowed, 0.0, float("-inf")).to(dtype=like.dtype, device=like.device)[:, None, None]
            if len(self._masks) >= 4096:
                self._masks.clear()
            self._masks[key] = mask
        return mask

    def retain(self, reqs: list[Any]) -> None:
        """Forget the states of requests that are no longer in the batch (finished, aborted, failed)."""
        keep = {id(r) for r in reqs}
        for key in [key for key in self.states if key not in keep]:
            del self.states[key]

    def _state(self, req: Any, depth: int, version: int, weights: list[LayerWeights]) -> DraftState:
        """The request's state if it can be extended to its current position, else a fresh one."""
        last, rows = req.kv_len - 1, req.hidden.shape[0]  # hidden rows: positions [kv_len - rows, kv_len)
        st = self.states.get(id(req))
        if (st is not None and st.req is req and st.version == version and len(st.layers) >= depth
                and st.committed < last and last - max(st.committed + 1, st.start) < rows):
            return st
        start = last - min(rows, self.reach) + 1
        h, dt = req.hidden.shape[1], req.hidden.dtype
        empty = [_LayerCache(keys=req.hidden.new_zeros(w.kv_heads, 0, w.head_dim, dtype=dt),
                             values=req.hidden.new_zeros(w.kv_heads, 0, w.v_dim, dtype=dt),
                             out=req.hidden.new_zeros(0, h)) for w in weights[:depth]]
        return DraftState(req=req, start=start, committed=start - 1, version=version, layers=empty)

    @torch.inference_mode()
    def draft(self, reqs: list[Any], depth: int, pick: Callable[[int, torch.Tensor], list[int]]
              ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Draft `depth` tokens per request (objects with tokens, kv_len and hidden, as the scheduler's
        Request); `pick(k, logits [B, V]) -> list[int]` chooses each depth's tokens. Returns the drafts
        per request and the draft logits [B, V] (CPU) per depth, and stores the requests' new states."""
        version = self.runner.weights_version
        weights = self.head.fast_weights(version)
        model, dev = self.runner.model, self.runner.device
        embed = model.get_input_embeddings()
        states = [self._state(r, depth, version, weights) for r in reqs]
        lasts = [r.kv_len - 1 for r in reqs]
        drafts: list[list[int]] = [[] for _ in reqs]
        new_layers: list[list[_LayerCache]] = [[] for _ in reqs]
        below: list[torch.Tensor] = [r.hidden for r in reqs]  # layer k-1's outputs (h^0 rows for k = 0)
        logits_per_depth = []
        for k in range(depth):
            w = weights[k]
            firsts = [max(st.committed - k + 1, st.start) for st in states]
            counts = [last - first + 1 for first, last in zip(firsts, lasts)]
            hidden_in, ids = [], []
            for b, (r, st) in enumerate(zip(reqs, states)):
                prev = below[b] if k == 0 else torch.cat([st.layers[k - 1].out, below[b]])
                hidden_in.append(prev[prev.shape[0] - counts[b]:])
                ext = r.tokens + drafts[b]  # t_{i+k+1} for i = first..last; past the verified tokens, drafts
                ids.append(ext[firsts[b] + k + 1:lasts[b] + k + 2])
            past = [st.layers[k].keys.shape[1] for st in states]
            q, m = max(counts), max(past)
            hid = _left_pad(hidden_in, q, 0)
            id_rows = torch.tensor([[0] * (q - len(row)) + row for row in ids])
            cos, sin = self._rope(firsts, lasts, q, hid)
            out, keys, values = MTPHead.cached_step(
                w, embed(id_rows.to(dev)), hid, _left_pad([st.layers[k].keys for st in states], m, 1),
                _left_pad([st.layers[k].values for st in states], m, 1), self._mask(past, counts, hid), cos, sin)
            logits = model.lm_head(F.rms_norm(out[:, -1], (out.shape[-1],), w.final_norm, w.eps)).float()
            chosen = pick(k, logits)
            logits_per_depth.append(logits.cpu())
            for b, st in enumerate(states):
                drafts[b].append(int(chosen[b]))
                n = counts[b]
                below[b] = out[b, q - n:]
                # final positions of layer k: <= last - k; keep the last window - 1 of them
                ks = torch.cat([st.layers[k].keys, keys[b, :, q - n:]], dim=1)
                vs = torch.cat([st.layers[k].values, values[b, :, q - n:]], dim=1)
                final = max(0, ks.shape[1] - k)
                lo = max(0, final - (self.window - 1))
                new_layers[b].append(_LayerCache(keys=ks[:, lo:final], values=vs[:, lo:final],
                                                 out=below[b][max(0, n - 1 - k):max(0, n - k)]))
        for b, (r, st) in enumerate(zip(reqs, states)):
            self.states[id(r)] = DraftState(req=r, start=st.start, committed=lasts[b], version=version,
                                            layers=new_layers[b])
        return drafts, logits_per_depth
