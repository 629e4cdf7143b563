"""The subset of SGLang's native HTTP API that mopd speaks, pinned in one place.

Field names and shapes follow SGLang 0.5.x (`io_struct.py`, `http_server.py`): the client builds
requests only through these types, and the local server parses them with the same types, so a
field that SGLang does not know can never be sent, and one SGLang would reject is rejected here.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Keys SGLang's SamplingParams accepts (0.5.x). Anything else is an HTTP 400 in SGLang 0.5.23.
SGLANG_SAMPLING_KEYS = frozenset({
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
    "stop_regex", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "json_schema", "regex", "ebnf",
    "structural_tag", "custom_params", "logit_bias", "sampling_seed", "stream_interval",
})
GENERATE_KEYS = frozenset({
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "return_routed_experts", "routed_experts_start_len", "rid", "session_params",
    "stream",
})
SESSION_KEYS = frozenset({"id", "rid", "offset", "replace", "drop_previous_output"})
FINISH_TYPES = ("stop", "length", "abort")


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; the message names the field."""


@dataclass
class SessionParams:
    id: str
    rid: str | None = None  # continue after this earlier request of the session
    offset: int | None = None
    replace: bool | None = None
    drop_previous_output: bool | None = None


@dataclass
class GenerateRequest:
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only; k: also prompt tokens from position k
    top_logprobs_num: int = 0  # with return_logprob: also the k most likely tokens at each of those positions
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    rid: str | None = None
    session_params: SessionParams | None = None
    stream: bool = False

    def to_json(self) -> dict[str, Any]:
        """The body SGLang receives; optional fields left unset are omitted, as SGLang's client does."""
        body: dict[str, Any] = {"input_ids": list(self.input_ids), "sampling_params": dict(self.sampling_params)}
        if self.return_logprob:
            body["return_logprob"] = True
            body["logprob_start_len"] = self.logprob_start_len
            if self.top_logprobs_num > 0:
                body["top_logprobs_num"] = self.top_logprobs_num
        if self.return_routed_experts:
            body["return_routed_experts"] = True
            body["routed_experts_start_len"] = self.routed_experts_start_len
        if self.rid is not None:
            body["rid"] = self.rid
        if self.session_params is not None:
            body["session_params"] = {k: v for k, v in asdict(self.session_params).items() if v is not None}
        if self.stream:
            body["stream"] = True
        validate_generate_body(body)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> GenerateRequest:
        validate_generate_body(body)
        if "input_ids" not in body:
            raise ProtocolError("input_ids: this server takes token ids (`text` is not supported)")
        session = body.get("session_params")
        return cls(
            input_ids=list(body["input_ids"]), sampling_params=dict(body.get("sampling_params") or {}),
            return_logprob=bool(body.get("return_logprob", False)),
            logprob_start_len=int(body.get("logprob_start_len", -1)),
            top_logprobs_num=int(body.get("top_logprobs_num") or 0),
            return_routed_experts=bool(body.get("return_routed_experts", False)),
            routed_experts_start_len=int(body.get("routed_experts_start_len", 0)), rid=body.get("rid"),
            session_params=SessionParams(**session) if session else None, stream=bool(body.get("stream", False)))


def validate_generate_body(body: dict[str, Any]) -> None:
    unknown = set(body) - GENERATE_KEYS
    if unknown:
        raise ProtocolError(f"unknown /generate field(s) {sorted(unknown)}; expected a subset of {sorted(GENERATE_KEYS)}")
    if ("text" in body) == ("input_ids" in body):
        raise ProtocolError("exactly one of `text` and `input_ids` is required")
    ids = body.get("input_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ProtocolError("input_ids: expected a list of integer token ids")
        if not ids and not body.get("session_params"):
            raise ProtocolError("input_ids: expected a non-empty prompt")
    unknown = set(body.get("sampling_params") or {}) - SGLANG_SAMPLING_KEYS
    if unknown:
        raise ProtocolError(f"sampling_params: unknown key(s) {sorted(unknown)}")
    session = body.get("session_params")
    if session is not None:
        if not isinstance(session, dict) or "id" not in session:
            raise ProtocolError("session_params: expected an object with an `id`")
        if set(session) - SESSION_KEYS:
            raise ProtocolError(f"session_params: unknown key(s) {sorted(set(session) - SESSION_KEYS)}")


@dataclass
class GenerateResponse:
    text: str
    output_ids: list[int]
    finish_reason: str  # stop | length | abort
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    weight_version: str
    output_logprobs: list[float] | None  # one per output token
    input_logprobs: list[float | None] | None  # from logprob_start_len; None where undefined (first token)
    routed_experts: np.ndarray | None  # int32 [rows, num_hidden_layers, top_k]
    rid: str | None = None
    # top_logprobs_num > 0: per position, [(logprob, token_id), ...] most likely first; None where undefined
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    output_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    # speculative decoding (SGLang's meta_info names; absent without speculation): decode forwards
    # (verify steps) and completion_tokens / spec_verify_ct
    spec_verify_ct: int | None = None
    spec_accept_length: float | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any], *, num_layers: int | None = None, top_k: int | None = None
                  ) -> GenerateResponse:
        try:
            meta = body["meta_info"]
            finish = meta.get("finish_reason") or {"type": "length"}
            finish_type = finish["type"] if isinstance(finish, dict) else str(finish)
            experts = meta.get("routed_experts")
            return cls(
                text=body.get("text", ""), output_ids=list(body["output_ids"]), finish_reason=finish_type,
                prompt_tokens=int(meta.get("prompt_tokens", 0)),
                completion_tokens=int(meta.get("completion_tokens", len(body["output_ids"]))),
                cached_tokens=int(meta.get("cached_tokens", 0)), weight_version=str(meta.get("weight_version", "")),
                output_logprobs=_logprob_values(meta.get("output_token_logprobs")),
                input_logprobs=_logprob_values(meta.get("input_token_logprobs")),
                routed_experts=(decode_routed_experts(experts, num_layers, top_k)
                                if experts is not None and num_layers and top_k else None),
                rid=meta.get("id"), input_top_logprobs=_top_logprob_values(meta.get("input_top_logprobs")),
                output_top_logprobs=_top_logprob_values(meta.get("output_top_logprobs")),
                spec_verify_ct=int(meta["spec_verify_ct"]) if meta.get("spec_verify_ct") is not None else None,
                spec_accept_length=(float(meta["spec_accept_length"]) if meta.get("spec_accept_length") is not None
                                    else None))
        except (KeyError, TypeError, IndexError) as e:
            raise ProtocolError(f"malformed /generate response: missing or bad {e}") from None


def _logprob_values(entries: list | None) -> list | None:
    """SGLang sends [logprob, token_id, text_or_null] triples; keep the logprobs."""
    if entries is None:
        return None
    return [None if e[0] is None else float(e[0]) for e in entries]


def _top_logprob_values(positions: list | None) -> list | None:
    """SGLang sends, per position, a list of [logprob, token_id, text_or_null] (or null); keep the pairs."""
    if positions is None:
        return None
    return [None if entries is None else [(float(e[0]), int(e[1])) for e in entries] for entries in positions]


def top_logprob_entries(rows: list[list[tuple[float, int]] | None]) -> list[list[list] | None]:
    """Per position, [logprob, token_id, None] triples in SGLang's layout (most likely first), or None."""
    return [None if row is None else [[float(lp), int(t), None] for lp, t in row] for row in rows]


def logprob_entries(logprobs: list[float | None], token_ids: list[int]) -> list[list]:
    return [[lp, tid, None] for lp, tid in zip(logprobs, token_ids)]


def encode_routed_experts(experts: np.ndarray) -> str:
    """[rows, num_hidden_layers, top_k] -> base64 of little-endian int32, as SGLang sends it."""
    return base64.b64encode(np.ascontiguousarray(experts, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(data: str, num_layers: int, top_k: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(data), dtype="<i4")
    if raw.size % (num_layers * top_k):
        raise ProtocolError(f"routed_experts: {raw.size} values is not a multiple of num_layers*top_k "
                            f"({num_layers}*{top_k})")
    return raw.reshape(-1, num_layers, top_k).astype(np.int32)
