"""Malformed engine requests against a real `rollout.hf_server` subprocess (real HTTP on 127.0.0.1).

Every case is one row of CASES: endpoint, body (a JSON value, raw bytes, or a function of the
fixture paths), the status it must get and a substring its error message must contain (the
field). After each case the server must still answer a fixed greedy request with the same output
ids and bit-identical logprobs as before the corpus (so no rejected weight update changed a weight)
and `/health` must say 200. Adding a case is adding one line.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from tests.rollout.conftest import ServerProc

NAN, INF = float("nan"), float("inf")
PROMPT = [12, 40, 41, 42, 9, 50]
VOCAB = 128  # the tiny models' vocab (checked against /model_info below)
LIMIT = 4 << 20  # --max-request-bytes of the corpus server
GOOD = {"input_ids": PROMPT, "return_logprob": True,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}}
EXPERT = "model.layers.1.mlp.experts"


def g(**top: Any) -> dict[str, Any]:
    """A /generate body: a valid request with `top` fields replaced."""
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}, **top}


def sp(**params: Any) -> dict[str, Any]:
    """A /generate body whose sampling_params get `params` on top of a valid base."""
    return g(sampling_params={"max_new_tokens": 2, **params})


def raw_sp(fragment: str) -> bytes:
    """Raw JSON (for numbers Python's json.dumps cannot write, such as 1e400)."""
    return ('{"input_ids": [12, 40], "sampling_params": {' + fragment + '}}').encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensors(ctx: dict[str, Any], named: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An /update_weights_from_tensor body carrying `named` (ctx: the fixture context, unused)."""
    return {"serialized_named_tensors": [b64(save(named))], "load_format": "safetensors"}


@dataclass
class Case:
    name: str
    path: str
    body: Any  # JSON value, bytes (sent as is), or a function of the fixture context
    status: int
    needle: str
    method: str = "POST"


C = Case
CASES: list[Case] = [
    # ---- not a JSON object
    C("json-malformed", "/generate", b"{not json", 400, "JSON"),
    C("json-empty", "/generate", b"", 400, "JSON"),
    C("json-bad-utf8", "/generate", b"\xff\xfe{}", 400, "JSON"),
    C("json-array", "/generate", b"[1, 2]", 400, "JSON object"),
    C("json-deep-nesting", "/generate", b'{"input_ids": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "JSON"),
    C("body-too-large", "/generate", b'{"input_ids": [' + b"1, " * (LIMIT // 3 + 10) + b'1]}', 413,
      "max-request-bytes"),
    # ---- input_ids
    C("ids-missing-text", "/generate", {"text": "hello"}, 400, "input_ids"),
    C("ids-and-text", "/generate", {"text": "a", "input_ids": [1]}, 400, "text"),
    C("ids-string", "/generate", g(input_ids="abc"), 400, "input_ids"),
    C("ids-null", "/generate", g(input_ids=None), 400, "input_ids"),
    C("ids-object", "/generate", g(input_ids={"0": 1}), 400, "input_ids"),
    C("ids-str-item", "/generate", g(input_ids=[1, "2"]), 400, "input_ids"),
    C("ids-float-item", "/generate", g(input_ids=[1, 2.5]), 400, "input_ids"),
    C("ids-bool-item", "/generate", g(input_ids=[True]), 400, "input_ids"),
    C("ids-nested", "/generate", g(input_ids=[[1, 2]]), 400, "input_ids"),
    C("ids-out-of-vocab", "/generate", g(input_ids=[1, VOCAB]), 400, "input_ids"),
    C("ids-negative", "/generate", g(input_ids=[1, -1]), 400, "input_ids"),
    C("ids-int64-overflow", "/generate", g(input_ids=[2 ** 63]), 400, "input_ids"),
    C("ids-huge", "/generate", g(input_ids=[10 ** 30]), 400, "input_ids"),
    C("ids-too-long", "/generate", g(input_ids=[1] * 2000), 400, "max-context-len"),
    # ---- sampling_params: types and non-finite / extreme numbers
    C("sp-list", "/generate", g(sampling_params=[]), 400, "sampling_params"),
    C("sp-string", "/generate", g(sampling_params="greedy"), 400, "sampling_params"),
    C("sp-unknown-key", "/generate", sp(not_a_key=1), 400, "not_a_key"),
    C("temp-nan", "/generate", sp(temperature=NAN), 400, "sampling_params.temperature"),
    C("temp-inf", "/generate", sp(temperature=INF), 400, "sampling_params.temperature"),
    C("temp-1e400", "/generate", raw_sp('"temperature": 1e400'), 400, "sampling_params.temperature"),
    C("temp-negative", "/generate", sp(temperature=-1), 400, "sampling_params.temperature"),
    C("temp-string", "/generate", sp(temperature="0.5"), 400, "sampling_params.temperature"),
    C("temp-bool", "/generate", sp(temperature=True), 400, "sampling_params.temperature"),
    C("top-p-zero", "/generate", sp(top_p=0), 400, "sampling_params.top_p"),
    C("top-p-above-one", "/generate", sp(top_p=1.5), 400, "sampling_params.top_p"),
    C("top-p-nan", "/generate", sp(top_p=NAN), 400, "sampling_params.top_p"),
    C("top-p-minus-inf", "/generate", sp(top_p=-INF), 400, "sampling_params.top_p"),
    C("top-k-zero", "/generate", sp(top_k=0), 400, "sampling_params.top_k"),
    C("top-k-minus-two", "/generate", sp(top_k=-2), 400, "sampling_params.top_k"),
    C("top-k-float", "/generate", sp(top_k=2.5), 400, "sampling_params.top_k"),
    C("top-k-string", "/generate", sp(top_k="5"), 400, "sampling_params.top_k"),
    C("top-k-1e400", "/generate", raw_sp('"top_k": 1e400'), 400, "sampling_params.top_k"),
    C("min-p-nan", "/generate", sp(min_p=NAN), 400, "sampling_params.min_p"),
    C("min-p-above-one", "/generate", sp(min_p=2), 400, "sampling_params.min_p"),
    C("min-p-unsupported", "/generate", sp(min_p=0.5), 400, "sampling_params.min_p"),
    C("max-new-inf", "/generate", sp(max_new_tokens=INF), 400, "sampling_params.max_new_tokens"),
    C("max-new-nan", "/generate", sp(max_new_tokens=NAN), 400, "sampling_params.max_new_tokens"),
    C("max-new-1e400", "/generate", raw_sp('"max_new_tokens": 1e400'), 400, "sampling_params.max_new_tokens"),
    C("max-new-negative", "/generate", sp(max_new_tokens=-1), 400, "sampling_params.max_new_tokens"),
    C("max-new-bool", "/generate", sp(max_new_tokens=True), 400, "sampling_params.max_new_tokens"),
    C("max-new-float", "/generate", sp(max_new_tokens=2.0), 400, "sampling_params.max_new_tokens"),
    C("max-new-string", "/generate", sp(max_new_tokens="8"), 400, "sampling_params.max_new_tokens"),
    C("max-new-huge", "/generate", sp(max_new_tokens=10 ** 30), 400, "sampling_params.max_new_tokens"),
    C("min-new-negative", "/generate", sp(min_new_tokens=-1), 400, "sampling_params.min_new_tokens"),
    C("min-new-above-max", "/generate", sp(min_new_tokens=5), 400, "sampling_params.min_new_tokens"),
    C("stop-int", "/generate", sp(stop=5), 400, "sampling_params.stop"),
    C("stop-int-list", "/generate", sp(stop=[1, 2]), 400, "sampling_params.stop"),
    C("stop-object", "/generate", sp(stop={"a": 1}), 400, "sampling_params.stop"),
    C("stop-strings-unsupported", "/generate", sp(stop=["\n"]), 400, "sampling_params.stop"),
    C("stop-ids-string", "/generate", sp(stop_token_ids="abc"), 400, "sampling_params.stop_token_ids"),
    C("stop-ids-int", "/generate", sp(stop_token_ids=5), 400, "sampling_params.stop_token_ids"),
    C("stop-ids-float", "/generate", sp(stop_token_ids=[1.5]), 400, "sampling_params.stop_token_ids"),
    C("stop-ids-huge", "/generate", sp(stop_token_ids=[10 ** 30], min_new_tokens=1), 400,
      "sampling_params.stop_token_ids"),
    C("stop-ids-negative", "/generate", sp(stop_token_ids=[-1], min_new_tokens=1), 400,
      "sampling_params.stop_token_ids"),
    C("seed-float", "/generate", sp(sampling_seed=1.5), 400, "sampling_params.sampling_seed"),
    C("seed-too-big", "/generate", sp(sampling_seed=2 ** 64), 400, "sampling_params.sampling_seed"),
    C("seed-string", "/generate", sp(sampling_seed="x"), 400, "sampling_params.sampling_seed"),
    C("seed-bool", "/generate", sp(sampling_seed=True), 400, "sampling_params.sampling_seed"),
    C("ignore-eos-string", "/generate", sp(ignore_eos="yes"), 400, "sampling_params.ignore_eos"),
    C("skip-special-int", "/generate", sp(skip_special_tokens=1), 400, "sampling_params.skip_special_tokens"),
    C("no-stop-trim-list", "/generate", sp(no_stop_trim=[]), 400, "sampling_params.no_stop_trim"),
    C("n-zero", "/generate", sp(n=0), 400, "sampling_params.n"),
    C("n-two", "/generate", sp(n=2), 400, "sampling_params.n"),
    C("n-string", "/generate", sp(n="2"), 400, "sampling_params.n"),
    C("freq-penalty-nan", "/generate", sp(frequency_penalty=NAN), 400, "sampling_params.frequency_penalty"),
    C("presence-penalty-3", "/generate", sp(presence_penalty=3), 400, "sampling_params.presence_penalty"),
    C("repetition-penalty-0", "/generate", sp(repetition_penalty=0), 400, "sampling_params.repetition_penalty"),
    C("logit-bias-list", "/generate", sp(logit_bias=[]), 400, "sampling_params.logit_bias"),
    C("logit-bias-oov", "/generate", sp(logit_bias={"999": 1.0}), 400, "sampling_params.logit_bias"),
    C("regex-int", "/generate", sp(regex=5), 400, "sampling_params.regex"),
    C("json-schema-int", "/generate", sp(json_schema=5), 400, "sampling_params.json_schema"),
    C("custom-params-string", "/generate", sp(custom_params="x"), 400, "sampling_params.custom_params"),
    C("stream-interval-string", "/generate", sp(stream_interval="x"), 400, "sampling_params.stream_interval"),
    # ---- other top-level fields
    C("rid-list", "/generate", g(rid=["a", "b"]), 400, "rid"),
    C("rid-int", "/generate", g(rid=5), 400, "rid"),
    C("rid-object", "/generate", g(rid={}), 400, "rid"),
    C("rid-list-session", "/generate", lambda c: g(rid=["a", "b"], session_params={"id": c["sid"]}), 400, "rid"),
    C("session-string", "/generate", g(session_params="x"), 400, "session_params"),
    C("session-no-id", "/generate", g(session_params={}), 400, "session_params.id"),
    C("session-id-int", "/generate", g(session_params={"id": 5}), 400, "session_params.id"),
    C("session-id-list", "/generate", g(session_params={"id": ["a"]}), 400, "session_params.id"),
    C("session-rid-int", "/generate", lambda c: g(session_params={"id": c["sid"], "rid": 5}), 400,
      "session_params.rid"),
    C("session-rid-list", "/generate", lambda c: g(session_params={"id": c["sid"], "rid": ["x"]}), 400,
      "session_params.rid"),
    C("session-offset-string", "/generate", lambda c: g(session_params={"id": c["sid"], "offset": "x"}), 400,
      "session_params.offset"),
    C("session-replace-string", "/generate", lambda c: g(session_params={"id": c["sid"], "replace": "yes"}), 400,
      "session_params.replace"),
    C("session-drop-int", "/generate", lambda c: g(session_params={"id": c["sid"], "drop_previous_output": 3}), 400,
      "session_params.drop_previous_output"),
    C("session-unknown-key", "/generate", lambda c: g(session_params={"id": c["sid"], "bogus": 1}), 400, "bogus"),
    C("session-unknown", "/generate", g(session_params={"id": "nope"}), 400, "unknown session"),
    C("return-logprob-string", "/generate", g(return_logprob="yes"), 400, "return_logprob"),
    C("return-logprob-int", "/generate", g(return_logprob=1), 400, "return_logprob"),
    C("lp-start-string", "/generate", g(return_logprob=True, logprob_start_len="x"), 400, "logprob_start_len"),
    C("lp-start-minus-two", "/generate", g(return_logprob=True, logprob_start_len=-2), 400, "logprob_start_len"),
    C("lp-start-float", "/generate", g(return_logprob=True, logprob_start_len=1.5), 400, "logprob_start_len"),
    C("lp-start-nan", "/generate", g(return_logprob=True, logprob_start_len=NAN), 400, "logprob_start_len"),
    C("lp-start-past-prompt", "/generate", g(return_logprob=True, logprob_start_len=10 ** 30), 400,
      "logprob_start_len"),
    C("top-lp-negative", "/generate", g(return_logprob=True, top_logprobs_num=-1), 400, "top_logprobs_num"),
    C("top-lp-string", "/generate", g(return_logprob=True, top_logprobs_num="x"), 400, "top_logprobs_num"),
    C("top-lp-inf", "/generate", g(return_logprob=True, top_logprobs_num=INF), 400, "top_logprobs_num"),
    C("top-lp-huge", "/generate", g(return_logprob=True, top_logprobs_num=10 ** 9), 400, "top_logprobs_num"),
    C("routed-start-negative", "/generate", g(return_routed_experts=True, routed_experts_start_len=-1), 400,
      "routed_experts_start_len"),
    C("routed-start-string", "/generate", g(return_routed_experts=True, routed_experts_start_len="x"), 400,
      "routed_experts_start_len"),
    C("routed-start-past-prompt", "/generate", g(return_routed_experts=True, routed_experts_start_len=99), 400,
      "routed_experts_start_len"),
    C("return-routed-string", "/generate", g(return_routed_experts="x"), 400, "return_routed_experts"),
    C("stream-string", "/generate", g(stream="no"), 400, "stream"),
    C("stream-true", "/generate", g(stream=True), 400, "stream"),
    C("top-level-unknown", "/generate", g(bogus_field=1), 400, "bogus_field"),
    C("rid-too-long", "/generate", g(rid="r" * 5000), 400, "rid"),
    C("ids-empty-no-session", "/generate", g(input_ids=[]), 400, "input_ids"),
    C("ids-empty-session-no-parent", "/generate", lambda c: g(input_ids=[], session_params={"id": c["sid"]}), 400,
      "input_ids"),
    C("session-rid-unknown", "/generate", lambda c: g(session_params={"id": c["sid"], "rid": "nope"}), 400,
      "session_params.rid"),
    C("session-offset-unsupported", "/generate", lambda c: g(session_params={"id": c["sid"], "offset": 3}), 400,
      "session_params.offset"),
    C("lp-start-equals-prompt", "/generate", g(return_logprob=True, logprob_start_len=len(PROMPT)), 400,
      "logprob_start_len"),
    # ---- extreme but valid: defined behaviour as in SGLang (200, and nothing else changes)
    C("ok-temp-tiny-is-greedy", "/generate", sp(temperature=1e-300), 200, "output_ids"),
    C("ok-temp-huge", "/generate", sp(temperature=1e308, sampling_seed=1), 200, "output_ids"),
    C("ok-top-p-tiny", "/generate", sp(temperature=1.0, top_p=1e-300), 200, "output_ids"),
    C("ok-top-k-all", "/generate", sp(temperature=1.0, top_k=-1), 200, "output_ids"),
    C("ok-top-k-beyond-vocab", "/generate", sp(temperature=1.0, top_k=10 ** 9), 200, "output_ids"),
    C("ok-seed-negative", "/generate", sp(temperature=1.0, sampling_seed=-(2 ** 63)), 200, "output_ids"),
    C("ok-nulls-mean-defaults", "/generate", sp(temperature=None, top_p=None, top_k=None, stop=None, n=None), 200,
      "output_ids"),
    C("ok-zero-new-tokens", "/generate", sp(max_new_tokens=0), 200, "output_ids"),
    # ---- abort / pause / sessions
    C("abort-rid-int", "/abort_request", {"rid": 5}, 400, "rid"),
    C("abort-rid-list", "/abort_request", {"rid": ["a"]}, 400, "rid"),
    C("abort-all-string", "/abort_request", {"abort_all": "yes"}, 400, "abort_all"),
    C("abort-not-json", "/abort_request", b"not json", 400, "JSON"),
    C("pause-mode-int", "/pause_generation", {"mode": 5}, 400, "mode"),
    C("pause-mode-list", "/pause_generation", {"mode": ["abort"]}, 400, "mode"),
    C("pause-not-json", "/pause_generation", b"[", 400, "JSON"),
    C("open-capacity-string", "/open_session", {"capacity_of_str_len": "x"}, 400, "capacity_of_str_len"),
    C("open-capacity-inf", "/open_session", b'{"capacity_of_str_len": 1e400}', 400, "capacity_of_str_len"),
    C("open-capacity-negative", "/open_session", {"capacity_of_str_len": -5}, 400, "capacity_of_str_len"),
    C("open-id-int", "/open_session", {"capacity_of_str_len": 100, "session_id": 5}, 400, "session_id"),
    C("open-id-list", "/open_session", {"capacity_of_str_len": 100, "session_id": ["a"]}, 400, "session_id"),
    C("open-existing", "/open_session", lambda c: {"capacity_of_str_len": 100, "session_id": c["sid"]}, 400,
      "already exists"),
    C("open-array-body", "/open_session", b"[]", 400, "JSON object"),
    C("close-id-int", "/close_session", {"session_id": 5}, 400, "session_id"),
    C("close-id-missing", "/close_session", {}, 400, "session_id"),
    C("close-unknown", "/close_session", {"session_id": "nope"}, 400, "unknown session"),
    # ---- weight updates (each must leave every weight as it was)
    C("disk-path-list", "/update_weights_from_disk", lambda c: {"model_path": [c["model"]]}, 400, "model_path"),
    C("disk-path-int", "/update_weights_from_disk", {"model_path": 5}, 400, "model_path"),
    C("disk-path-missing", "/update_weights_from_disk", {}, 400, "model_path"),
    C("disk-no-such-dir", "/update_weights_from_disk", {"model_path": "/no/such/dir"}, 400, "model_path"),
    C("disk-truncated", "/update_weights_from_disk", lambda c: {"model_path": c["truncated"]}, 400, "model_path"),
    C("disk-not-safetensors", "/update_weights_from_disk", lambda c: {"model_path": c["garbage"]}, 400,
      "model_path"),
    C("disk-partial", "/update_weights_from_disk", lambda c: {"model_path": c["partial"]}, 400, "missing"),
    C("disk-wrong-shape", "/update_weights_from_disk", lambda c: {"model_path": c["wrong_shape"]}, 400, "shape"),
    C("disk-nan", "/update_weights_from_disk", lambda c: {"model_path": c["nan"]}, 400, "finite"),
    C("disk-weight-version-object", "/update_weights_from_disk",
      lambda c: {"model_path": c["model"], "weight_version": {"a": 1}}, 400, "weight_version"),
    C("tensor-entries-missing", "/update_weights_from_tensor", {"load_format": "safetensors"}, 400,
      "serialized_named_tensors"),
    C("tensor-entries-string", "/update_weights_from_tensor",
      {"serialized_named_tensors": "abc", "load_format": "safetensors"}, 400, "serialized_named_tensors"),
    C("tensor-entry-int", "/update_weights_from_tensor",
      {"serialized_named_tensors": [5], "load_format": "safetensors"}, 400, "serialized_named_tensors[0]"),
    C("tensor-entry-not-base64", "/update_weights_from_tensor",
      {"serialized_named_tensors": ["!!!"], "load_format": "safetensors"}, 400, "serialized_named_tensors[0]"),
    C("tensor-entry-garbage", "/update_weights_from_tensor",
      {"serialized_named_tensors": [b64(b"not a safetensors file")], "load_format": "safetensors"}, 400,
      "serialized_named_tensors[0]"),
    C("tensor-entry-truncated", "/update_weights_from_tensor",
      lambda c: {"serialized_named_tensors": [b64(c["good_bytes"][:-7])], "load_format": "safetensors"}, 400,
      "serialized_named_tensors[0]"),
    C("tensor-second-entry-int", "/update_weights_from_tensor",
      lambda c: {"serialized_named_tensors": [b64(c["changed_bytes"]), 5], "load_format": "safetensors"}, 400,
      "serialized_named_tensors[1]"),
    C("tensor-load-format-missing", "/update_weights_from_tensor",
      lambda c: {"serialized_named_tensors": [b64(c["changed_bytes"])]}, 400, "load_format"),
    C("tensor-unknown-name", "/update_weights_from_tensor",
      lambda c: tensors(c, {"model.norm.weight": torch.full((64,), 3.0), "model.no_such.weight": torch.zeros(2)}),
      400, "no_such"),
    C("tensor-wrong-shape", "/update_weights_from_tensor",
      lambda c: tensors(c, {"model.norm.weight": torch.ones(65)}), 400, "model.norm.weight"),
    C("tensor-expert-beyond-down", "/update_weights_from_tensor",
      lambda c: tensors(c, {f"{EXPERT}.99.down_proj.weight": torch.zeros(64, 64)}), 400, "expert"),
    C("tensor-expert-beyond-gate", "/update_weights_from_tensor",
      lambda c: tensors(c, {f"{EXPERT}.4.gate_proj.weight": torch.zeros(64, 64)}), 400, "expert"),
    C("tensor-int-dtype", "/update_weights_from_tensor",
      lambda c: tensors(c, {"model.norm.weight": torch.ones(64, dtype=torch.int32)}), 400, "dtype"),
    C("tensor-nan", "/update_weights_from_tensor",
      lambda c: tensors(c, {"model.norm.weight": torch.full((64,), NAN)}), 400, "finite"),
    C("tensor-weight-version-list", "/update_weights_from_tensor",
      lambda c: {**tensors(c, {"model.norm.weight": torch.full((64,), 3.0)}), "weight_version": [1]}, 400,
      "weight_version"),
    C("tensor-not-json", "/update_weights_from_tensor", b"{", 400, "JSON"),
    C("tensor-inf", "/update_weights_from_tensor",
      lambda c: tensors(c, {"model.norm.weight": torch.full((64,), INF)}), 400, "finite"),
    C("tensor-float64-overflows-float32", "/update_weights_from_tensor",
      lambda c: tensors(c, {"model.norm.weight": torch.full((64,), 1e300, dtype=torch.float64)}), 400, "finite"),
    C("tensor-empty-file", "/update_weights_from_tensor", lambda c: tensors(c, {}), 400, "at least one tensor"),
    C("tensor-flush-cache-string", "/update_weights_from_tensor",
      lambda c: {**tensors(c, {"model.norm.weight": torch.full((64,), 3.0)}), "flush_cache": "x"}, 400,
      "flush_cache"),
    C("disk-path-is-file", "/update_weights_from_disk", lambda c: {"model_path": c["model"] + "/config.json"}, 400,
      "model_path"),
    C("nccl-group", "/init_weights_update_group", {}, 400, "NCCL"),
    C("nccl-update", "/update_weights_from_distributed", {"names": ["x"]}, 400, "NCCL"),
    # ---- routing
    C("unknown-endpoint", "/no_such_endpoint", {}, 404, "Not Found"),
    C("generate-get", "/generate", None, 405, "Method Not Allowed", method="GET"),
]


def send(url: str, case_body: Any, method: str = "POST", timeout: float = 30) -> tuple[int, str]:
    """One raw HTTP exchange; returns (status, body text). A closed connection is status 0."""
    data = None
    if case_body is not None:
        data = case_body if isinstance(case_body, bytes) else json.dumps(case_body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (ConnectionError, urllib.error.URLError) as e:
        return 0, f"connection failed: {e}"


def message(text: str) -> str:
    """The error message of either reply shape (generate: error.message; weights: message)."""
    try:
        body = json.loads(text)
    except ValueError:
        return text
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return str(body["error"].get("message"))
        if "message" in body:
            return str(body["message"])
    return text


def greedy(srv: ServerProc) -> tuple[list[int], list[float]]:
    status, text = send(srv.url + "/generate", GOOD, timeout=30)
    assert status == 200, f"the good request failed: {status} {text[:500]}"
    reply = json.loads(text)
    return reply["output_ids"], [e[0] for e in reply["meta_info"]["output_token_logprobs"]]


@pytest.fixture(scope="module")
def corpus_server(tiny_models: dict[str, Path]) -> Iterator[ServerProc]:
    srv = ServerProc(tiny_models["moe"], "--enable-return-routed-experts", "--max-context-len", "1024",
                     "--max-request-bytes", str(LIMIT))
    try:
        srv.wait_ready()
        # the tensor cases test what the server makes of a body inside a weight-update session (outside one
        # every tensor update is refused: tests/rollout/test_hf_server.py)
        assert srv.post("/begin_weight_update", {})[0] == 200
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ctx(corpus_server: ServerProc, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, Any]:
    """Files and a session the weight and session cases refer to."""
    root = tmp_path_factory.mktemp("corpus")
    model_dir = Path(tiny_models["moe"])
    ckpt = next(model_dir.glob("*.safetensors"))
    named = load_file(str(ckpt))
    dirs: dict[str, Any] = {"model": str(model_dir)}
    for name in ("truncated", "garbage", "partial", "wrong_shape", "nan"):
        (root / name).mkdir()
        dirs[name] = str(root / name)
    (root / "truncated" / "model.safetensors").write_bytes(ckpt.read_bytes()[:-100])
    (root / "garbage" / "model.safetensors").write_bytes(b"this is not a safetensors file\n" * 10)
    save_file({"model.norm.weight": torch.ones(64)}, str(root / "partial" / "model.safetensors"))
    save_file({**named, "model.norm.weight": torch.ones(65)}, str(root / "wrong_shape" / "model.safetensors"))
    save_file({**named, "model.norm.weight": torch.full((64,), NAN)}, str(root / "nan" / "model.safetensors"))
    dirs["good_bytes"] = save({"model.norm.weight": named["model.norm.weight"]})
    dirs["changed_bytes"] = save({"model.norm.weight": torch.full((64,), 3.0)})
    status, sid = corpus_server.post("/open_session", {"capacity_of_str_len": 1000})
    assert status == 200
    dirs["sid"] = sid
    return dirs


@pytest.fixture(scope="module")
def baseline(corpus_server: ServerProc) -> tuple[list[int], list[float]]:
    assert corpus_server.get("/model_info")[1]["vocab_size"] == VOCAB
    return greedy(corpus_server)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_request_is_rejected_and_harmless(corpus_server, ctx, baseline, case):
    body = case.body(ctx) if callable(case.body) else case.body
    status, text = send(corpus_server.url + case.path, body, method=case.method)
    assert status == case.status, f"{case.name}: got {status} {text[:300]}"
    assert case.needle in message(text), f"{case.name}: message {message(text)[:300]!r} lacks {case.needle!r}"
    assert greedy(corpus_server) == baseline, f"{case.name}: the good request changed (weights touched?)"
    assert send(corpus_server.url + "/health", None, method="GET")[0] == 200


def test_corpus_is_big_enough():
    assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)


def test_bad_requests_concurrent_with_a_long_good_one(corpus_server, baseline):
    """Out-of-vocab ids (and other bad requests) next to a 600-token request: only they fail."""
    long_body = {"input_ids": PROMPT, "return_logprob": True,
                 "sampling_params": {"max_new_tokens": 600, "temperature": 0.0, "ignore_eos": True}}
    solo_status, solo = send(corpus_server.url + "/generate", long_body, timeout=120)
    assert solo_status == 200
    result: dict[str, tuple[int, str]] = {}
    t = threading.Thread(target=lambda: result.__setitem__("long", send(corpus_server.url + "/generate", long_body,
                                                                         timeout=120)))
    t.start()
    deadline = time.monotonic() + 30
    while "hf_server_num_running_reqs 1" not in corpus_server.get("/metrics")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    bad = [g(input_ids=[1, VOCAB + 5]), g(input_ids=[-3]), sp(stop_token_ids=[10 ** 6], min_new_tokens=1),
           g(rid=["a", "b"]), sp(temperature=NAN)]
    for _ in range(3):
        for body in bad:
            status, text = send(corpus_server.url + "/generate", body)
            assert status == 400, text[:300]
    t.join(120)
    status, text = result["long"]
    assert status == 200, text[:300]
    assert json.loads(text)["output_ids"] == json.loads(solo)["output_ids"]
    assert greedy(corpus_server) == baseline


def test_rid_list_with_session_never_wedges_the_scheduler(corpus_server, baseline):
    """The request that used to raise inside the scheduler loop: later requests still complete."""
    status, sid = corpus_server.post("/open_session", {"capacity_of_str_len": 1000})
    assert status == 200
    status, text = send(corpus_server.url + "/generate", g(rid=["a", "b"], session_params={"id": sid}), timeout=10)
    assert status == 400 and "rid" in message(text)
    for _ in range(2):
        status, text = send(corpus_server.url + "/generate", {**g(rid="turn-1"), "session_params": {"id": sid}},
                            timeout=10)
        assert status == 200, text[:300]
        status, text = send(corpus_server.url + "/generate",
                            g(input_ids=[5], session_params={"id": sid, "rid": "turn-1"}), timeout=10)
        assert status == 200, text[:300]
    assert greedy(corpus_server) == baseline
    assert send(corpus_server.url + "/health_generate", None, method="GET", timeout=10)[0] == 200


# ---------------------------------------------------------------- faults inside the scheduler (in-process)
def test_a_failing_request_inside_the_batch_fails_alone_and_a_dead_loop_is_unhealthy(tiny_models):
    """Real model, scheduler and HTTP app in this process. A request that fails inside the batched
    forward (an out-of-vocab id slipped past validation: only reachable in-process now) fails alone
    while a concurrent 300-token request completes equal to its solo run; once the scheduler loop
    is stopped, /health, /health_generate and /generate answer 503 instead of 200 or a hang."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from rollout.hf_server import HFServer, parse_args
    from rollout.hf_server_scheduler import Request, parse_sampling

    long_body = {"input_ids": PROMPT, "return_logprob": True,
                 "sampling_params": {"max_new_tokens": 300, "temperature": 0.0, "ignore_eos": True}}

    async def scenario() -> None:
        server = HFServer(parse_args(["--model-path", str(tiny_models["moe"]), "--max-context-len", "1024"]))
        async with TestClient(TestServer(server.app())) as client:
            solo = await (await client.post("/generate", json=long_body)).json()
            good = asyncio.create_task(client.post("/generate", json=long_body))
            while not server.sched.running:
                await asyncio.sleep(0.01)
            bad = Request(rid="bad", tokens=[1, VOCAB + 5], prompt_len=2,
                          sampling=parse_sampling({"max_new_tokens": 5}, set(), VOCAB, 1024), return_logprob=False,
                          logprob_start_len=-1, return_routed_experts=False, routed_experts_start_len=0,
                          session_id=None)
            with pytest.raises(IndexError):
                await asyncio.wait_for(server.sched.submit(bad, None, bad.tokens), timeout=60)
            resp = await asyncio.wait_for(good, timeout=120)
            assert resp.status == 200
            together = await resp.json()
            assert together["output_ids"] == solo["output_ids"]
            assert [e[0] for e in together["meta_info"]["output_token_logprobs"]] == \
                [e[0] for e in solo["meta_info"]["output_token_logprobs"]]
            assert (await client.get("/health")).status == 200
            assert (await client.get("/health_generate")).status == 200
            # The loop dies (here: cancelled from outside): health must say so, requests must not hang.
            server.sched._task.cancel()
            await asyncio.sleep(0.05)
            for path in ("/health", "/health_generate"):
                resp = await client.get(path)
                assert resp.status == 503 and "scheduler loop has stopped" in (await resp.json())["error"]["message"]
            resp = await asyncio.wait_for(client.post("/generate", json=GOOD), timeout=10)
            assert resp.status == 503

    asyncio.run(scenario())
