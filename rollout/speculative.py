"""Client side of MTP speculative decoding: the engine flags a rollout config asks for, and the
`rollout/spec_accept_len` metric from the engines' responses.

Kept apart from the engine launcher and the rollout manager so both only call one function each.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


def cli_args(num_draft_steps: int) -> list[str]:
    """Server flags for K MTP draft tokens (0: none); the same list is valid for sglang.launch_server."""
    if num_draft_steps <= 0:
        return []
    return ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", str(num_draft_steps),
            "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(num_draft_steps + 1)]


def engine_args(cfg: Any, model_path: str | None = None) -> list[str]:
    """Extra server flags for `cfg.speculative_num_steps` (a RolloutConfig); [] when speculation is off.

    The same flags launch SGLang (`--speculative-algorithm EAGLE --speculative-num-steps K
    --speculative-eagle-topk 1 --speculative-num-draft-tokens K+1`, as the MiMo-V2-Flash README does)
    and the local server. With `model_path` (a local checkpoint directory), a checkpoint without MTP
    layers gets no flags (teachers launched from the same rollout config only score) and K is capped
    at the checkpoint's MTP layer count; both are logged."""
    k = int(getattr(cfg, "speculative_num_steps", 0) or 0)
    if k > 0 and model_path is not None and os.path.isdir(model_path):
        layers = mtp_layer_count(model_path)
        if layers == 0:
            log.info("%s has no MTP layers: served without speculative decoding", model_path)
            return []
        if layers < k:
            log.warning("%s has %d MTP layers: speculative_num_steps %d capped to %d", model_path, layers, k, layers)
            k = layers
    return cli_args(k)


def mtp_layer_count(model_path: str) -> int:
    """MTP blocks in a checkpoint directory, from the safetensors headers (`model.mtp.layers.<k>.*`)."""
    from safetensors import safe_open

    from rollout.mtp import mtp_layer_count as count

    names: list[str] = []
    for file in sorted(glob.glob(os.path.join(glob.escape(model_path), "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            names += list(f.keys())
    return count(names)


def spec_accept_len(responses: Iterable[Any]) -> float | None:
    """Tokens per verify forward over a step's responses (GenerateResponse or raw meta_info dicts):
    sum(completion_tokens) / sum(spec_verify_ct), SGLang's accept length pooled; None without speculation."""
    tokens = verifies = 0
    for r in responses:
        if isinstance(r, dict):
            meta = r.get("meta_info", r)
            ct, n = meta.get("spec_verify_ct"), meta.get("completion_tokens", 0)
        else:
            ct, n = getattr(r, "spec_verify_ct", None), getattr(r, "completion_tokens", 0)
        if ct:
            tokens += int(n)
            verifies += int(ct)
    return tokens / verifies if verifies else None


def record(metadata: dict[str, Any], response: Any) -> None:
    """Add one response's speculative counters to a sample's metadata (several turns add up)."""
    ct = getattr(response, "spec_verify_ct", None)
    if ct:
        metadata["spec_verify_ct"] = metadata.get("spec_verify_ct", 0) + int(ct)
        metadata["spec_completion_tokens"] = (metadata.get("spec_completion_tokens", 0)
                                              + int(getattr(response, "completion_tokens", 0)))


def step_metrics(samples: Iterable[Any]) -> dict[str, float]:
    """`rollout/spec_accept_len` of a step from the samples' metadata (see `record`); {} without speculation."""
    tokens = verifies = 0
    for s in samples:
        meta = getattr(s, "metadata", None) or {}
        verifies += int(meta.get("spec_verify_ct", 0))
        tokens += int(meta.get("spec_completion_tokens", 0))
    return {"rollout/spec_accept_len": tokens / verifies} if verifies else {}
