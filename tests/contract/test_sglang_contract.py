"""Contract suite: what mopd's client really sends, checked against the real `sglang` package.

mopd's own client code (RolloutManager, Trajectory, teacher scoring, EngineClient, trainer.weight_sync)
drives the real local engine server through a recording proxy, in every mode the framework uses. The
recorded bodies (and the server's answers) then go through SGLang's own request classes, validation and
response post-processing in the separate `.venv-sglang` (tests/contract/sglang_check.py). SGLang ignores
unknown top-level keys silently, so only this comparison catches a misspelt or renamed field.

Cost (2-core CI machine): 27-41 s in all: the server start and the recorded requests (~12 s) and one
checker run, most of it SGLang's import (~20 s). ./setup_sglang.sh takes ~8 min and 11 GB from nothing, 0.1 s
when present. Skipped without .venv-sglang, except in CI (env CI set), where that is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from contract_recording import RecordingProxy, require_sglang_venv
from safetensors.torch import load_file
from transformers import AutoConfig

from mopd.core.model_shape import read_model_shape
from mopd.core.types import Sample
from mopd.toy.tokenizer import build_char_tokenizer
from rollout.config import RolloutConfig
from rollout.dispatch import Dispatcher
from rollout.engine_client import EngineClient, EngineError
from rollout.rollout_manager import RolloutManager
from rollout.sglang_api import GenerateRequest, GenerateResponse
from rollout.teacher_scoring import score_samples
from rollout.trajectory import Trajectory
from trainer import weight_sync, weight_sync_nccl
from trainer.config import TrainerConfig

CHECKER = Path(__file__).with_name("sglang_check.py")

# Every mode the framework speaks to an engine in; each must leave at least one recorded body.
MODES = {
    "rollout": {"/generate"}, "sampling": {"/generate"}, "logprob": {"/generate"},
    "routed_experts": {"/generate"}, "teacher_scoring": {"/generate"}, "teacher_scoring_top_k": {"/generate"},
    "session": {"/open_session", "/generate", "/close_session"}, "abort": {"/generate", "/abort_request"},
    "weights_disk": {"/update_weights_from_disk"},
    "weights_tensor": {"/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update"},
    "distributed": {"/init_weights_update_group", "/begin_weight_update", "/update_weights_from_distributed",
                    "/end_weight_update"},
    "state": {"/health", "/model_info"}, "logprob_reference": {"/generate"},
}

# Deliberately wrong bodies: the checker must report each (proves the suite can fail).
NEGATIVES = [
    ("negative:unknown_top_level_key", "/generate",
     {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}, "retrun_logprob": True}, "unknown"),
    ("negative:unknown_sampling_key", "/generate",
     {"input_ids": [1, 2, 3], "sampling_params": {"max_new_token": 1}}, "error"),
    ("negative:logprob_start_len_type", "/generate",
     {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": "five"}, "error"),
    ("negative:unknown_session_key", "/generate",
     {"input_ids": [1], "session_params": {"id": "s", "parent": "x"}}, "unknown"),
    ("negative:weights_not_base64", "/update_weights_from_tensor",
     {"serialized_named_tensors": ["not base64!"], "weight_version": "1"}, "error"),
]


@contextlib.contextmanager
def _without_nccl_rendezvous() -> Iterator[None]:
    """DistributedPusher.__init__ calls SGLang's NCCL rendezvous (GPU only; with the engine answering 400 it would
    wait for ranks that never come); stand in for that one function so the HTTP bodies it sends are the real
    ones. Nothing else of the push is replaced. Works whether or not sglang is installed here."""
    names = ["sglang", "sglang.srt", "sglang.srt.utils"]
    saved = {n: sys.modules.get(n) for n in names}
    real = saved["sglang.srt.utils"]
    if real is None:
        for n in names:
            sys.modules.setdefault(n, types.ModuleType(n))
    module = sys.modules["sglang.srt.utils"]
    original = getattr(module, "init_custom_process_group", None)
    module.init_custom_process_group = lambda **kw: None  # type: ignore[attr-defined]
    hook = threading.excepthook
    threading.excepthook = lambda args: None  # the local server answers 400 to NCCL; the threads' errors are expected
    try:
        yield
    finally:
        threading.excepthook = hook
        if real is not None and original is not None:
            module.init_custom_process_group = original  # type: ignore[attr-defined]
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)


async def _long_generation(client: EngineClient, prompt: list[int], rid: str) -> GenerateResponse:
    request = GenerateRequest(input_ids=prompt, rid=rid, return_logprob=True,
                              sampling_params={"max_new_tokens": 480, "temperature": 1.0, "ignore_eos": True})
    return await client.generate(request)


async def _drive_async(proxy: RecordingProxy, model: Path, notes: dict[str, Any]) -> list[Sample]:
    url = proxy.url
    tok = build_char_tokenizer()
    prompt = tok("what is 2+3?", add_special_tokens=False)["input_ids"]
    shape = read_model_shape(model)
    num_layers, top_k = shape.num_layers, shape.top_k

    proxy.mode = "state"
    async with EngineClient(url, num_layers=num_layers, top_k=top_k) as client:
        assert await client.health()
        await client.model_info()

    proxy.mode = "rollout"  # the production path: RolloutManager's own sampling params, R3 on
    cfg = RolloutConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20)
    manager = RolloutManager([url], cfg, eos_token_id=tok.eos_token_id, tokenizer=tok, model_path=str(model))
    await manager.check_engines()
    samples = [Sample(prompt_index=i, group_index=0, domain="math", prompt_ids=list(prompt)) for i in range(3)]
    await manager.generate(samples)

    async with EngineClient(url, num_layers=num_layers, top_k=top_k) as client:
        proxy.mode = "sampling"
        variants = [{"max_new_tokens": 4, "temperature": 0.0},
                    {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "sampling_seed": 11},
                    {"max_new_tokens": 4, "temperature": 1.0, "stop": ["\n"], "stop_token_ids": [tok.eos_token_id]},
                    {"max_new_tokens": 4, "min_new_tokens": 1, "temperature": 1.0, "ignore_eos": True,
                     "skip_special_tokens": False, "no_stop_trim": True}]
        notes["sampling_refused_by_local_server"] = []
        for sp in variants:
            try:
                await client.generate(GenerateRequest(input_ids=prompt, sampling_params=sp))
            except EngineError as e:  # the body is recorded either way; the local server supports a subset
                notes["sampling_refused_by_local_server"].append({"sampling_params": sp, "error": str(e)[:200]})

        proxy.mode = "logprob"
        for start, k in ((-1, 0), (0, 4), (3, 2), (-1, 3)):
            await client.generate(GenerateRequest(input_ids=prompt, sampling_params={"max_new_tokens": 3},
                                                  return_logprob=True, logprob_start_len=start, top_logprobs_num=k))

        proxy.mode = "routed_experts"
        for start in (0, 5):
            await client.generate(GenerateRequest(input_ids=prompt, sampling_params={"max_new_tokens": 3},
                                                  return_logprob=True, return_routed_experts=True,
                                                  routed_experts_start_len=start))

    proxy.mode = "teacher_scoring"
    await score_samples([url], samples, top_k=0)
    proxy.mode = "teacher_scoring_top_k"
    await score_samples([url], samples, top_k=4)
    proxy.mode = "logprob_reference"  # every position's logprobs of the scored ids: what SGLang's scheduler gets
    async with EngineClient(url) as client:
        for s in samples:
            await client.generate(GenerateRequest(
                input_ids=s.prompt_ids + s.response_ids, sampling_params={"max_new_tokens": 0, "temperature": 1.0},
                return_logprob=True, logprob_start_len=0, top_logprobs_num=4))

    proxy.mode = "session"  # multi-turn agent trajectory with the request-level prefix cache
    dispatcher = Dispatcher([url], num_layers=num_layers, top_k=top_k)
    sample = Sample(prompt_index=9, group_index=0, domain="agent", prompt_ids=list(prompt))
    traj = Trajectory(dispatcher, sample, manager.sampling_params(), prefix_cache=True, routing_replay=True)
    try:
        await traj.generate()
        traj.append_observation(tok("<tool>ok</tool>", add_special_tokens=False)["input_ids"])
        await traj.generate()
        traj.append_observation(tok("again", add_special_tokens=False)["input_ids"])
        await traj.generate()
        traj.to_sample()
    finally:
        await traj.close()
        await dispatcher.close()

    async with EngineClient(url, num_layers=num_layers, top_k=top_k) as client:
        proxy.mode = "abort"

        async def aborted(cancel: Any) -> str:
            """A long generation cut by `cancel(rid)`; tried again, sooner, if it finished before the abort came."""
            finish = ""
            for delay in (0.3, 0.1, 0.02):
                rid = uuid.uuid4().hex
                task = asyncio.create_task(_long_generation(client, prompt, rid))
                await asyncio.sleep(delay)
                await cancel(rid)
                finish = (await task).finish_reason
                if finish == "abort":
                    break
            return finish

        notes["abort_by_rid_finish"] = await aborted(client.abort)
        # the step boundary of partial rollout: {"abort_all": true}
        notes["abort_all_finish"] = await aborted(lambda rid: client.abort())
    return samples


def _drive_weights(proxy: RecordingProxy, model: Path, tmp: Path) -> None:
    """The trainer's weight pushes (plain urllib, blocking): disk, tensor (several buckets), NCCL bodies."""
    named = load_file(str(model / "model.safetensors"))
    cfg = TrainerConfig(weight_sync="disk", weight_sync_dir=str(tmp / "weights"), weight_sync_timeout_s=60,
                        weight_sync_format="safetensors")
    proxy.mode = "weights_disk"
    weight_sync.push_disk(named, [proxy.url], 1, cfg, str(model))
    proxy.mode = "weights_tensor"
    assert weight_sync.push_tensor(named, [proxy.url], 2, cfg, bucket_bytes=64 * 1024) > 1

    proxy.mode = "distributed"
    small = dict(list(named.items())[:3])
    with _without_nccl_rendezvous():
        try:
            weight_sync_nccl.DistributedPusher([proxy.url], cfg)
        except (RuntimeError, OSError):
            pass
        pusher = object.__new__(weight_sync_nccl.DistributedPusher)  # __init__'s group is GPU-only; push() posts first
        pusher.urls, pusher.cfg, pusher.group = [proxy.url], cfg, None
        with contextlib.suppress(AssertionError, RuntimeError):  # stops at tensor.cuda(), after the POSTs
            pusher.push(small, 3)


@pytest.fixture(scope="module")
def recorded(proxy: RecordingProxy, moe_model: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[RecordingProxy, dict[str, Any]]:
    notes: dict[str, Any] = {}
    asyncio.run(_drive_async(proxy, moe_model, notes))
    _drive_weights(proxy, moe_model, tmp_path_factory.mktemp("contract_weights"))
    return proxy, notes


@pytest.fixture(scope="module")
def report(recorded: tuple[RecordingProxy, dict[str, Any]], moe_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = require_sglang_venv()
    proxy, notes = recorded
    config = AutoConfig.from_pretrained(str(moe_model))
    num_layers, top_k = int(config.num_hidden_layers), int(config.num_experts_per_tok)
    requests = [{"id": i, "mode": r.mode, "method": r.method, "path": r.path, "body": r.body}
                for i, r in enumerate(proxy.records)]
    requests += [{"id": f"neg{i}", "mode": mode, "method": "POST", "path": path, "body": body}
                 for i, (mode, path, body, _) in enumerate(NEGATIVES)]
    responses = [{"id": i, "mode": r.mode, "request": r.body, "response": r.response, "num_layers": num_layers,
                  "top_k": top_k} for i, r in enumerate(proxy.records)
                 if r.path == "/generate" and r.status == 200 and isinstance(r.response, dict)]
    path = tmp_path_factory.mktemp("contract_records") / "records.json"
    path.write_text(json.dumps({"vocab_size": int(config.vocab_size), "tokenizer_path": str(moe_model),
                                "requests": requests,
                                "responses": responses}))
    proc = subprocess.run([str(python), str(CHECKER), str(path)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    if os.environ.get("MOPD_CONTRACT_REPORT"):  # keep the records and the full report (e.g. as a CI artifact)
        Path(os.environ["MOPD_CONTRACT_REPORT"]).write_text(json.dumps({"records": json.loads(path.read_text()),
                                                                        "report": result}, indent=1))
    result["notes"], result["records_file"] = notes, str(path)
    result["raw_responses"] = {r["id"]: r for r in responses}
    print(json.dumps({"summary": result["summary"], "import_s": result["import_s"], "check_s": result["check_s"],
                      "tokenizer": result["tokenizer"], "notes": notes}, indent=1))
    return result


def test_every_mode_recorded(recorded: tuple[RecordingProxy, dict[str, Any]]) -> None:
    proxy, notes = recorded
    seen: dict[str, set[str]] = {}
    for r in proxy.records:
        seen.setdefault(r.mode, set()).add(r.path)
    for mode, paths in MODES.items():
        assert paths <= seen.get(mode, set()), f"mode {mode}: expected {sorted(paths)}, recorded {seen.get(mode)}"
    bodies = [r.body for r in proxy.records if r.path == "/generate"]
    assert any(b.get("session_params", {}).get("rid") for b in bodies), "no session continuation (rid) recorded"
    assert any(b.get("top_logprobs_num") for b in bodies), "no top-k teacher scoring recorded"
    assert notes["abort_by_rid_finish"] == "abort" and notes["abort_all_finish"] == "abort"


def test_bodies_match_sglang(report: dict[str, Any]) -> None:
    real = [r for r in report["requests"] if not str(r["mode"]).startswith("negative:")]
    unknown = sorted({f"{r['mode']} {r['path']}: {k}" for r in real for k in r["unknown_keys"]})
    errors = [f"{r['mode']} {r['path']}: {e}" for r in real for e in r["errors"]]
    assert not unknown, f"keys mopd sends that SGLang {report['sglang_version']} does not know: {unknown}"
    assert not errors, "bodies SGLang rejects:\n" + "\n".join(errors)
    assert {r["mode"] for r in real} >= set(MODES)


def test_checker_catches_wrong_bodies(report: dict[str, Any]) -> None:
    by_mode = {r["mode"]: r for r in report["requests"]}
    for mode, _, _, kind in NEGATIVES:
        r = by_mode[mode]
        caught = r["unknown_keys"] if kind == "unknown" else r["errors"]
        assert caught, f"{mode}: the checker did not report this wrong body: {r}"


def test_responses_through_sglang_post_processing(report: dict[str, Any]) -> None:
    """SGLang's response schema and post-processing accept the local server's answers, and mopd's parser reads
    the same numbers SGLang's code rebuilds (logprobs and routed-experts rows)."""
    assert report["responses"], "no /generate answers were checked"
    errors = [f"{r['mode']}: {e}" for r in report["responses"] for e in r["errors"]]
    assert not errors, "\n".join(errors)
    checked = {c.split("(")[0] for r in report["responses"] for c in r["checked"]}
    assert {"api_types.GenerateResponse", "TokenizerManager.detokenize_logprob_tokens",
            "TokenizerManager.detokenize_top_logprobs_tokens",
            "DetokenizerManager._b64_encode_per_request"} <= checked, checked
    for r in report["responses"]:
        view = r.get("sglang_values") or {}
        raw = report["raw_responses"][r["id"]]
        mopd = GenerateResponse.from_json(raw["response"], num_layers=raw["num_layers"], top_k=raw["top_k"])
        if "output_token_logprobs" in view:
            assert mopd.output_logprobs == view["output_token_logprobs"]
        if "input_token_logprobs" in view:
            assert mopd.input_logprobs == view["input_token_logprobs"]
        for key, parsed in (("input_top_logprobs", mopd.input_top_logprobs),
                            ("output_top_logprobs", mopd.output_top_logprobs)):
            if key in view:
                assert parsed == [None if row is None else [(lp, tid) for lp, tid in row] for row in view[key]], key
        if "routed_experts" in view:
            assert mopd.routed_experts is not None
            assert np.array_equal(mopd.routed_experts, np.asarray(view["routed_experts"], dtype=np.int32))


def test_sglang_input_logprob_view_built(report: dict[str, Any]) -> None:
    """SGLang's scheduler code ran on the local server's numbers for every teacher-scoring request."""
    rows = report["input_logprob_alignment"]
    assert all("error" not in r for r in rows), rows
    assert {r["mode"] for r in rows} >= {"teacher_scoring", "teacher_scoring_top_k"}, rows
    for r in rows:  # SGLang has no logprob for the token at logprob_start_len (see sglang_check.py)
        assert r["sglang"][0] is None and len(r["sglang"]) == r["input_len"] - r["logprob_start_len"]


def test_local_server_input_logprobs_match_sglang(report: dict[str, Any]) -> None:
    rows = report["input_logprob_alignment"]
    bad = [{k: r[k] for k in ("mode", "logprob_start_len", "sglang", "server")} for r in rows
           if not r["equal"] or r.get("top_equal") is False]
    assert rows and not bad, json.dumps(bad[:2])


def test_routed_experts_rows_follow_sglang(recorded: tuple[RecordingProxy, dict[str, Any]]) -> None:
    """Rows per answer as SGLang 0.5.23 counts them (BatchResultProcessor._maybe_collect_routed_experts:
    seqlen - 1 - routed_experts_start_len, seqlen = the request's whole sequence, a session's earlier context
    included (SessionController concatenates it into origin_input_ids) plus the output)."""
    proxy, _ = recorded
    config = AutoConfig.from_pretrained(str(proxy.model_path))
    context: dict[str, int] = {}
    checked = 0
    for r in proxy.records:
        if r.path != "/generate" or r.status != 200 or not isinstance(r.response, dict):
            continue
        body, meta = r.body, r.response["meta_info"]
        sid = (body.get("session_params") or {}).get("id")
        seqlen = context.get(sid, 0) + len(body["input_ids"]) + len(r.response["output_ids"])
        if sid:
            context[sid] = seqlen
        if not body.get("return_routed_experts"):
            continue
        rows = len(base64.b64decode(meta["routed_experts"])) // 4 // (
            config.num_hidden_layers * config.num_experts_per_tok)
        expected = max(0, seqlen - 1 - body.get("routed_experts_start_len", 0))
        assert rows == expected, f"{r.mode}: {rows} rows, SGLang sends {expected} for {body!r:.300}"
        checked += 1
    assert checked >= 5
