"""The request JSON the client sends uses SGLang's field names and nothing else; codecs round-trip."""

import base64

import numpy as np
import pytest

from rollout.sglang_api import (GENERATE_KEYS, SGLANG_SAMPLING_KEYS, GenerateRequest, GenerateResponse,
                                ProtocolError, SessionParams, decode_routed_experts, encode_routed_experts)

# Field names of SGLang 0.5.x GenerateReqInput / SamplingParams that mopd uses (checked against the real package by tests/contract/).
SGLANG_GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                          "top_logprobs_num", "return_text_in_logprobs", "return_routed_experts",
                          "routed_experts_start_len", "rid", "session_params", "stream"}


def test_full_request_json_uses_only_sglang_field_names():
    req = GenerateRequest(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4, "temperature": 0.7,
                                                                 "top_p": 0.9, "top_k": 20, "stop_token_ids": [2]},
                          return_logprob=True, logprob_start_len=0, return_routed_experts=True,
                          routed_experts_start_len=5, rid="r1",
                          session_params=SessionParams(id="s", rid="r0"))
    body = req.to_json()
    assert set(body) <= SGLANG_GENERATE_FIELDS
    assert body == {"input_ids": [1, 2, 3],
                    "sampling_params": {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                        "stop_token_ids": [2]},
                    "return_logprob": True, "logprob_start_len": 0, "return_routed_experts": True,
                    "routed_experts_start_len": 5, "rid": "r1", "session_params": {"id": "s", "rid": "r0"}}
    assert GenerateRequest.from_json(body) == req


def test_minimal_request_omits_unset_fields():
    assert GenerateRequest(input_ids=[7]).to_json() == {"input_ids": [7], "sampling_params": {}}


@pytest.mark.parametrize("body, message", [
    ({"input_ids": [1], "sampling_params": {"max_tokens": 3}}, "unknown key"),
    ({"input_ids": [1], "return_logprobs": True}, "unknown /generate field"),
    ({"input_ids": [1], "text": "hi"}, "exactly one"),
    ({"sampling_params": {}}, "exactly one"),
    ({"input_ids": []}, "non-empty"),
    ({"input_ids": ["a"]}, "integer token ids"),
    ({"input_ids": [1], "session_params": {"rid": "x"}}, "session_params"),
    ({"input_ids": [1], "session_params": {"id": "s", "parent": "x"}}, "unknown key"),
])
def test_requests_sglang_would_reject_are_rejected(body, message):
    with pytest.raises(ProtocolError, match=message):
        GenerateRequest.from_json(body)


def test_sampling_keys_are_sglangs():
    assert {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "no_stop_trim",
            "skip_special_tokens", "stop"} <= SGLANG_SAMPLING_KEYS
    assert "max_tokens" not in SGLANG_SAMPLING_KEYS  # the OpenAI name, not SGLang's native one
    assert GENERATE_KEYS == SGLANG_GENERATE_FIELDS


def test_routed_experts_are_little_endian_int32_in_sglang_layout():
    experts = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)
    data = encode_routed_experts(experts)
    raw = base64.b64decode(data)
    assert raw[:8] == (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    np.testing.assert_array_equal(decode_routed_experts(data, 3, 2), experts)
    with pytest.raises(ProtocolError, match="multiple"):
        decode_routed_experts(data, 5, 2)


def test_response_parsing_reads_sglang_meta_info():
    experts = np.ones((4, 2, 2), dtype=np.int32)
    body = {"text": "ab", "output_ids": [5, 6], "meta_info": {
        "id": "r", "finish_reason": {"type": "stop", "matched": 6}, "prompt_tokens": 3, "completion_tokens": 2,
        "cached_tokens": 1, "weight_version": "7",
        "output_token_logprobs": [[-0.5, 5, None], [-1.5, 6, None]],
        "input_token_logprobs": [[None, 1, None], [-2.0, 2, None]],
        "routed_experts": encode_routed_experts(experts)}}
    resp = GenerateResponse.from_json(body, num_layers=2, top_k=2)
    assert resp.finish_reason == "stop" and resp.output_logprobs == [-0.5, -1.5]
    assert resp.input_logprobs == [None, -2.0] and resp.cached_tokens == 1 and resp.weight_version == "7"
    np.testing.assert_array_equal(resp.routed_experts, experts)
    with pytest.raises(ProtocolError, match="malformed"):
        GenerateResponse.from_json({"text": ""})
