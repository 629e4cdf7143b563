"""Input validation of the local HF server: everything a client sends is checked here, before it
reaches the scheduler or the model, so a bad request is an HTTP 400 that names the field and never
disturbs another request or the weights.

Semantics follow SGLang 0.5.23 (`SamplingParams.__post_init__`/`verify()`, `io_struct.py`):
temperature is a finite number >= 0 and anything below 1e-6 means greedy; top_p in (0, 1]; top_k
is -1 (whole vocabulary) or >= 1 (values above the vocabulary mean all of it); min_p in [0, 1];
frequency/presence penalty in [-2, 2]; repetition penalty in (0, 2]; min_new_tokens in
[0, max_new_tokens]; sampling_seed an integer in [-2**63, 2**63 - 1]; logit_bias keys are token
ids in [0, vocab). Stricter than SGLang, on purpose: JSON types are checked exactly (no bool for a
number, no 2.0 for an integer, no string for a bool), prompt and stop token ids must lie in
[0, vocab), `rid` is one string (this server has no batch requests), and weights pushed to the
server must be finite (a diverged trainer fails loudly instead of serving NaN).
"""

from __future__ import annotations

import base64
import binascii
import glob
import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from rollout.sglang_api import (
    GENERATE_KEYS,
    SESSION_KEYS,
    SGLANG_SAMPLING_KEYS,
    GenerateRequest,
    SessionParams,
)

SAMPLING_EPS = 1e-6  # SGLang: 0 <= temperature < 1e-6 is greedy
INT64 = (-(2 ** 63), 2 ** 63 - 1)
MAX_STOP_COUNT = 32  # SGLang's MAX_STOP_COUNT / MAX_STOP_REGEX_COUNT
MAX_ID_LEN = 4096  # rid / session id characters: ids, not payloads
_MISSING = object()


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message says why."""


class FieldError(RequestError):
    """A field with a bad value: `field `f`: expected ..., got ...`."""

    def __init__(self, field: str, expected: str, got: Any = _MISSING) -> None:
        self.field = field
        tail = "" if got is _MISSING else f", got {show(got)}"
        super().__init__(f"field `{field}`: expected {expected}{tail}")


class Unsupported(RequestError):
    """A valid SGLang field this server does not implement."""

    def __init__(self, field: str, value: Any) -> None:
        super().__init__(f"field `{field}`: {show(value)} is not supported by the local HF server")


class BodyError(RequestError):
    """The body is not a JSON object (HTTP 400)."""


def show(value: Any, limit: int = 80) -> str:
    """A short, JSON-like rendering of a bad value for an error message."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int) and abs(value) > 10 ** 30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value, default=str)[:limit + 1]
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- scalar checks
def integer(value: Any, field: str, lo: int | None = None, hi: int | None = None, default: Any = _MISSING) -> int:
    """A JSON integer (not a bool, not 2.0) in [lo, hi]; null/absent gives `default` when one is set."""
    if value is None and default is not _MISSING:
        return default
    rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (
        f" >= {lo}" if lo is not None else (f" <= {hi}" if hi is not None else ""))
    if not isinstance(value, int) or isinstance(value, bool):
        raise FieldError(field, f"an integer{rng}", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise FieldError(field, f"an integer{rng}", value)
    return value


def number(value: Any, field: str, lo: float, hi: float, *, lo_open: bool = False, default: Any = _MISSING,
           what: str | None = None) -> float:
    """A finite JSON number (not a bool) in [lo, hi] (or (lo, hi] with lo_open)."""
    if value is None and default is not _MISSING:
        return default
    expected = what or f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FieldError(field, expected, value)
    try:
        x = float(value)
    except OverflowError:
        raise FieldError(field, expected, value) from None
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise FieldError(field, expected, value)
    return x


def boolean(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(field, "true or false", value)
    return value


def string(value: Any, field: str, *, default: Any = _MISSING, max_len: int | None = None,
           non_empty: bool = False) -> Any:
    if value is None and default is not _MISSING:
        return default
    if not isinstance(value, str) or (non_empty and not value) or (max_len is not None and len(value) > max_len):
        limit = f" of at most {max_len} characters" if max_len else ""
        raise FieldError(field, f"a {'non-empty ' if non_empty else ''}string{limit}", value)
    return value


def obj(value: Any, field: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(field, "a JSON object", value)
    if allowed is not None and set(value) - allowed:
        raise RequestError(f"field `{field}`: unknown key(s) {sorted(set(value) - allowed)}; "
                           f"expected a subset of {sorted(allowed)}")
    return value


def token_ids(value: Any, field: str, vocab_size: int) -> list[int]:
    """A list of token ids, each an integer in [0, vocab_size)."""
    expected = f"a list of token ids (integers in [0, {vocab_size}))"
    if not isinstance(value, list):
        raise FieldError(field, expected, value)
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise FieldError(f"{field}[{i}]", f"a token id (an integer in [0, {vocab_size}))", t)
    return value


def _strings(value: Any, field: str) -> list[str]:
    """SGLang's `stop`/`stop_regex`: a string or a list of at most 32 strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list) or len(value) > MAX_STOP_COUNT or not all(isinstance(s, str) for s in value):
        raise FieldError(field, f"a string or a list of at most {MAX_STOP_COUNT} strings", value)
    return [s for s in value if s]


# ---------------------------------------------------------------- /generate
def sampling_params(params: dict[str, Any], *, vocab_size: int, max_new_limit: int) -> dict[str, Any]:
    """SGLang's sampling keys, checked and with defaults filled in; unimplemented non-neutral ones refused."""
    f = "sampling_params."
    p = obj(params, "sampling_params")
    unknown = set(p) - SGLANG_SAMPLING_KEYS
    if unknown:
        raise RequestError(f"field `sampling_params`: unknown key(s) {sorted(unknown)}; expected a subset of "
                           f"{sorted(SGLANG_SAMPLING_KEYS)}")
    out: dict[str, Any] = {}
    out["max_new_tokens"] = integer(p.get("max_new_tokens"), f + "max_new_tokens", 0, max_new_limit, default=128)
    out["min_new_tokens"] = integer(p.get("min_new_tokens"), f + "min_new_tokens", 0, out["max_new_tokens"],
                                    default=0)
    t = number(p.get("temperature"), f + "temperature", 0.0, math.inf, default=1.0,
               what="a finite number >= 0")
    if t == math.inf:
        raise FieldError(f + "temperature", "a finite number >= 0", p.get("temperature"))
    out["temperature"] = 0.0 if t < SAMPLING_EPS else t  # SGLang: below 1e-6 is greedy
    out["top_p"] = number(p.get("top_p"), f + "top_p", 0.0, 1.0, lo_open=True, default=1.0)
    top_k = p.get("top_k")
    top_k = -1 if top_k is None else top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k == 0 or top_k < -1:
        raise FieldError(f + "top_k", "-1 (whole vocabulary) or an integer >= 1", top_k)
    out["top_k"] = top_k
    neutral = [("min_p", 0.0, 1.0, False, 0.0), ("frequency_penalty", -2.0, 2.0, False, 0.0),
               ("presence_penalty", -2.0, 2.0, False, 0.0), ("repetition_penalty", 0.0, 2.0, True, 1.0)]
    for key, lo, hi, lo_open, default in neutral:
        if number(p.get(key), f + key, lo, hi, lo_open=lo_open, default=default) != default:
            raise Unsupported(f + key, p[key])
    if integer(p.get("n"), f + "n", 1, None, default=1) != 1:
        raise Unsupported(f + "n", p["n"])
    for key in ("stop", "stop_regex"):
        if _strings(p.get(key), f + key):
            raise Unsupported(f + key, p[key])
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        if string(p.get(key), f + key, default=None):
            raise Unsupported(f + key, p[key])
    if p.get("custom_params") is not None and obj(p["custom_params"], f + "custom_params"):
        raise Unsupported(f + "custom_params", p["custom_params"])
    bias = p.get("logit_bias")
    if bias is not None:
        for k, v in obj(bias, f + "logit_bias").items():
            try:
                ok = 0 <= int(k) < vocab_size
            except ValueError:
                ok = False
            if not ok:
                raise FieldError(f + "logit_bias", f"token id keys in [0, {vocab_size})", k)
            number(v, f"{f}logit_bias[{k!r}]", -math.inf, math.inf, what="a finite number")
        if bias:
            raise Unsupported(f + "logit_bias", bias)
    integer(p.get("stream_interval"), f + "stream_interval", 1, None, default=None)
    out["stop_token_ids"] = token_ids(p.get("stop_token_ids") or [], f + "stop_token_ids", vocab_size)
    out["sampling_seed"] = integer(p.get("sampling_seed"), f + "sampling_seed", *INT64, default=None)
    for key, default in (("ignore_eos", False), ("skip_special_tokens", True),
                         ("spaces_between_special_tokens", True), ("no_stop_trim", False)):
        out[key] = boolean(p.get(key), f + key, default)
    return out


def generate_request(body: Any, *, vocab_size: int, max_context_len: int) -> tuple[GenerateRequest, dict[str, Any]]:
    """The whole /generate body checked: (the protocol request, its checked sampling parameters)."""
    if not isinstance(body, dict):
        raise BodyError(f"request body: expected a JSON object, got {type(body).__name__}")
    unknown = set(body) - GENERATE_KEYS
    if unknown:
        raise RequestError(f"unknown /generate field(s) {sorted(unknown)}; expected a subset of {sorted(GENERATE_KEYS)}")
    if "text" in body and "input_ids" in body:
        raise RequestError("fields `text` and `input_ids`: exactly one is required")
    if "input_ids" not in body:
        raise FieldError("input_ids", "a list of token ids (this server takes token ids; `text` is not supported)")
    session = _session_params(body.get("session_params"))
    if isinstance(body["input_ids"], list) and len(body["input_ids"]) > max_context_len:
        raise FieldError("input_ids", f"at most {max_context_len} tokens (the server's --max-context-len)",
                         f"{len(body['input_ids'])} tokens")
    ids = token_ids(body["input_ids"], "input_ids", vocab_size)
    if not ids and session is None:
        raise FieldError("input_ids", "a non-empty prompt (empty only to continue a session)", ids)
    raw_sampling = body.get("sampling_params")
    sampling = sampling_params({} if raw_sampling is None else raw_sampling, vocab_size=vocab_size,
                               max_new_limit=max_context_len)
    return_logprob = boolean(body.get("return_logprob"), "return_logprob", False)
    boolean(body.get("return_text_in_logprobs"), "return_text_in_logprobs", False)
    if boolean(body.get("stream"), "stream", False):
        raise Unsupported("stream", True)
    req = GenerateRequest(
        input_ids=ids, sampling_params=dict(body.get("sampling_params") or {}), return_logprob=return_logprob,
        logprob_start_len=integer(body.get("logprob_start_len"), "logprob_start_len", -1, None, default=-1),
        top_logprobs_num=integer(body.get("top_logprobs_num"), "top_logprobs_num", 0, vocab_size, default=0),
        return_routed_experts=boolean(body.get("return_routed_experts"), "return_routed_experts", False),
        routed_experts_start_len=integer(body.get("routed_experts_start_len"), "routed_experts_start_len", 0, None,
                                         default=0),
        rid=string(body.get("rid"), "rid", default=None, max_len=MAX_ID_LEN), session_params=session)
    return req, sampling


def _session_params(value: Any) -> SessionParams | None:
    if value is None:
        return None
    s = obj(value, "session_params", SESSION_KEYS)
    if "id" not in s:
        raise FieldError("session_params.id", "the id of an open session (a string)")
    sid = string(s["id"], "session_params.id", non_empty=True, max_len=MAX_ID_LEN)
    rid = string(s.get("rid"), "session_params.rid", default=None, max_len=MAX_ID_LEN)
    if s.get("offset") is not None:
        integer(s["offset"], "session_params.offset", 0, None)
        raise Unsupported("session_params.offset", s["offset"])
    replace = boolean(s.get("replace"), "session_params.replace", False)
    if replace:
        raise Unsupported("session_params.replace", True)
    drop = boolean(s.get("drop_previous_output"), "session_params.drop_previous_output", False)
    return SessionParams(id=sid, rid=rid, replace=replace or None, drop_previous_output=drop or None)


# ---------------------------------------------------------------- control endpoints
def body_object(body: Any) -> dict[str, Any]:
    """Control endpoints take a JSON object; an empty body counts as {}."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BodyError(f"request body: expected a JSON object, got {type(body).__name__}")
    return body


def parse_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON; None for an empty body. Deep nesting and bad bytes are 400s, not 500s."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BodyError(f"request body is not UTF-8 JSON: {e}") from None
    except ValueError as e:
        raise BodyError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BodyError("request body is not valid JSON: nested too deeply") from None


# ---------------------------------------------------------------- weight updates
def weight_version(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldError("weight_version", "a string (or an integer)", value)
    return str(string(str(value), "weight_version", max_len=MAX_ID_LEN))


def read_checkpoint(path: Any) -> dict[str, torch.Tensor]:
    """Every *.safetensors file of a checkpoint directory, read fully before any weight is touched."""
    path = string(path, "model_path", non_empty=True)
    if not os.path.isdir(path):
        raise FieldError("model_path", "a checkpoint directory with *.safetensors files",
                         f"{path} (not a directory)")
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise FieldError("model_path", "a checkpoint directory with *.safetensors files", f"{path} (none found)")
    named: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            named.update(load_file(file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad files
            raise FieldError("model_path", "readable safetensors files",
                             f"{os.path.basename(file)}: {type(e).__name__}: {e}") from None
    return named


def serialized_tensors(body: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`/update_weights_from_tensor`: rank 0's entry decoded (single process = TP 1); all entries type-checked."""
    fmt = body.get("load_format")
    if fmt != "safetensors":
        raise FieldError("load_format", '"safetensors" (SGLang\'s default CUDA-IPC serializer cannot cross '
                         "processes on CPU)", fmt)
    entries = body.get("serialized_named_tensors")
    if not isinstance(entries, list) or not entries:
        raise FieldError("serialized_named_tensors", "a non-empty list (one entry per TP rank)", entries)
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise FieldError(f"serialized_named_tensors[{i}]", "a base64 string of safetensors bytes", entry)
    try:
        data = base64.b64decode(entries[0], validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError("serialized_named_tensors[0]", "base64 of safetensors bytes", f"invalid base64 ({e})") from None
    try:
        named = safetensors_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad bytes
        raise FieldError("serialized_named_tensors[0]", "safetensors bytes",
                         f"bytes that do not parse ({type(e).__name__}: {e})") from None
    if not named:
        raise FieldError("serialized_named_tensors[0]", "at least one tensor", "an empty safetensors file")
    return named
