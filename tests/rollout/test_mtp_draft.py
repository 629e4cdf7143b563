"""The MTP draft's per-request layer caches (rollout.mtp_draft) against the full-history MTP (rollout.mtp.MTPHead.chain,
the trainer's form): the draft logits of every depth agree at every step, across rejected and accepted drafts,
requests joining a running batch, prompts longer than the MTP's reach, skipped drafts, a retried step and a
weight update of the MTP layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mopd.toy.models import create_toy_mimo
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.hf_server_model import ModelRunner, StepInput
from rollout.hf_server_speculative import keep_hidden
from rollout.mtp_draft import MTPDrafter

K = 3
WINDOW = 5


@dataclass
class _Req:
    tokens: list[int]
    kv: list | None = None
    kv_len: int = 0
    hidden: torch.Tensor | None = None


@pytest.fixture(scope="module")
def mimo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_toy_mimo(tmp_path_factory.mktemp("mimo") / "m", build_char_tokenizer(), mtp_layers=K,
                           num_layers=4, sliding_window=WINDOW)


def _prefill(runner: ModelRunner, req: _Req) -> None:
    """As the scheduler's prefill: cache the prompt but its last token, keep the MTP's reach of hidden rows."""
    out = runner.step([StepInput(kv=None, kv_len=0, new_ids=req.tokens[:-1])])[0]
    req.kv, req.kv_len = out.kv, len(req.tokens) - 1
    req.hidden = out.hidden[-runner.mtp.receptive_field():]


def _advance(runner: ModelRunner, reqs: list[_Req], drafts: list[list[int]], accept: list[int], g: torch.Generator
             ) -> None:
    """One verify forward; request b keeps accept[b] drafts plus one other token (a rejection when < K)."""
    outs = runner.step([StepInput(kv=r.kv, kv_len=r.kv_len, new_ids=r.tokens[r.kv_len:] + d)
                        for r, d in zip(reqs, drafts)])
    for r, d, a, out in zip(reqs, drafts, accept, outs):
        other = int(torch.randint(5, 60, (1,), generator=g))
        while a < len(d) and other == d[a]:
            other = int(torch.randint(5, 60, (1,), generator=g))
        r.tokens += d[:a] + [other]
        keep = r.kv_len + a + 1
        r.kv = [(k[:, :keep], v[:, :keep]) for k, v in out.kv]
        r.kv_len = keep
        r.hidden = keep_hidden(r.hidden, out.hidden[:a + 1], runner.mtp.receptive_field(K))


def _reference(runner: ModelRunner, req: _Req, drafts: list[int]) -> list[torch.Tensor]:
    """Draft logits per depth at the request's last cached position from the whole history."""
    model, last = runner.model, req.kv_len - 1
    seen: dict[str, torch.Tensor] = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
    try:
        with torch.no_grad():
            model(torch.tensor([req.tokens[:last + 1]]))
            next_ids = torch.tensor([req.tokens[1:last + 2] + drafts[:K - 1]])
            logits = runner.mtp.chain(model, seen["h"], next_ids, torch.arange(last + 1)[None],
                                      torch.ones(1, last + 1, dtype=torch.bool), depths=K)
    finally:
        hook.remove()
    return [lg[0, -1] for lg in logits]


def _check(runner: ModelRunner, drafter: MTPDrafter, reqs: list[_Req]) -> list[list[int]]:
    picks = [torch.Generator().manual_seed(len(r.tokens)) for r in reqs]

    def pick(_k: int, logits: torch.Tensor) -> list[int]:  # sampled drafts: rejections and acceptances vary
        return [int(torch.multinomial(torch.softmax(lg, -1), 1, generator=g)) for lg, g in zip(logits, picks)]

    drafts, logits = drafter.draft(reqs, K, pick)
    for b, r in enumerate(reqs):
        for k, ref in enumerate(_reference(runner, r, drafts[b])):
            assert torch.allclose(logits[k][b], ref, atol=1e-4), (b, k, float((logits[k][b] - ref).abs().max()))
    return drafts


def test_cached_drafts_equal_the_full_history_mtp(mimo: Path) -> None:
    runner = ModelRunner.load(str(mimo))
    drafter = MTPDrafter(runner, K)
    g = torch.Generator().manual_seed(0)
    a = _Req(tokens=torch.randint(5, 60, (4,), generator=g).tolist())
    _prefill(runner, a)
    for step in range(14):  # rejections and full acceptances, 8x the window
        drafts = _check(runner, drafter, [a])
        _advance(runner, [a], drafts, [(0, K, 1, 2, K)[step % 5]], g)
    start = drafter.states[id(a)].start
    assert start == 0 and a.kv_len > 8 * WINDOW  # one state all along: each draft ran the new positions only
    # a request joins the running one, its prompt longer than the MTP's reach (its state starts from a window)
    b = _Req(tokens=torch.randint(5, 60, (3 * drafter.reach,), generator=g).tolist())
    _prefill(runner, b)
    for step in range(6):
        drafts = _check(runner, drafter, [a, b])
        _advance(runner, [a, b], drafts, [(2, 0, K)[step % 3], (K, 1, 0)[step % 3]], g)
    assert drafter.states[id(a)].start == start
    assert drafter.states[id(b)].start == 3 * drafter.reach - 1 - drafter.reach  # its prefill's last `reach` rows
    # a step without drafts for `a` (as at its length limit), then a retried draft at the same position
    _advance(runner, [a], [[]], [0], g)
    _check(runner, drafter, [a, b])
    assert drafter.states[id(a)].start == start
    drafts = _check(runner, drafter, [a, b])
    assert drafter.states[id(a)].start > start  # started over from its window
    _advance(runner, [a, b], drafts, [1, 1], g)
    # the MTP layers change under a running request: its cached keys and values must not be reused
    drafter.retain([a])
    assert list(drafter.states) == [id(a)]
    state = load_file(str(mimo / "model.safetensors"))
    noise = {n: t + 0.5 * torch.randn(t.shape, generator=g) for n, t in state.items() if n.startswith("model.mtp.")}
    before = drafter.states[id(a)].layers[1].keys.clone()
    runner.load_named_tensors(noise)
    drafts = _check(runner, drafter, [a])
    assert not torch.allclose(drafter.states[id(a)].layers[1].keys[:, :before.shape[1]], before, atol=1e-3)
    _advance(runner, [a], drafts, [K], g)
    _check(runner, drafter, [a])
