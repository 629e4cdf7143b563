"""rollout.local_server against direct HF forwards: one real server subprocess, real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from mopd.toy.models import create_tiny_model
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.sglang_api import decode_routed_experts

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [21, 22]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body: dict) -> tuple[int, object]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_server")
    tok = build_char_tokenizer()
    return (str(create_tiny_model(root / "a", tok, arch="qwen3_moe", seed=0)),
            str(create_tiny_model(root / "b", tok, arch="qwen3_moe", seed=1)))


@pytest.fixture(scope="module")
def server(models):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rollout.local_server", "--model-path", models[0], "--host",
                             "127.0.0.1", "--port", str(port), "--enable-return-routed-experts",
                             "--max-batch-size", "8", "--max-context-len", "128"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"local_server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _hf(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logprobs_and_routing(model, ids: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    """log_softmax of every position and the router's top-k per token for the MoE layer (layer 1)."""
    seen = {}
    router = model.model.layers[1].mlp.gate

    def record(_module, _inputs, output) -> None:
        seen["idx"] = output[2]

    handle = router.register_forward_hook(record)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        handle.remove()
    return torch.log_softmax(logits, -1), seen["idx"].numpy()


def _generate(url: str, ids: list[int], **kw) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": 0, "return_routed_experts": True, **kw}
    status, reply = post(url, "/generate", body)
    assert status == 200, reply
    return reply


def test_batched_requests_equal_single_requests_and_a_direct_hf_forward(server, models):
    singles = [_generate(server, p) for p in PROMPTS]
    batched: list[dict] = [None] * len(PROMPTS)

    def run(i: int) -> None:
        batched[i] = _generate(server, PROMPTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model = _hf(models[0])
    for prompt, one, many in zip(PROMPTS, singles, batched):
        assert one["output_ids"] == many["output_ids"] and len(one["output_ids"]) == 6
        np.testing.assert_allclose([e[0] for e in one["meta_info"]["output_token_logprobs"]],
                                   [e[0] for e in many["meta_info"]["output_token_logprobs"]], atol=1e-5)
        full = prompt + one["output_ids"]
        logp, idx = _hf_logprobs_and_routing(model, full)
        want_out = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(one["output_ids"])]
        np.testing.assert_allclose([e[0] for e in one["meta_info"]["output_token_logprobs"]], want_out, atol=1e-4)
        assert one["output_ids"] == [int(logp[len(prompt) - 1 + t].argmax()) for t in range(6)]
        # prompt logprobs: SGLang layout, first entry has no logprob
        entries = one["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == prompt and entries[0][0] is None
        np.testing.assert_allclose([e[0] for e in entries[1:]],
                                   [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))], atol=1e-4)
        # routed experts: [prompt + output - 1, layers, top_k], dense layer 0 zero, layer 1 = HF router
        experts = decode_routed_experts(one["meta_info"]["routed_experts"], 2, 2)
        assert experts.shape == (len(full) - 1, 2, 2)
        assert (experts[:, 0] == 0).all()
        np.testing.assert_array_equal(np.sort(experts[:, 1], -1), np.sort(idx[: len(full) - 1], -1))
        meta = one["meta_info"]
        assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == 6
        assert meta["finish_reason"] == {"type": "length", "length": 6}


def test_teacher_scoring_prefill_returns_logprobs_from_the_start_position(server, models):
    ids = PROMPTS[2]
    status, reply = post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                                               "return_logprob": True, "logprob_start_len": 3})
    assert status == 200 and reply["output_ids"] == []
    logp, _ = _hf_logprobs_and_routing(_hf(models[0]), ids)
    entries = reply["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == ids[3:]
    np.testing.assert_allclose([e[0] for e in entries], [logp[i - 1, ids[i]].item() for i in range(3, len(ids))],
                               atol=1e-4)


def test_session_turn_prefills_only_new_tokens_and_equals_a_full_request(server):
    status, sid = post(server, "/open_session", {"capacity_of_str_len": 1000})
    assert status == 200 and isinstance(sid, str)
    first = _generate(server, PROMPTS[0], rid="t1", session_params={"id": sid})
    second = _generate(server, [30, 31, 32], rid="t2", session_params={"id": sid, "rid": "t1"},
                       routed_experts_start_len=len(PROMPTS[0]) + 5)
    context = PROMPTS[0] + first["output_ids"] + [30, 31, 32]
    meta = second["meta_info"]
    assert meta["prompt_tokens"] == len(context)
    assert meta["cached_tokens"] == len(PROMPTS[0]) + 5  # all but the last output token of turn 1
    full = _generate(server, context)
    assert second["output_ids"] == full["output_ids"]
    np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]],
                               [e[0] for e in full["meta_info"]["output_token_logprobs"]], atol=1e-5)
    tail = decode_routed_experts(meta["routed_experts"], 2, 2)
    whole = decode_routed_experts(full["meta_info"]["routed_experts"], 2, 2)
    np.testing.assert_array_equal(tail, whole[len(PROMPTS[0]) + 5:])
    status, reply = post(server, "/generate", {"input_ids": [1], "sampling_params": {},
                                               "session_params": {"id": sid, "rid": "t1"}})
    assert status == 400 and "latest request" in reply
    assert post(server, "/close_session", {"session_id": sid})[0] == 200


def test_abort_returns_the_partial_output(server):
    result = {}

    def run() -> None:
        result["reply"] = post(server, "/generate", {
            "input_ids": PROMPTS[1], "rid": "long", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 110, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 3}})

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.4)
    assert post(server, "/abort_request", {"rid": "long"})[0] == 200
    thread.join(timeout=30)
    status, reply = result["reply"]
    assert status == 200 and reply["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(reply["output_ids"]) < 110
    assert len(reply["meta_info"]["output_token_logprobs"]) == len(reply["output_ids"])


def test_seeded_sampling_is_reproducible(server):
    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9,
                                                         "top_k": 20, "sampling_seed": 7, "ignore_eos": True}}
    assert post(server, "/generate", body)[1]["output_ids"] == post(server, "/generate", body)[1]["output_ids"]


def test_weight_updates_from_disk_and_tensors_swap_weights_and_bump_the_version(server, models):
    def prompt_logprobs() -> list[float]:
        return [e[0] for e in _generate(server, PROMPTS[2])["meta_info"]["input_token_logprobs"][1:]]

    def hf_logprobs(path: str) -> list[float]:
        logp, _ = _hf_logprobs_and_routing(_hf(path), PROMPTS[2])
        return [logp[i - 1, PROMPTS[2][i]].item() for i in range(1, len(PROMPTS[2]))]

    status, reply = post(server, "/update_weights_from_disk", {"model_path": models[1], "weight_version": "5"})
    assert status == 200 and reply["success"], reply
    assert json.loads(urllib.request.urlopen(server + "/model_info").read())["weight_version"] == "5"
    np.testing.assert_allclose(prompt_logprobs(), hf_logprobs(models[1]), atol=1e-4)
    assert _generate(server, PROMPTS[0])["meta_info"]["weight_version"] == "5"

    payload = base64.b64encode(save_safetensors({k: v.contiguous() for k, v in
                                                 _hf(models[0]).state_dict().items()})).decode()
    status, reply = post(server, "/update_weights_from_tensor", {
        "serialized_named_tensors": [payload], "load_format": "safetensors", "weight_version": "6"})
    assert status == 200 and reply["success"], reply
    np.testing.assert_allclose(prompt_logprobs(), hf_logprobs(models[0]), atol=1e-4)
    status, reply = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": [payload],
                                                                 "load_format": None})
    assert status == 400 and "load_format" in reply


@pytest.mark.parametrize("body, message", [
    ({"input_ids": [5, 6], "sampling_params": {"max_tokens": 3}}, "unknown key"),
    ({"input_ids": [], "sampling_params": {}}, "non-empty prompt"),
    ({"input_ids": [5] * 200, "sampling_params": {}}, "context length"),
    ({"input_ids": [5], "sampling_params": {}, "bogus": 1}, "unknown /generate field"),
])
def test_bad_requests_are_400_with_the_reason(server, body, message):
    status, reply = post(server, "/generate", body)
    assert status == 400 and message in reply


def test_client_pushes_tensors_and_reads_back_the_version(server, models):
    import asyncio

    from rollout.engine_client import EngineClient, EngineError

    state = {k: v.contiguous() for k, v in _hf(models[0]).state_dict().items()}
    payload = base64.b64encode(save_safetensors(state)).decode()

    async def go() -> str:
        async with EngineClient(server) as client:
            await client.update_weights_from_tensor([payload], 9, load_format="safetensors")
            with pytest.raises(EngineError, match="unknown parameter"):
                bad = base64.b64encode(save_safetensors({"no.such.weight": torch.zeros(1)})).decode()
                await client.update_weights_from_tensor([bad], 10, load_format="safetensors")
            return await client.weight_version()

    assert asyncio.run(go()) == "9"
