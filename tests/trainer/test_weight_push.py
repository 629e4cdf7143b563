"""Weight push: wire format on a recording HTTP server, and end to end against the local engine."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load

from mopd.core.algo import AdvantageConfig
from tests.trainer.conftest import make_samples
from trainer import weight_sync
from trainer.config import TrainerConfig
from trainer.dist import free_port
from trainer.hf_io import load_hf_state
from trainer.hf_shards import CheckpointBuckets
from trainer.rank import TrainerRank


class _Recorder(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, dict]]] = []
    fail = False
    fail_at: int | None = None  # the index of the one POST that fails

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        failed = cls.fail or cls.fail_at == len(cls.calls)
        cls.calls.append((self.path, body))
        self._reply(400 if failed else 200, {"success": not failed, "message": "boom" if failed else "ok"})

    def do_GET(self):  # /model_info: an engine that came back from a restart with the weights of version 0
        self._reply(200, {"weight_version": "0"})

    def _reply(self, code: int, reply: dict) -> None:
        data = json.dumps(reply).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def recorder():
    _Recorder.calls, _Recorder.fail, _Recorder.fail_at = [], False, None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_buckets_respect_size():
    named = {f"t{i}": torch.zeros(256) for i in range(10)}  # 1 KiB each
    groups = list(weight_sync.buckets(named, 3 * 1024))
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert [len(g) for g in weight_sync.buckets({"big": torch.zeros(4096), "s": torch.zeros(1)}, 1024)] == [1, 1]


def test_tensor_push_wire_format(recorder, moe_path, dist_env):
    cfg = TrainerConfig(weight_sync="tensor", weight_sync_bucket_mb=1, weight_sync_format="safetensors")
    engine = TrainerRank(moe_path, cfg, AdvantageConfig(), num_steps=1)
    named = engine.hf_state()
    sent = weight_sync.push_tensor(named, [recorder, recorder], 7, cfg, bucket_bytes=40_000)
    assert sent > 3
    calls = _Recorder.calls
    # each engine: /begin_weight_update, the buckets, /end_weight_update (SGLang refuses tensors outside a session)
    paths = [path for path, _ in calls]
    assert paths[:2] == ["/begin_weight_update"] * 2 and paths[-2:] == ["/end_weight_update"] * 2
    assert [body for path, body in calls if path == "/begin_weight_update"] == [{"selector": "all"}] * 2
    calls = calls[2:-2]
    assert len(calls) == 2 * sent and all(path == "/update_weights_from_tensor" for path, _ in calls)
    received: dict[str, torch.Tensor] = {}
    flushes = []
    for _, body in calls[::2]:
        assert body["load_format"] == "safetensors" and body["weight_version"] == "7"
        assert len(body["serialized_named_tensors"]) == max(cfg.weight_sync_engine_tp, 1)  # 0: engines of TP 1
        received.update(safetensors_load(base64.b64decode(body["serialized_named_tensors"][0])))
        flushes.append(body["flush_cache"])
    assert flushes[-1] is True and not any(flushes[:-1])
    assert set(received) == set(named)
    assert all(torch.equal(received[k], named[k]) for k in named)


def test_disk_push_and_errors(recorder, moe_path, dist_env, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = TrainerConfig(weight_sync="disk", weight_sync_dir=str(tmp_path))
    engine = TrainerRank(moe_path, cfg, AdvantageConfig(), num_steps=1)
    target = weight_sync.push_disk(engine.hf_state(), [recorder], 3, cfg, moe_path)
    (path, body), = _Recorder.calls
    assert path == "/update_weights_from_disk" and body == {"model_path": str(target), "weight_version": "3"}
    AutoModelForCausalLM.from_pretrained(body["model_path"])  # engines load it with the HF loader
    _Recorder.fail_at = len(_Recorder.calls) + 1  # the first bucket, after /begin_weight_update
    with pytest.raises(RuntimeError, match="update_weights_from_tensor -> HTTP 400.*boom"):
        weight_sync.push_tensor(engine.hf_state(), [recorder], 4, TrainerConfig(weight_sync_format="safetensors"))
    assert _Recorder.calls[-1][0] == "/end_weight_update"  # the session is closed even though the push failed
    _Recorder.fail = True
    with pytest.raises(RuntimeError, match="begin_weight_update -> HTTP 400.*boom"):
        weight_sync.push_tensor(engine.hf_state(), [recorder], 5, TrainerConfig(weight_sync_format="safetensors"))


def test_an_engine_that_fails_mid_push_gets_the_snapshot_afterwards(recorder, moe_path, dist_env, tmp_path):
    """Tensor mode, one engine fails the second bucket: it gets no further bucket, the stream still
    completes the snapshot, and once the engine answers (reporting older weights) the snapshot is sent to
    it from disk, bucket by bucket, flushing on the last."""
    cfg = TrainerConfig(weight_sync="tensor", weight_sync_format="safetensors", weight_sync_dir=str(tmp_path))
    engine = TrainerRank(moe_path, cfg, AdvantageConfig(), num_steps=1)
    named = {k: v.clone() for k, v in engine.hf_state().items()}
    stream = engine.hf_buckets(40_000, keep=True)
    _Recorder.fail_at = 2  # after /begin_weight_update and the first bucket
    snapshots = weight_sync.WeightSnapshots(cfg)
    weight_sync.push_recoverable_buckets(stream, [recorder], 5, cfg, moe_path, snapshots)
    paths = [path for path, _ in _Recorder.calls]
    # the failed push's session is closed too (an engine with a session left open refuses the next one)
    assert paths[:4] == ["/begin_weight_update", "/update_weights_from_tensor", "/update_weights_from_tensor",
                         "/end_weight_update"]
    assert paths[4] == "/begin_weight_update" and paths[-1] == "/end_weight_update"
    first, resent = _Recorder.calls[1:3], _Recorder.calls[5:-1]
    assert len(stream) > 3 and len(resent) == len(CheckpointBuckets(snapshots.kept[-1], 64 * 2**20))
    received: dict[str, torch.Tensor] = {}
    for _, body in resent:
        received.update(safetensors_load(base64.b64decode(body["serialized_named_tensors"][0])))
    assert [b["flush_cache"] for _, b in resent][-1] is True and all(b["weight_version"] == "5" for _, b in first + resent)
    assert set(received) == set(named) and all(torch.equal(received[k], named[k]) for k in named)
    on_disk = load_hf_state(snapshots.kept[-1])  # what a restarted engine loads
    assert set(on_disk) == set(named) and all(torch.equal(on_disk[k], named[k]) for k in named)
    snapshots.close()


# ------------------------------------------------------------------ end to end with rollout's local server
def _server_module() -> str:
    """The local engine that rollout launches for backend=local."""
    return "rollout.hf_server"


SERVER_MODULE = _server_module()


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _engine_logprobs(url: str, sample) -> np.ndarray:
    reply = _post(url, "/generate", {"input_ids": sample.tokens, "return_logprob": True, "logprob_start_len": 0,
                                     "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}})
    entries = reply["meta_info"]["input_token_logprobs"]
    tail = entries[len(entries) - len(sample.response_ids):]
    assert [e[1] for e in tail] == sample.response_ids
    return np.array([e[0] for e in tail], dtype=np.float64)


@contextlib.contextmanager
def local_engine(model_path: str) -> Iterator[str]:
    """rollout's local engine serving `model_path`, as a subprocess; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, "--model-path", model_path,
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/model_info", timeout=2)
                break
            except OSError:  # URLError and connection refused are OSErrors
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    raise RuntimeError(f"local server did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local_server(moe_path):
    with local_engine(moe_path) as url:
        yield url


@pytest.mark.slow
def test_push_then_engine_logprobs_match_trainer(local_server, moe_path, tmp_path):
    import ray

    from trainer.group import TrainerGroup

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    group = TrainerGroup(moe_path, TrainerConfig(dp_size=1, lr=2e-2, weight_sync="tensor",
                                                 weight_sync_format="safetensors", weight_sync_bucket_mb=1),
                         AdvantageConfig(alpha=1.0), num_steps=2)
    try:
        samples = make_samples(3, seed=31)
        for _ in range(2):
            group.train_step(samples)
        trained = group.compute_logprobs(samples)
        stale = [_engine_logprobs(local_server, s) for s in samples]
        assert max(np.abs(a - b).max() for a, b in zip(stale, trained)) > 1e-3, "training did not move the policy"
        group.push_weights([local_server], version=1)
        fresh = [_engine_logprobs(local_server, s) for s in samples]
        gap = max(np.abs(a - b).max() for a, b in zip(fresh, trained))
        print(f"after tensor push: max |engine - trainer logprob| = {gap:.3e}")
        assert gap < 1e-4
    finally:
        group.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_disk_push_then_engine_logprobs_match_trainer(local_server, moe_path, dist_env, tmp_path):
    cfg = TrainerConfig(lr=3e-2, weight_sync="disk", weight_sync_dir=str(tmp_path))
    engine = TrainerRank(moe_path, cfg, AdvantageConfig(alpha=1.0), num_steps=3)
    samples = make_samples(3, seed=32)
    for _ in range(3):
        engine.train_step(samples, len(samples))
    trained = engine.compute_logprobs(samples)
    weight_sync.push_disk(engine.hf_state(), [local_server], 2, cfg, moe_path)
    fresh = [_engine_logprobs(local_server, s) for s in samples]
    gap = max(np.abs(a - b).max() for a, b in zip(fresh, trained))
    print(f"after disk push: max |engine - trainer logprob| = {gap:.3e}")
    assert gap < 1e-4
