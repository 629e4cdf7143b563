"""MTP self-speculative decoding in the local HF server (`--speculative-num-steps K`, SGLang's flags).

Each decode step of a request drafts K tokens with the model's MTP layers (rollout.mtp, chained on
the main model's pre-norm hidden states, each layer keeping its own keys and values per request:
rollout.mtp_draft), then feeds [last sampled token, d_1..d_K]
to the main model in one forward (batched with every other request's step) and keeps the longest
accepted prefix plus one token of the target model:
- T = 0: a draft is accepted when it equals the target's argmax, so the output is the
  non-speculative greedy output;
- T > 0: rejection sampling (Leviathan et al. / Chen et al.): accept d with probability
  min(1, p(d)/q(d)), else sample from norm(max(p - q, 0)); p is the request's own sampling
  distribution (temperature, top-k, top-p, min_new_tokens), q the draft's softmax(logits/T). The
  emitted tokens are distributed exactly as non-speculative sampling from p.
Logprobs, top logprobs and routed experts of every emitted token come from the target forward,
never from the draft. The KV cache, routing rows and hidden states of rejected positions are cut
off (caches keep every key: sliding-window layers are masked by position, see hf_server_model).
Per request, SGLang's counters: `spec_verify_ct` (decode forwards), `spec_num_correct_drafts`,
`spec_num_proposed_drafts`; the response derives `spec_accept_length` and `spec_accept_rate` from
them as SGLang's tokenizer manager does.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

import torch

from rollout.hf_server_model import StepInput, StepOutput
from rollout.hf_server_sampling import sample_token, sampling_probs, temperature_logprobs
from rollout.mtp_draft import MTPDrafter
from rollout.speculative import cli_args  # noqa: F401 - re-exported: the flags this module parses

if TYPE_CHECKING:
    from rollout.hf_server_scheduler import Request, Scheduler

log = logging.getLogger(__name__)
ALGORITHMS = ("EAGLE", "NEXTN", "MTP")


def add_args(p: argparse.ArgumentParser) -> None:
    """SGLang's speculative-decoding flags (as the MiMo-V2-Flash README launches SGLang)."""
    p.add_argument("--speculative-algorithm", default=None, choices=ALGORITHMS,
                   help="enable MTP self-speculative decoding (the model's own MTP layers draft)")
    p.add_argument("--speculative-num-steps", type=int, default=None, help="draft tokens per verify (K)")
    p.add_argument("--speculative-eagle-topk", type=int, default=None, help="only 1 (a chain, no tree)")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None, help="K + 1 (SGLang's meaning)")


def num_steps(args: argparse.Namespace) -> int:
    """K from the flags (0 = off); SystemExit with the reason when they disagree."""
    algo, steps = args.speculative_algorithm, args.speculative_num_steps
    draft, topk = args.speculative_num_draft_tokens, args.speculative_eagle_topk
    if algo is None:
        if any(v is not None for v in (steps, draft, topk)):
            raise SystemExit("--speculative-num-steps/--speculative-num-draft-tokens need --speculative-algorithm")
        return 0
    if steps is None:
        steps = draft - 1 if draft is not None else 3
    if steps < 1:
        raise SystemExit(f"--speculative-num-steps must be >= 1, got {steps}")
    if draft is not None and draft != steps + 1:
        raise SystemExit(f"--speculative-num-draft-tokens must be --speculative-num-steps + 1 = {steps + 1} "
                         f"(a chain of drafts, eagle top-k 1), got {draft}")
    if topk not in (None, 1):
        raise SystemExit(f"--speculative-eagle-topk: only 1 is supported by the local server, got {topk}")
    return steps


def keep_hidden(old: torch.Tensor | None, new: torch.Tensor | None, limit: int) -> torch.Tensor | None:
    """Append a step's pre-norm hidden rows to a request's and keep the last `limit` (the MTP's reach)."""
    if new is None or limit <= 0:
        return old
    out = new if old is None else torch.cat([old, new])
    return out[-limit:]


def spec_meta(req: Request) -> dict[str, Any]:
    """SGLang's per-request speculative metrics (tokenizer_manager): accept length includes the bonus token."""
    if req.spec_verify_ct <= 0:
        return {}
    meta: dict[str, Any] = {"spec_verify_ct": req.spec_verify_ct,
                            "spec_accept_length": len(req.output_ids) / req.spec_verify_ct,
                            "spec_num_correct_drafts": req.spec_correct, "spec_num_proposed_drafts": req.spec_proposed}
    if req.spec_proposed > 0:
        meta["spec_accept_rate"] = req.spec_correct / req.spec_proposed
    return meta


class SpeculativeDecoder:
    """Drafts with the runner's MTP head and verifies in the scheduler's batched step."""

    def __init__(self, runner: Any, k: int) -> None:
        if runner.mtp is None:
            raise SystemExit("speculative decoding needs a model with MTP layers (model.mtp.layers.* in the "
                             "checkpoint, MiMo-V2-Flash); this checkpoint has none")
        if k > len(runner.mtp):
            raise SystemExit(f"--speculative-num-steps {k} exceeds the checkpoint's {len(runner.mtp)} MTP layers")
        self.runner, self.k = runner, k
        self.window = runner.mtp.receptive_field(k)
        self.drafter = MTPDrafter(runner, k)

    def depth(self, req: Request) -> int:
        """Draft tokens for this step: 0 while prefilling, without hidden states, or at the length limit."""
        if req.hidden is None or req.kv_len != len(req.tokens) - 1 or not req.output_ids:
            return 0
        return max(0, min(self.k, req.sampling.max_new_tokens - len(req.output_ids) - 1))

    def step(self, sched: Scheduler, batch: list[Request]) -> list[tuple[Request, Exception]]:
        """Model thread: draft for the decoding requests, one verify/prefill forward, accept per request."""
        self.drafter.retain(batch)
        ks = [self.depth(r) for r in batch]
        drafts: list[list[int]] = [[] for _ in batch]
        qs: list[list[torch.Tensor]] = [[] for _ in batch]
        rows = [i for i, k in enumerate(ks) if k > 0]
        if rows:
            try:
                reqs = [batch[i] for i in rows]
                d, q = self.drafter.draft(reqs, max(ks[i] for i in rows), self._pick(reqs))
                for j, i in enumerate(rows):
                    drafts[i], qs[i] = d[j][:ks[i]], [x[j] for x in q[:ks[i]]]
            except Exception:
                log.exception("MTP draft failed; decoding without drafts this step")
        inputs = [StepInput(kv=r.kv, kv_len=r.kv_len, new_ids=r.tokens[r.kv_len:] + drafts[i],
                            want_prompt_logits=(r.return_logprob and r.logprob_start_len >= 0
                                                and r.kv_len < r.prompt_len),
                            temperature=r.sampling.temperature, want_logits=bool(drafts[i]))
                  for i, r in enumerate(batch)]
        try:
            outs = self.runner.step(inputs)
        except Exception as e:
            if len(batch) == 1:
                log.exception("forward failed for request %r", batch[0].rid)
                return [(batch[0], e)]
            return [f for req in batch for f in self.step(sched, [req])]
        failed: list[tuple[Request, Exception]] = []
        for i, (req, x, out) in enumerate(zip(batch, inputs, outs)):
            try:
                decoding = bool(req.output_ids)
                if drafts[i]:
                    self._verify(sched, req, out, drafts[i], qs[i])
                else:
                    sched._advance(req, x, out)
                req.spec_verify_ct += int(decoding)
            except Exception as e:
                log.exception("sampling failed for request %r", req.rid)
                failed.append((req, e))
        return failed

    def _pick(self, reqs: list[Request]) -> Any:
        """Each depth's draft token per request: the argmax at T = 0, else a sample of softmax(logits / T)."""
        def pick(_k: int, logits: torch.Tensor) -> list[int]:
            out = []
            for b, r in enumerate(reqs):
                t = r.sampling.temperature
                if t <= 0:
                    out.append(int(torch.argmax(logits[b])))
                else:
                    q = torch.softmax(logits[b].cpu() / t, dim=-1)
                    out.append(int(torch.multinomial(q, 1, generator=r.sampling.generator)))
            return out
        return pick

    def _verify(self, _sched: Scheduler, req: Request, out: StepOutput, drafts: list[int],
                q_logits: list[torch.Tensor]) -> None:
        """Accept the longest valid draft prefix plus one target token; cut caches back to what was kept."""
        from rollout.hf_server_scheduler import _top_k

        s = req.sampling
        logits = out.logits
        assert logits is not None and logits.shape[0] == len(drafts) + 1
        start = req.kv_len
        emitted = 0
        correct = 0
        for j in range(len(drafts) + 1):
            banned = sorted(s.stop_ids) if len(req.output_ids) < s.min_new_tokens else []
            accepted = False
            if j == len(drafts):  # every draft accepted: the bonus token from the last position
                tok = sample_token(logits[j], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                   generator=s.generator, banned=banned)
            elif s.temperature <= 0:
                tok = sample_token(logits[j], temperature=0, top_p=1.0, top_k=-1, generator=None, banned=banned)
                accepted = tok == drafts[j]
            else:
                p = sampling_probs(logits[j], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, banned=banned)
                q = torch.softmax(q_logits[j] / s.temperature, dim=-1)
                d = drafts[j]
                u = float(torch.rand(1, generator=s.generator))
                if u * float(q[d]) < float(p[d]):  # u < p(d)/q(d), without dividing by a tiny q
                    tok, accepted = d, True
                else:
                    resid = torch.clamp(p - q, min=0)
                    resid = resid if float(resid.sum()) > 0 else p
                    tok = int(torch.multinomial(resid / resid.sum(), 1, generator=s.generator))
            lp = temperature_logprobs(logits[j], s.temperature)
            req.output_ids.append(tok)
            req.output_logprobs.append(float(lp[tok]))
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(_top_k(lp, req.top_logprobs_num)[0])
            req.tokens.append(tok)
            emitted += 1
            correct += int(accepted)
            stop = tok in s.stop_ids and len(req.output_ids) >= s.min_new_tokens
            if not accepted or stop or len(req.output_ids) >= s.max_new_tokens:
                break  # the scheduler's _check_done finishes the request from its output
        req.spec_proposed += len(drafts)
        req.spec_correct += correct
        keep = start + emitted  # fed positions kept: the last token before the step and the kept drafts
        req.kv = out.kv.prefix(keep)  # rejected drafts' keys stay masked in the batch cache
        req.kv_len = keep
        if out.routing is not None:
            req.routing.append(out.routing[:emitted])
        req.hidden = keep_hidden(req.hidden, out.hidden[:emitted] if out.hidden is not None else None, self.window)
