"""rollout.hf_server against direct HF forwards: a real server subprocess, real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM

from mopd.toy.tokenizer import build_char_tokenizer
from rollout.sglang_api import decode_routed_experts

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPT = [12, 40, 41, 42, 9, 50, 51, 52, 53]


@pytest.fixture(scope="module")
def hf(tiny_models: dict[str, Path]) -> dict[str, Any]:
    return {k: AutoModelForCausalLM.from_pretrained(p).eval() for k, p in tiny_models.items()}


def hf_forward(model: Any, ids: list[int], temperature: float = 1.0) -> tuple[torch.Tensor, np.ndarray | None]:
    """Log-probs of ids[p] given ids[:p] for p >= 1, and the router's top-k ids per token and layer."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            handles.append(gate.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[2])))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    for h in handles:
        h.remove()
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1)
    token_lp = torch.stack([lp[p - 1, ids[p]] for p in range(1, len(ids))])
    routing = None
    if captured:
        k = cfg.num_experts_per_tok
        routing = np.zeros((len(ids), cfg.num_hidden_layers, k), np.int32)
        for i, idx in captured.items():
            routing[:, i] = idx.numpy()
    return token_lp, routing


def lps(entries: list[list]) -> list[float | None]:
    return [e[0] for e in entries]


def experts(reply: dict[str, Any]) -> np.ndarray:
    return decode_routed_experts(reply["meta_info"]["routed_experts"], 2, 2)


# ---------------------------------------------------------------- generation vs HF
@pytest.mark.parametrize("name", ["r3", "dense"])
def test_greedy_output_and_logprobs_equal_hf(servers, hf, name):
    srv = servers[name]
    reply = srv.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 10, **GREEDY},
                          "return_logprob": True})
    out = reply["output_ids"]
    meta = reply["meta_info"]
    assert len(out) == 10 and meta["finish_reason"] == {"type": "length", "length": 10}
    assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == 10 and meta["cached_tokens"] == 0
    assert [e[1] for e in meta["output_token_logprobs"]] == out
    model = hf["moe" if name == "r3" else "dense"]
    ref, _ = hf_forward(model, PROMPT + out)
    np.testing.assert_allclose(lps(meta["output_token_logprobs"]), ref[len(PROMPT) - 1:].numpy(), atol=1e-5)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + out])).logits[0]
    assert [int(t) for t in logits[len(PROMPT) - 1:-1].argmax(-1)] == out  # greedy really is argmax
    assert "input_token_logprobs" not in meta and "routed_experts" not in meta


def test_prompt_logprobs_for_teacher_scoring(servers, hf):
    seq = PROMPT + [60, 61, 62, 63, 64]
    ref, _ = hf_forward(hf["moe"], seq)
    for start in (0, 4):
        reply = servers["r3"].generate({"input_ids": seq, "sampling_params": {"max_new_tokens": 0},
                                        "return_logprob": True, "logprob_start_len": start})
        meta = reply["meta_info"]
        assert reply["output_ids"] == [] and meta["finish_reason"] == {"type": "length", "length": 0}
        entries = meta["input_token_logprobs"]
        assert [e[1] for e in entries] == seq[start:]
        assert entries[0][0] is None  # as SGLang: no logprob for the token at logprob_start_len
        np.testing.assert_allclose(lps(entries[1:]), ref[start:].numpy(), atol=1e-5)


def test_top_logprobs_at_prompt_and_output_positions_equal_hf(servers, hf):
    """top_logprobs_num (teacher top-k scoring): SGLang's [logprob, token_id, text] per position, best first."""
    seq = PROMPT + [60, 61, 62]
    with torch.no_grad():
        full = torch.log_softmax(hf["moe"](torch.tensor([seq])).logits[0].float(), -1)
    start, k = 5, 4
    reply = servers["r3"].generate({"input_ids": seq, "sampling_params": {"max_new_tokens": 2, "temperature": 0.0},
                                    "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": k})
    tops = reply["meta_info"]["input_top_logprobs"]
    assert len(tops) == len(seq) - start and tops[0] is None  # as SGLang: none at logprob_start_len
    for p, row in zip(range(start + 1, len(seq)), tops[1:]):
        want_lp, want_ids = torch.topk(full[p - 1], k)
        assert [e[1] for e in row] == want_ids.tolist()
        np.testing.assert_allclose([e[0] for e in row], want_lp.numpy(), atol=1e-5)
    out_tops = reply["meta_info"]["output_top_logprobs"]
    assert len(out_tops) == 2 and all(len(row) == k for row in out_tops)
    # greedy: the sampled token is the most likely one, with the same logprob as output_token_logprobs
    for row, (lp, tok, _) in zip(out_tops, reply["meta_info"]["output_token_logprobs"]):
        assert row[0][1] == tok and row[0][0] == pytest.approx(lp, abs=1e-6)
    plain = servers["r3"].generate({"input_ids": seq, "sampling_params": {"max_new_tokens": 0},
                                    "return_logprob": True, "logprob_start_len": start})
    assert "input_top_logprobs" not in plain["meta_info"]


def test_sampling_logprobs_are_temperature_scaled_and_seeded(servers, hf):
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                "sampling_seed": 123, "ignore_eos": True}}
    a, b = servers["r3"].generate(body), servers["r3"].generate(body)
    assert a["output_ids"] == b["output_ids"]
    ref, _ = hf_forward(hf["moe"], PROMPT + a["output_ids"], temperature=0.7)
    np.testing.assert_allclose(lps(a["meta_info"]["output_token_logprobs"]), ref[len(PROMPT) - 1:].numpy(), atol=1e-5)
    body["sampling_params"]["sampling_seed"] = 124
    outs = {tuple(servers["r3"].generate(body)["output_ids"]) for _ in range(3)}
    assert len(outs | {tuple(a["output_ids"])}) > 1, "different seeds never changed the sample"


def test_stop_token_ids_and_text(servers):
    srv = servers["r3"]
    base = srv.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 12, **GREEDY}})["output_ids"]
    printable = [t for t in base[1:] if 7 <= t < len(build_char_tokenizer())]  # ids past the vocab decode to ""
    assert printable, f"greedy output {base} has no printable token to stop at"
    stop = printable[0]
    first = base.index(stop)
    reply = srv.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 12, "temperature": 0.0,
                                                                   "stop_token_ids": [stop]}})
    assert reply["output_ids"] == base[:first + 1]
    assert reply["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = srv.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 12, "temperature": 0.0,
                                                                  "stop_token_ids": [stop], "no_stop_trim": True,
                                                                  "skip_special_tokens": False}})
    assert len(kept["text"]) == len(reply["text"]) + 1  # char tokenizer: the stop char is kept in the text


# ---------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_equal_solo_runs(servers):
    srv = servers["r3"]
    bodies = [{"input_ids": PROMPT[: 2 + i] + [70 + i] * i, "return_logprob": True, "return_routed_experts": True,
               "sampling_params": {"max_new_tokens": 6 + i, **GREEDY}} for i in range(8)]
    solo = [srv.generate(b) for b in bodies]
    steps_before = srv.get("/model_info")[1]["num_forward_steps"]

    async def fire() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            async def one(b: dict[str, Any]) -> dict[str, Any]:
                async with s.post(srv.url + "/generate", json=b) as r:
                    assert r.status == 200
                    return await r.json()
            return await asyncio.gather(*(one(b) for b in bodies))

    together = asyncio.run(fire())
    info = srv.get("/model_info")[1]
    steps = info["num_forward_steps"] - steps_before
    assert steps < sum(6 + i for i in range(8)) // 2, f"{steps} forward steps: requests were not batched"
    assert info["max_running_batch"] >= 4
    for a, b in zip(together, solo):
        assert a["output_ids"] == b["output_ids"]
        np.testing.assert_allclose(lps(a["meta_info"]["output_token_logprobs"]),
                                   lps(b["meta_info"]["output_token_logprobs"]), atol=1e-5)
        np.testing.assert_array_equal(experts(a), experts(b))


# ---------------------------------------------------------------- routed experts
def test_routed_experts_layout_and_values_equal_router(servers, hf):
    reply = servers["r3"].generate({"input_ids": PROMPT, "return_routed_experts": True,
                                    "sampling_params": {"max_new_tokens": 5, **GREEDY}})
    full = PROMPT + reply["output_ids"]
    _, ref = hf_forward(hf["moe"], full)
    got = experts(reply)
    assert got.shape == (len(full) - 1, 2, 2)
    assert (got[:, 0] == 0).all()  # layer 0 is dense
    np.testing.assert_array_equal(got, ref[:-1])
    assert not (got[:, 1] == 0).all()
    tail = servers["r3"].generate({"input_ids": PROMPT, "return_routed_experts": True, "routed_experts_start_len": 4,
                                   "sampling_params": {"max_new_tokens": 5, **GREEDY}})
    np.testing.assert_array_equal(experts(tail), ref[4:-1])


def test_routed_experts_absent_without_flag(servers):
    reply = servers["plain"].generate({"input_ids": PROMPT, "return_routed_experts": True,
                                       "sampling_params": {"max_new_tokens": 2, **GREEDY}})
    assert "routed_experts" not in reply["meta_info"]
    info = servers["plain"].get("/model_info")[1]
    assert info["routed_experts_enabled"] is False and info["num_experts_per_tok"] == 2


def test_model_info_and_health(servers):
    status, info = servers["r3"].get("/model_info")
    assert status == 200
    assert info["is_generation"] is True and info["num_hidden_layers"] == 2 and info["num_experts_per_tok"] == 2
    assert info["routed_experts_enabled"] is True and info["max_context_len"] == 512 and info["vocab_size"] == 128
    assert servers["dense"].get("/model_info")[1]["num_experts_per_tok"] == 0
    assert servers["r3"].get("/health")[0] == 200
    assert servers["r3"].get("/health_generate")[0] == 200
    assert servers["r3"].post("/health_generate", {})[0] == 200


# ---------------------------------------------------------------- sessions
def test_session_eight_turns_reuse_kv_and_equal_one_full_request(servers, hf):
    srv = servers["r3"]
    status, sid = srv.post("/open_session", {"capacity_of_str_len": 4096})
    assert status == 200 and isinstance(sid, str)
    rid, context, out_lps = None, [], {}
    last = None
    for turn in range(8):
        user = [20 + turn, 21 + turn, 22 + turn]
        reply = srv.generate({"input_ids": user, "return_logprob": True, "return_routed_experts": True,
                              "session_params": {"id": sid, "rid": rid},
                              "sampling_params": {"max_new_tokens": 4, **GREEDY}})
        meta = reply["meta_info"]
        expected_cached = len(context) - 1 if context else 0
        assert meta["cached_tokens"] == expected_cached, f"turn {turn}"
        context = context + user
        for j, (lp, tok, _) in enumerate(meta["output_token_logprobs"]):
            out_lps[len(context) + j] = lp
        context = context + reply["output_ids"]
        assert meta["prompt_tokens"] == len(context) - 4
        assert experts(reply).shape == (len(context) - 1, 2, 2)
        rid, last = meta["id"], reply
    full = srv.generate({"input_ids": context, "return_logprob": True, "logprob_start_len": 0,
                         "return_routed_experts": True, "sampling_params": {"max_new_tokens": 0}})
    full_lps = lps(full["meta_info"]["input_token_logprobs"])
    np.testing.assert_allclose([out_lps[p] for p in sorted(out_lps)], [full_lps[p] for p in sorted(out_lps)], atol=1e-5)
    np.testing.assert_array_equal(experts(last), experts(full))
    _, ref = hf_forward(hf["moe"], context)
    np.testing.assert_array_equal(experts(last), ref[:-1])
    # A later start: rows from routed_experts_start_len of the full context, cached rows included.
    more = srv.generate({"input_ids": [30], "return_routed_experts": True, "routed_experts_start_len": 5,
                         "session_params": {"id": sid, "rid": rid}, "sampling_params": {"max_new_tokens": 1, **GREEDY}})
    np.testing.assert_array_equal(experts(more)[:len(context) - 5], ref[5:])
    # drop_previous_output: the parent's prompt (fully prefilled) is reused, its output is not.
    dropped = srv.generate({"input_ids": [31, 32], "session_params": {"id": sid, "rid": rid,
                                                                      "drop_previous_output": True},
                            "sampling_params": {"max_new_tokens": 1, **GREEDY}})
    assert dropped["meta_info"]["cached_tokens"] == len(context) - 4
    assert dropped["meta_info"]["prompt_tokens"] == len(context) - 4 + 2
    assert srv.post("/close_session", {"session_id": sid})[0] == 200
    status, err = srv.post("/generate", {"input_ids": [1], "session_params": {"id": sid, "rid": rid}})
    assert status == 400 and "unknown session" in err["error"]["message"]


# ---------------------------------------------------------------- abort, pause, flush
def _start_long(srv: Any, rid: str, results: dict[str, Any]) -> threading.Thread:
    body = {"input_ids": PROMPT, "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 900, **GREEDY}}
    t = threading.Thread(target=lambda: results.__setitem__(rid, srv.post("/generate", body)))
    t.start()
    return t


def _wait_running(srv: Any) -> None:
    deadline = time.monotonic() + 30
    while "hf_server_num_running_reqs 1" not in srv.get("/metrics")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # let a few tokens be generated


def test_abort_returns_partial_output(servers):
    srv, results = servers["plain"], {}
    t = _start_long(srv, "long-1", results)
    _wait_running(srv)
    assert srv.post("/abort_request", {"rid": "long-1"})[0] == 200
    t.join(30)
    status, reply = results["long-1"]
    assert status == 200 and reply["meta_info"]["finish_reason"] == {"type": "abort"}
    n = len(reply["output_ids"])
    assert 0 < n < 900 and len(reply["meta_info"]["output_token_logprobs"]) == n
    t = _start_long(srv, "long-2", results)
    _wait_running(srv)
    srv.post("/abort_request", {"abort_all": True})
    t.join(30)
    assert results["long-2"][1]["meta_info"]["finish_reason"]["type"] == "abort"


def test_pause_and_continue(servers):
    srv, results = servers["plain"], {}
    t = _start_long(srv, "p-1", results)
    _wait_running(srv)
    try:
        assert srv.post("/pause_generation", {"mode": "abort"})[0] == 200
        t.join(30)
        assert results["p-1"][1]["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        srv.post("/continue_generation", {})
    # in_place: a running request is held where it is and resumes after continue.
    t = _start_long(srv, "p-2", results)
    _wait_running(srv)
    assert srv.post("/pause_generation", {"mode": "in_place"})[0] == 200
    time.sleep(0.2)  # the step in flight when pausing may still finish
    steps = srv.get("/model_info")[1]["num_forward_steps"]
    time.sleep(0.5)
    assert srv.get("/model_info")[1]["num_forward_steps"] == steps, "forwards ran while paused"
    srv.post("/continue_generation", {})
    srv.post("/abort_request", {"rid": "p-2"})
    t.join(30)
    assert results["p-2"][1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert srv.post("/pause_generation", {"mode": "retract"})[0] == 200
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, **GREEDY}}
    held = threading.Thread(target=lambda: results.__setitem__("held", srv.post("/generate", body)))
    held.start()
    held.join(1.0)
    assert held.is_alive(), "a request finished while generation was paused"
    assert srv.get("/health")[0] == 200  # the HTTP side stays responsive
    assert srv.post("/continue_generation", {})[0] == 200
    held.join(30)
    assert results["held"][0] == 200 and len(results["held"][1]["output_ids"]) == 3


def test_flush_cache_refused_while_busy(servers):
    srv, results = servers["plain"], {}
    t = _start_long(srv, "f-1", results)
    _wait_running(srv)
    status, err = srv.post("/flush_cache", {})
    assert status == 400 and "running" in err["error"]["message"]
    srv.post("/abort_request", {"rid": "f-1"})
    t.join(30)
    assert srv.post("/flush_cache", {})[0] == 200


# ---------------------------------------------------------------- weight updates
def test_update_weights_from_disk_and_tensor(servers, hf, tiny_models):
    srv = servers["plain"]
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {"max_new_tokens": 6, **GREEDY}}
    before = srv.generate(body)
    _, sid = srv.post("/open_session", {"capacity_of_str_len": 1024})
    first = srv.generate({**body, "session_params": {"id": sid}})
    status, reply = srv.post("/update_weights_from_disk", {"model_path": str(tiny_models["moe_b"]),
                                                           "weight_version": "v1"})
    assert status == 200 and reply["success"] is True
    after = srv.generate(body)
    assert after["meta_info"]["weight_version"] == "v1"
    ref, _ = hf_forward(hf["moe_b"], PROMPT + after["output_ids"])
    np.testing.assert_allclose(lps(after["meta_info"]["output_token_logprobs"]), ref[len(PROMPT) - 1:].numpy(),
                               atol=1e-5)
    assert not np.allclose(lps(after["meta_info"]["output_token_logprobs"]),
                           lps(before["meta_info"]["output_token_logprobs"]), atol=1e-3)
    # The session's cached KV was computed with the old weights: it must not be reused.
    child = srv.generate({**body, "input_ids": [5], "session_params": {"id": sid, "rid": first["meta_info"]["id"]}})
    assert child["meta_info"]["cached_tokens"] == 0
    # Back to the original weights in two tensor buckets (checkpoint names, per-expert layout).
    named = load_file(str(next(Path(tiny_models["moe"]).glob("*.safetensors"))))
    names = sorted(named)
    assert srv.post("/begin_weight_update", {"selector": "all"})[0] == 200
    for i, bucket in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        payload = base64.b64encode(save({n: named[n] for n in bucket})).decode()
        status, reply = srv.post("/update_weights_from_tensor", {
            "serialized_named_tensors": [payload], "load_format": "safetensors", "flush_cache": True,
            "weight_version": f"v2.{i}"})
        assert status == 200 and reply["success"] is True
    assert srv.post("/end_weight_update", {})[0] == 200
    restored = srv.generate(body)
    assert restored["output_ids"] == before["output_ids"] and restored["meta_info"]["weight_version"] == "v2.1"
    np.testing.assert_allclose(lps(restored["meta_info"]["output_token_logprobs"]),
                               lps(before["meta_info"]["output_token_logprobs"]), atol=1e-6)


def test_tensor_updates_need_a_weight_update_session(servers, tiny_models):
    """As SGLang 0.5.23: tensor updates only between /begin_weight_update and /end_weight_update, one session
    at a time; a refused update changes no weight."""
    srv = servers["plain"]
    named = load_file(str(next(Path(tiny_models["moe_b"]).glob("*.safetensors"))))
    body = {"serialized_named_tensors": [base64.b64encode(save(named)).decode()], "load_format": "safetensors"}
    greedy = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, **GREEDY}}
    before = srv.generate(greedy)["output_ids"]
    status, reply = srv.post("/update_weights_from_tensor", body)
    assert status == 400 and "between begin_weight_update() and end_weight_update()" in reply["message"]
    assert srv.generate(greedy)["output_ids"] == before
    status, reply = srv.post("/end_weight_update", {})
    assert status == 400 and "no weight-update session is open" in reply["message"]
    assert srv.post("/begin_weight_update", {"selector": "everything"})[0] == 400
    assert srv.post("/begin_weight_update", {})[0] == 200
    status, reply = srv.post("/begin_weight_update", {"selector": "target"})
    assert status == 400 and "already open" in reply["message"]
    assert srv.post("/end_weight_update", {})[0] == 200


def test_weight_update_errors(servers, tmp_path):
    srv = servers["plain"]
    assert srv.post("/begin_weight_update", {})[0] == 200
    bad = base64.b64encode(save({"model.no_such.weight": torch.zeros(2)})).decode()
    status, reply = srv.post("/update_weights_from_tensor", {"serialized_named_tensors": [bad],
                                                             "load_format": "safetensors"})
    assert status == 400 and reply["success"] is False and "no_such" in reply["message"]
    status, reply = srv.post("/update_weights_from_tensor", {"serialized_named_tensors": ["x"],
                                                             "load_format": "flattened_bucket"})
    assert status == 400 and "safetensors" in reply["message"]
    partial = tmp_path / "partial"
    partial.mkdir()
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.ones(64)}, str(partial / "model.safetensors"))
    status, reply = srv.post("/update_weights_from_disk", {"model_path": str(partial)})
    assert status == 400 and reply["success"] is False and "missing" in reply["message"]
    for path in ("/init_weights_update_group", "/update_weights_from_distributed"):
        status, reply = srv.post(path, {})
        assert status == 400 and "NCCL" in reply["message"]
    assert srv.post("/end_weight_update", {})[0] == 200


# ---------------------------------------------------------------- rejected requests
@pytest.mark.parametrize("body, needle", [
    ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "not_a_key": 1}}, "not_a_key"),
    ({"input_ids": PROMPT, "sampling_params": {"regex": "a+"}}, "regex"),
    ({"input_ids": PROMPT, "sampling_params": {"n": 2}}, "n"),
    ({"input_ids": PROMPT, "sampling_params": {"repetition_penalty": 1.3}}, "repetition_penalty"),
    ({"input_ids": [], "sampling_params": {}}, "non-empty"),
    ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 510}}, "max-context-len"),
    ({"input_ids": PROMPT, "session_params": {"id": "nope"}}, "unknown session"),
    ({"input_ids": PROMPT, "stream": True}, "stream"),
    ({"text": "hello"}, "input_ids"),
])
def test_bad_requests_are_400(servers, body, needle):
    status, reply = servers["r3"].post("/generate", body)
    assert status == 400
    assert needle in reply["error"]["message"]
