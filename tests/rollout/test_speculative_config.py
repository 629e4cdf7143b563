"""Speculative decoding on the client side: the config field, the engine flags, the response fields, the metric."""

from __future__ import annotations

import pytest

from mopd.core.errors import ConfigError
from rollout.config import RolloutConfig
from rollout.sglang_api import GenerateResponse
from rollout.speculative import engine_args, spec_accept_len


def test_config_field_and_engine_flags():
    assert RolloutConfig().speculative_num_steps == 0 and engine_args(RolloutConfig()) == []
    cfg = RolloutConfig(speculative_num_steps=3)
    cfg.validate()
    assert engine_args(cfg) == ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3",
                                "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]
    for bad in (-1, 9, 1.5):
        with pytest.raises(ConfigError, match="speculative_num_steps"):
            RolloutConfig(speculative_num_steps=bad).validate()


def test_response_fields_and_metric():
    body = {"text": "", "output_ids": [1, 2, 3, 4, 5, 6],
            "meta_info": {"finish_reason": {"type": "length"}, "completion_tokens": 6, "spec_verify_ct": 2,
                          "spec_accept_length": 3.0, "spec_accept_rate": 0.5, "spec_num_correct_drafts": 3,
                          "spec_num_proposed_drafts": 6}}
    r = GenerateResponse.from_json(body)
    assert r.spec_verify_ct == 2 and r.spec_accept_length == 3.0
    plain = GenerateResponse.from_json({"output_ids": [1], "meta_info": {"completion_tokens": 1}})
    assert plain.spec_verify_ct is None and plain.spec_accept_length is None
    assert spec_accept_len([r, plain, body]) == pytest.approx(12 / 4)
    assert spec_accept_len([plain]) is None


def test_sample_metadata_and_step_metric():
    from rollout.speculative import record, step_metrics

    class S:
        def __init__(self):
            self.metadata = {}

    a, b, c = S(), S(), S()
    spec = GenerateResponse.from_json({"output_ids": [1] * 6, "meta_info": {"completion_tokens": 6,
                                                                            "spec_verify_ct": 2}})
    plain = GenerateResponse.from_json({"output_ids": [1], "meta_info": {"completion_tokens": 1}})
    record(a.metadata, spec)
    record(a.metadata, spec)  # a second turn of the same trajectory
    record(b.metadata, GenerateResponse.from_json({"output_ids": [1] * 3, "meta_info": {"completion_tokens": 3,
                                                                                        "spec_verify_ct": 3}}))
    record(c.metadata, plain)
    assert c.metadata == {} and a.metadata == {"spec_verify_ct": 4, "spec_completion_tokens": 12}
    assert step_metrics([a, b, c]) == {"rollout/spec_accept_len": 15 / 7}
    assert step_metrics([c]) == {}


def test_engine_args_follow_the_checkpoint(tmp_path):
    """Teachers launched from the same rollout config have no MTP layers: no flags; K capped at the layers."""
    from mopd.toy.models import create_tiny_model, create_toy_mimo
    from mopd.toy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    mimo = create_toy_mimo(tmp_path / "mimo", tok, mtp_layers=2, num_layers=2)
    qwen = create_tiny_model(tmp_path / "qwen", tok, arch="qwen3")
    cfg = RolloutConfig(speculative_num_steps=3)
    assert engine_args(cfg, str(qwen)) == []
    assert engine_args(cfg, str(mimo))[:4] == ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2"]
    assert engine_args(cfg, "some/hub-name") == engine_args(cfg)
