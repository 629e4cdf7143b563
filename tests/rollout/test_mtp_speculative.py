"""MiMo-V2-Flash in the local server (R3, sessions, weights incl. MTP) and MTP self-speculative decoding:
greedy output, logprobs and routed experts identical to the plain server; sampling distribution-preserving."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM

from mopd.toy.models import create_toy_mimo
from mopd.toy.mtp import train_mtp_heads
from mopd.toy.tokenizer import build_char_tokenizer
from rollout import hf_server, hf_server_speculative
from tests.rollout.conftest import ServerProc

K = 3
WINDOW = 5
R3 = "--enable-return-routed-experts"


@pytest.fixture(scope="module")
def mimo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer MiMo (window 5) with 3 MTP layers trained on its own greedy continuations."""
    path = create_toy_mimo(tmp_path_factory.mktemp("mimo") / "m", build_char_tokenizer(), mtp_layers=K,
                           num_layers=4, sliding_window=WINDOW)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 60, (6,), generator=g).tolist() for _ in range(32)]
    train_mtp_heads(path, prompts, steps=40, batch=8, new_tokens=16, temperature=0.0)
    return path


@pytest.fixture(scope="module")
def servers(mimo: Path) -> Iterator[dict[str, ServerProc]]:
    procs = {"plain": ServerProc(mimo, R3, "--max-context-len", "256"),
             "spec": ServerProc(mimo, R3, "--max-context-len", "256", *hf_server_speculative.cli_args(K))}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _batch(srv: ServerProc, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(srv.generate, bodies))


def _experts(reply: dict[str, Any], n_layers: int = 4, top_k: int = 2) -> np.ndarray:
    raw = base64.b64decode(reply["meta_info"]["routed_experts"])
    return np.frombuffer(raw, dtype="<i4").reshape(-1, n_layers, top_k)


def _gen(ids: list[int], n: int, **sampling: Any) -> dict[str, Any]:
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0, **sampling},
            "return_logprob": True, "return_routed_experts": True}


def test_greedy_identical_batched_long_with_target_logprobs_and_experts(servers, mimo):
    """Batch of 6, 40 tokens (8x the sliding window): tokens, logprobs and R3 rows equal the plain server's."""
    bodies = [_gen(p, 40, ignore_eos=True) for p in _prompts(6)]
    plain, spec = _batch(servers["plain"], bodies), _batch(servers["spec"], bodies)
    accepted = 0
    for a, b in zip(plain, spec):
        assert b["output_ids"] == a["output_ids"]
        la = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
        lb = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
        assert np.allclose(la, lb, atol=1e-4)
        ea, eb = _experts(a), _experts(b)
        assert ea.shape == eb.shape == (len(bodies[0]["input_ids"]) * 0 + len(a["output_ids"]) - 1 +
                                        a["meta_info"]["prompt_tokens"], 4, 2)
        assert np.array_equal(np.sort(ea[:, 1:], -1), np.sort(eb[:, 1:], -1))
        m = b["meta_info"]
        assert "spec_verify_ct" not in a["meta_info"]
        assert m["spec_num_proposed_drafts"] > 0 and m["spec_verify_ct"] < len(b["output_ids"])
        assert m["spec_accept_length"] == pytest.approx(len(b["output_ids"]) / m["spec_verify_ct"])
        accepted += m["spec_num_correct_drafts"]
    assert accepted > 0
    # the routed experts are the HF router's own top-k on the full sequence (R3 replays these)
    hf = AutoModelForCausalLM.from_pretrained(mimo, dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda _m, _i, out, i=i: seen.update({i: out[2]}))
    full = bodies[0]["input_ids"] + spec[0]["output_ids"]
    with torch.no_grad():
        hf(torch.tensor([full[:-1]]))
    eb = _experts(spec[0])
    for i, idx in seen.items():
        assert np.array_equal(np.sort(eb[:, i], -1), np.sort(idx.numpy(), -1)), i


def test_session_turns_identical(servers):
    outs = {}
    for name, srv in servers.items():
        sid = srv.post("/open_session", {"capacity_of_str_len": 1000})[1]
        rid, turns = None, []
        for t, p in enumerate(_prompts(3, seed=5)):
            body = _gen(p, 12, ignore_eos=True)
            body["rid"] = f"{name}-{t}"
            body["session_params"] = {"id": sid, "rid": rid}
            reply = srv.generate(body)
            turns.append((reply["output_ids"], reply["meta_info"]["cached_tokens"]))
            rid = body["rid"]
        outs[name] = turns
    assert outs["spec"] == outs["plain"] and outs["spec"][-1][1] > 0
    info = servers["spec"].get("/model_info")[1]
    assert info["speculative_num_steps"] == K and info["mtp_layers"] == K
    assert servers["plain"].get("/model_info")[1]["speculative_num_steps"] == 0


def _chisquare_p(obs: np.ndarray, exp: np.ndarray) -> float:
    """Pearson's chi-square goodness-of-fit p-value (survival function of chi2 with len-1 dof)."""
    x = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def test_sampling_preserves_the_target_distribution(servers, mimo):
    """Chi-square of the 2nd and 3rd sampled tokens (both from verify steps) against the exact marginals."""
    prompt = [11, 23, 35, 47]
    n = 600
    bodies = [{"input_ids": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 1.0, "top_k": 6,
                                                        "ignore_eos": True, "sampling_seed": s}}
              for s in range(n)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(servers["spec"].generate, bodies))
    assert sum(r["meta_info"]["spec_num_correct_drafts"] for r in replies) > n // 20  # both paths taken
    hf = AutoModelForCausalLM.from_pretrained(mimo, dtype=torch.float32).eval()
    from rollout.hf_server_sampling import sampling_probs

    def probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        return sampling_probs(logits, temperature=1.0, top_p=1.0, top_k=6, banned=[])

    p1 = probs(prompt)
    p2 = torch.zeros_like(p1)
    p3 = torch.zeros_like(p1)
    for a in torch.nonzero(p1).flatten().tolist():
        q2 = probs(prompt + [a])
        p2 += p1[a] * q2
        for b in torch.nonzero(q2).flatten().tolist():
            p3 += p1[a] * q2[b] * probs(prompt + [a, b])
    for pos, exact in ((1, p2), (2, p3)):
        counts = np.bincount([r["output_ids"][pos] for r in replies], minlength=exact.numel())
        expected = exact.numpy() * n
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        keep = exp > 0
        pval = _chisquare_p(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum())
        print(f"token {pos + 1}: chi-square p = {pval:.3f} over {int(big.sum())} bins")
        assert pval > 1e-3


def test_weight_updates_reach_the_mtp_layers(servers, mimo, tmp_path):
    """Random MTP weights by tensor: output unchanged, acceptance drops; the checkpoint from disk restores it."""
    srv = servers["spec"]
    body = _gen(_prompts(1, seed=9)[0], 30, ignore_eos=True)
    before = srv.generate(body)
    state = load_file(str(mimo / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    noise = {n: torch.randn(t.shape, generator=g) for n, t in state.items() if n.startswith("model.mtp.")}
    blob = base64.b64encode(save(noise)).decode()
    assert srv.post("/begin_weight_update", {})[0] == 200
    status, reply = srv.post("/update_weights_from_tensor", {"serialized_named_tensors": [blob],
                                                             "load_format": "safetensors"})
    assert status == 200, reply
    assert srv.post("/end_weight_update", {})[0] == 200
    noisy = srv.generate(body)
    assert noisy["output_ids"] == before["output_ids"]
    assert noisy["meta_info"]["spec_num_correct_drafts"] < before["meta_info"]["spec_num_correct_drafts"]
    status, reply = srv.post("/update_weights_from_disk", {"model_path": str(mimo)})
    assert status == 200, reply
    again = srv.generate(body)
    assert again["output_ids"] == before["output_ids"]
    assert again["meta_info"]["spec_num_correct_drafts"] == before["meta_info"]["spec_num_correct_drafts"]


def test_flags(tmp_path):
    ok = hf_server.parse_args(["--model-path", "x", *hf_server_speculative.cli_args(2)])
    assert hf_server_speculative.num_steps(ok) == 2
    assert hf_server_speculative.num_steps(hf_server.parse_args(["--model-path", "x"])) == 0
    assert hf_server_speculative.cli_args(0) == []
    for bad in (["--speculative-num-steps", "2"],
                ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2",
                 "--speculative-num-draft-tokens", "4"],
                ["--speculative-algorithm", "EAGLE", "--speculative-eagle-topk", "4"]):
        with pytest.raises(SystemExit):
            hf_server_speculative.num_steps(hf_server.parse_args(["--model-path", "x", *bad]))


def test_speculation_needs_mtp_layers(tmp_path):
    from mopd.toy.models import create_tiny_model

    qwen = create_tiny_model(tmp_path / "qwen", build_char_tokenizer(), arch="qwen3")
    srv = ServerProc(qwen, *hf_server_speculative.cli_args(2))
    with pytest.raises(RuntimeError, match="needs a model with MTP layers"):
        srv.wait_ready(timeout=120)


def test_stop_tokens_min_new_tokens_and_late_joiners(servers):
    """A stop token inside an accepted draft run ends the request there; min_new_tokens bans it before; a
    request joining a running batch (prefill next to verify steps) still decodes identically."""
    prompt = _prompts(1, seed=11)[0]
    ref = servers["plain"].generate(_gen(prompt, 30, ignore_eos=True))["output_ids"]
    stop = ref[12]
    for extra in ({"stop_token_ids": [stop]}, {"stop_token_ids": [stop], "min_new_tokens": ref.index(stop) + 2}):
        body = _gen(prompt, 30, ignore_eos=True, **extra)
        a, b = servers["plain"].generate(body), servers["spec"].generate(body)
        assert b["output_ids"] == a["output_ids"] and b["meta_info"]["finish_reason"] == a["meta_info"]["finish_reason"]
    long_body, short = _gen(prompt, 60, ignore_eos=True), [_gen(p, 10, ignore_eos=True) for p in _prompts(3, seed=12)]
    with ThreadPoolExecutor(4) as pool:
        for name in ("plain", "spec"):
            first = pool.submit(servers[name].generate, long_body)
            later = list(pool.map(servers[name].generate, short))
            servers[name].result = ([r["output_ids"] for r in later], first.result()["output_ids"])
    assert servers["spec"].result == servers["plain"].result
