"""The checkpoint of a sequence scheduler's state: JSON values and numpy arrays, no pickle, round-tripped exactly."""

import json

import numpy as np
import pytest

from mopd.checkpoint import SCHEDULER_ARRAYS, SCHEDULER_FILE, read_scheduler_state, write_scheduler_state
from mopd.core.types import Sample
from mopd.sequences import staleness


def test_scheduler_state_round_trips_with_its_arrays(tmp_path):
    routing = np.arange(24, dtype=np.int32).reshape(4, 3, 2)
    state = {"version": 1, "queued": [{"prompt_index": 3, "samples": [
        {"response_ids": [5, 6], "rollout_logprobs": [-0.125, -2.5e-9], "weight_versions": [2, 3],
         "routed_experts": routing}, {"response_ids": [], "routed_experts": None}]}],
        "counts": {"filtered_groups": np.int64(2)}, "empty": np.zeros((0, 2, 2), dtype=np.int32)}
    write_scheduler_state(tmp_path, state)
    back = read_scheduler_state(tmp_path)
    sample = back["queued"][0]["samples"][0]
    assert np.array_equal(sample["routed_experts"], routing) and sample["routed_experts"].dtype == np.int32
    assert sample["rollout_logprobs"] == [-0.125, -2.5e-9] and sample["weight_versions"] == [2, 3]
    assert back["queued"][0]["samples"][1] == {"response_ids": [], "routed_experts": None}
    assert back["counts"] == {"filtered_groups": 2} and back["empty"].shape == (0, 2, 2)
    assert "routed_experts" in (tmp_path / SCHEDULER_FILE).read_text()  # JSON, arrays by reference
    json.loads((tmp_path / SCHEDULER_FILE).read_text())
    with np.load(tmp_path / SCHEDULER_ARRAYS, allow_pickle=False) as npz:
        assert len(npz.files) == 2


def test_a_step_directory_without_scheduler_state_reads_none(tmp_path):
    assert read_scheduler_state(tmp_path) is None


def test_the_reserved_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved key"):
        write_scheduler_state(tmp_path, {"x": {"__ndarray__": "a0"}})


def test_staleness_counts_loss_tokens_of_mixed_versions():
    a = Sample(0, 0, "arith", [1], response_ids=[1, 2, 3], loss_mask=[1, 0, 1], weight_versions=[3, 4, 5])
    b = Sample(1, 1, "arith", [1], response_ids=[1, 2], loss_mask=[1, 1], weight_versions=[5, 5])
    # policy 5: ages 2, (masked), 0, 0, 0
    assert staleness([a, b], policy_version=5) == {"rollout/staleness_mean": 0.5, "rollout/staleness_max": 2.0}
    assert staleness([], policy_version=5) == {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0}
