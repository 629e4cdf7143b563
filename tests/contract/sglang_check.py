"""Check recorded mopd request bodies (and local-server answers) against the real `sglang` package.

Run with the contract venv's interpreter (`.venv-sglang/bin/python`, made by setup_sglang.sh), never
with mopd's: it imports SGLang, not mopd. Input: a JSON file
    {"vocab_size": int,
     "requests":  [{"mode", "method", "path", "body"}, ...],
     "responses": [{"mode", "request", "response", "num_layers", "top_k"}, ...]}   (optional)
Output (stdout): one JSON report. Exit status 0 when it could check; the caller judges the report.

Why each step: SGLang's HTTP layer ignores unknown top-level keys silently, so a misspelt field would
pass unnoticed; only a comparison with the request class's own fields catches it. The endpoint ->
request class map is read from SGLang's http_server.py source (its route decorators and the `obj`
annotation), so a renamed class or a moved route in a future release shows up here.
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import functools
import importlib.util
import json
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

# Endpoints whose handler takes no JSON body in SGLang (a body sent there is ignored).
NO_BODY = {"/flush_cache", "/health", "/health_generate", "/model_info", "/get_model_info"}


def route_classes(http_server_source: str) -> dict[str, str]:
    """{path: request class name} for every route whose handler has an `obj: X` / `Annotated[X, Body()]`."""
    routes: dict[str, str] = {}
    for node in ast.walk(ast.parse(http_server_source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        paths = [d.args[0].value for d in node.decorator_list
                 if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.args
                 and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)
                 and d.func.attr in ("post", "get", "put", "api_route")]
        obj = next((a for a in node.args.args if a.arg == "obj"), None)
        if not paths or obj is None or obj.annotation is None:
            continue
        ann = obj.annotation
        if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Annotated":
            ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
        if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Optional":
            ann = ann.slice
        if isinstance(ann, ast.Name):
            for p in paths:
                routes[p] = ann.id
    return routes


def class_fields(cls: type) -> list[str]:
    """Field names of a request class, dataclass or msgspec Struct (inherited fields included)."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(getattr(cls, "__struct_fields__", ()))


class Checker:
    """Holds SGLang's classes once imported (the import is the slow part: ~20-50 s on a CPU machine)."""

    def __init__(self) -> None:
        import pydantic
        import sglang
        from sglang.srt.entrypoints import api_contract
        from sglang.srt.managers import io_struct
        from sglang.srt.sampling.sampling_params import SamplingParams

        self.version = sglang.__version__
        self.pydantic = pydantic
        self.io = io_struct
        self.SamplingParams = SamplingParams
        self.contract_error = api_contract.generate_contract_error
        # Read, not imported: importing http_server starts building the FastAPI app and its GPU-side imports.
        spec = importlib.util.find_spec("sglang.srt.entrypoints.http_server")
        assert spec is not None and spec.origin, "sglang.srt.entrypoints.http_server not found"
        self.routes = route_classes(Path(spec.origin).read_text())
        self._adapters: dict[type, Any] = {}
        self.tokenizer: Any = None  # the served model's tokenizer, as the TokenizerManager holds it (None: skip init)

    def adapter(self, cls: type) -> Any:
        """FastAPI parses a body into the handler's class with pydantic; the same adapter is used here."""
        if cls not in self._adapters:
            self._adapters[cls] = self.pydantic.TypeAdapter(cls)
        return self._adapters[cls]

    def check_request(self, method: str, path: str, body: Any, vocab_size: int) -> dict[str, Any]:
        """One body: unknown keys, construction by SGLang's own parser, /generate normalisation + sampling checks."""
        out: dict[str, Any] = {"method": method, "path": path, "unknown_keys": [], "errors": []}
        if path in NO_BODY:
            if isinstance(body, dict) and body:
                out["unknown_keys"] = sorted(body)  # SGLang reads no body here: every key is ignored
            out["class"] = None
            return out
        name = self.routes.get(path)
        if name is None:
            out["errors"].append(f"SGLang {self.version} has no route {path} taking a request object")
            return out
        cls = getattr(self.io, name, None)
        if cls is None:
            out["errors"].append(f"route {path} names {name}, which io_struct does not define")
            return out
        out["class"] = name
        if not isinstance(body, dict):
            out["errors"].append(f"body is {type(body).__name__}, expected a JSON object")
            return out
        known = set(class_fields(cls))
        out["unknown_keys"] = sorted(set(body) - known)
        try:
            obj = self.adapter(cls).validate_python(body)
        except Exception as e:  # noqa: BLE001 - any parse failure is what FastAPI would answer 422 to
            out["errors"].append(f"{name} rejects the body: {e}")
            return out
        if path == "/generate":
            self._check_generate(obj, body, vocab_size, out)
        return out

    def _check_generate(self, obj: Any, body: dict[str, Any], vocab_size: int, out: dict[str, Any]) -> None:
        contract = self.contract_error(body)  # the HTTP layer's schema gate (400 in the server)
        if contract is not None:
            out["errors"].append(f"api contract: {contract}")
        try:
            obj.normalize_batch_and_arguments()
        except Exception as e:  # noqa: BLE001
            out["errors"].append(f"normalize_batch_and_arguments: {e!r}")
        sp = body.get("sampling_params") or {}
        try:
            params = self.SamplingParams(**sp)
            params.normalize(self.tokenizer)
            params.verify(vocab_size)
        except Exception as e:  # noqa: BLE001
            out["errors"].append(f"SamplingParams: {e!r}")
        session = body.get("session_params")
        if session is not None:
            cls = getattr(self.io, "SessionParams", None)
            if cls is None:
                out["errors"].append(f"SGLang {self.version} has no io_struct.SessionParams for session_params")
                return
            known = set(class_fields(cls))
            out["unknown_keys"] += [f"session_params.{k}" for k in sorted(set(session) - known)]
            try:
                cls(**{k: v for k, v in session.items() if k in known})  # as the tokenizer manager builds it
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"SessionParams: {e!r}")

    # --- responses ------------------------------------------------------------------------------
    def check_response(self, request: dict[str, Any], response: dict[str, Any], num_layers: int | None,
                       top_k: int | None) -> dict[str, Any]:
        """The local server's /generate answer through SGLang's response schema and its own post-processing.

        - api_types.GenerateResponse: the JSON schema SGLang's answers follow (types of every meta_info field);
        - TokenizerManager.detokenize_logprob_tokens / detokenize_top_logprobs_tokens: how SGLang turns the
          scheduler's (values, ids) lists into meta_info entries; re-running them on the values the local
          server returned must give the same entries;
        - DetokenizerManager._b64_encode_per_request: SGLang's routed-experts encoding; decoding the local
          server's base64 with SGLang's dtype must give the rows mopd decodes.
        """
        from sglang.api.v1.api_types import GenerateResponse
        from sglang.srt.managers.detokenizer_manager import DetokenizerManager
        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        out: dict[str, Any] = {"errors": [], "checked": [], "sglang_values": {}}
        values = out["sglang_values"]
        try:
            GenerateResponse.from_json_value(response)
            out["checked"].append("api_types.GenerateResponse")
        except Exception as e:  # noqa: BLE001
            out["errors"].append(f"api_types.GenerateResponse rejects the answer: {e}")
        meta = response.get("meta_info") or {}

        fake_tm = types.SimpleNamespace(tokenizer=None)
        fake_tm.detokenize_logprob_tokens = functools.partial(TokenizerManager.detokenize_logprob_tokens, fake_tm)
        for key in ("input_token_logprobs", "output_token_logprobs"):
            entries = meta.get(key)
            if entries is None:
                continue
            vals, idx = [e[0] for e in entries], [e[1] for e in entries]
            rebuilt = [list(t) for t in TokenizerManager.detokenize_logprob_tokens(fake_tm, vals, idx, False)]
            if rebuilt != [list(e) for e in entries]:
                out["errors"].append(f"{key}: SGLang would build {rebuilt[:3]}..., the server sent {entries[:3]}...")
            values[key] = [None if e[0] is None else float(e[0]) for e in rebuilt]
            out["checked"].append(f"TokenizerManager.detokenize_logprob_tokens({key})")
        for key in ("input_top_logprobs", "output_top_logprobs"):
            rows = meta.get(key)
            if rows is None:
                continue
            vals = [None if r is None else [e[0] for e in r] for r in rows]
            idx = [None if r is None else [e[1] for e in r] for r in rows]
            rebuilt = TokenizerManager.detokenize_top_logprobs_tokens(fake_tm, vals, idx, False)
            rebuilt = [None if r is None else [list(t) for t in r] for r in rebuilt]
            if rebuilt != [None if r is None else [list(e) for e in r] for r in rows]:
                out["errors"].append(f"{key}: SGLang's rows differ from the server's")
            values[key] = [None if r is None else [[float(t[0]), int(t[1])] for t in r] for r in rebuilt]
            out["checked"].append(f"TokenizerManager.detokenize_top_logprobs_tokens({key})")
        experts = meta.get("routed_experts")
        if experts is not None and num_layers and top_k:
            import numpy as np
            import torch

            raw = np.frombuffer(base64.b64decode(experts), dtype=np.int32)
            rows = torch.from_numpy(raw.copy()).reshape(-1, num_layers, top_k)
            again = DetokenizerManager._b64_encode_per_request([rows])[0]
            if again != experts:
                out["errors"].append("routed_experts: SGLang's encoder gives a different string for the same rows")
            out["routed_experts_rows"] = int(rows.shape[0])
            values["routed_experts"] = rows.tolist()
            out["checked"].append("DetokenizerManager._b64_encode_per_request(routed_experts)")
        return out


def scheduler_input_logprobs(input_ids: list[int], start: int, reference: dict[str, Any], top_k: int,
                             vocab_size: int) -> dict[str, Any]:
    """What SGLang returns as input logprobs for (input_ids, logprob_start_len=start), built by SGLang's own code.

    The model-side numbers come from `reference`, the local server's answer for the same ids with
    logprob_start_len=0, whose entry i is log p(x_i | x_<i). SGLang's ScheduleBatch.prepare_for_extend asks the
    logits processor, at each position i >= start, for the logprob of the NEXT input token x_{i+1} (the last
    position padded with token 0); SchedulerLogprobResultProcessor._process_input_token_logprobs /
    _process_input_top_logprobs then put None first and drop the last. Both steps are replayed here, the second
    by calling SGLang's functions.
    """
    from sglang.srt.managers.scheduler_components.logprob_result_processor import (
        SchedulerLogprobResultProcessor,
    )

    n = len(input_ids)
    ref = reference["meta_info"]["input_token_logprobs"]
    raw = [ref[i + 1][0] for i in range(start, n - 1)] + [0.0]  # logits processor output at positions start..n-1
    req = types.SimpleNamespace(
        logprob=types.SimpleNamespace(top_logprobs_num=top_k), origin_input_ids=list(input_ids),
        logprob_start_len=start, is_prefill_only=False, token_indices_to_pool=None,
        multi_item_delimiter_indices=None, temp_input_top_logprobs_val=None, temp_input_top_logprobs_idx=None)
    if top_k > 0:
        tops = reference["meta_info"]["input_top_logprobs"]
        req.temp_input_top_logprobs_val = [[[e[0] for e in tops[i + 1][:top_k]] for i in range(start, n - 1)]
                                           + [[0.0] * top_k]]
        req.temp_input_top_logprobs_idx = [[[e[1] for e in tops[i + 1][:top_k]] for i in range(start, n - 1)]
                                           + [[0] * top_k]]
    processor = SchedulerLogprobResultProcessor(model_config=types.SimpleNamespace(vocab_size=vocab_size))
    processor._process_input_token_logprobs(req, raw)
    processor._process_input_top_logprobs(req)
    out = {"input_token_logprobs": req.logprob.input_token_logprobs_val,
           "input_token_ids": req.logprob.input_token_logprobs_idx}
    if top_k > 0:
        out["input_top_logprobs"] = [None if v is None else [[a, b] for a, b in zip(v, i)]
                                     for v, i in zip(req.logprob.input_top_logprobs_val,
                                                     req.logprob.input_top_logprobs_idx)]
    return out


def _close(a: Any, b: Any, tol: float = 1e-4) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= tol


def alignment_report(responses: list[dict[str, Any]], vocab_size: int) -> list[dict[str, Any]]:
    """For every answered request with logprob_start_len > 0 whose ids also have a start-0 reference: SGLang's
    input logprobs (scheduler_input_logprobs) against the local server's, entry by entry."""
    refs = {tuple(r["request"]["input_ids"]): r["response"] for r in responses
            if r["request"].get("logprob_start_len") == 0 and not r["request"].get("session_params")}
    rows = []
    for r in responses:
        req, resp = r["request"], r["response"]
        start = req.get("logprob_start_len", -1)
        ref = refs.get(tuple(req.get("input_ids") or ()))
        if not req.get("return_logprob") or start is None or start <= 0 or ref is None or req.get("session_params"):
            continue
        k = int(req.get("top_logprobs_num") or 0)
        sglang = scheduler_input_logprobs(req["input_ids"], start, ref, k, vocab_size)
        server = [e[0] for e in resp["meta_info"]["input_token_logprobs"]]
        row: dict[str, Any] = {
            "mode": r.get("mode"), "id": r.get("id"), "logprob_start_len": start, "input_len": len(req["input_ids"]),
            "sglang": sglang["input_token_logprobs"], "server": server,
            "equal": len(server) == len(sglang["input_token_logprobs"])
            and all(_close(a, b) for a, b in zip(server, sglang["input_token_logprobs"]))}
        if k > 0:
            server_top = resp["meta_info"].get("input_top_logprobs") or []
            sglang_top = sglang["input_top_logprobs"]
            row["top_equal"] = len(server_top) == len(sglang_top) and all(
                (a is None) == (b is None) and (a is None or (
                    [e[1] for e in a[:k]] == [e[1] for e in b] and all(_close(x[0], y[0]) for x, y in zip(a, b))))
                for a, b in zip(server_top, sglang_top))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", type=Path)
    args = p.parse_args(argv)
    data = json.loads(args.records.read_text())
    start = time.monotonic()
    checker = Checker()
    import_s = time.monotonic() - start
    vocab = int(data.get("vocab_size", 0)) or 2**31 - 1
    tokenizer_note = "none given: SamplingParams.normalize(None), as with --skip-tokenizer-init"
    if data.get("tokenizer_path"):
        from transformers import AutoTokenizer

        try:
            checker.tokenizer = AutoTokenizer.from_pretrained(data["tokenizer_path"])
            tokenizer_note = f"{type(checker.tokenizer).__name__} from {data['tokenizer_path']}"
        except Exception as e:  # noqa: BLE001 - then stop strings / min_new_tokens are checked without one
            tokenizer_note = f"could not load {data['tokenizer_path']} ({e!r:.200}); normalize(None)"
    requests = []
    for rec in data.get("requests", []):
        try:
            result = checker.check_request(rec["method"], rec["path"], rec.get("body"), vocab)
        except Exception:  # noqa: BLE001 - a crash in the checker is an error of that record, not of the run
            result = {"path": rec.get("path"), "unknown_keys": [], "errors": [traceback.format_exc(limit=3)]}
        result["mode"] = rec.get("mode")
        result["id"] = rec.get("id")
        requests.append(result)
    responses = []
    for rec in data.get("responses", []):
        try:
            result = checker.check_response(rec["request"], rec["response"], rec.get("num_layers"), rec.get("top_k"))
        except Exception:  # noqa: BLE001
            result = {"errors": [traceback.format_exc(limit=3)], "checked": []}
        result["mode"] = rec.get("mode")
        result["id"] = rec.get("id")
        responses.append(result)
    try:
        alignment = alignment_report(data.get("responses", []), vocab)
    except Exception:  # noqa: BLE001 - reported; the test asserts on it
        alignment = [{"error": traceback.format_exc(limit=3), "equal": False}]
    unknown = sorted({f"{r['path']}: {k}" for r in requests for k in r["unknown_keys"]})
    report = {
        "sglang_version": checker.version, "import_s": round(import_s, 1), "tokenizer": tokenizer_note,
        "check_s": round(time.monotonic() - start - import_s, 1), "routes": checker.routes,
        "requests": requests, "responses": responses, "input_logprob_alignment": alignment,
        "summary": {"requests": len(requests), "responses": len(responses), "unknown_keys": unknown,
                    "request_errors": sum(len(r["errors"]) for r in requests),
                    "response_errors": sum(len(r["errors"]) for r in responses)},
    }
    json.dump(report, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
