"""The trainer's placement on a real multi-node Ray cluster (ray.cluster_utils.Cluster: one raylet per
"node", each with a few CPUs): every Megatron TP group on one node, the ranks of a node consecutive, and a
TP group that fits no node refused quickly with an error that names trainer.tp_size and the resources."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from megatron.core.parallel_state import RankGenerator
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table

from mopd.core.algo import AdvantageConfig
from mopd.core.errors import ConfigError
from tests.trainer.conftest import make_samples
from trainer.config import TrainerConfig
from trainer.dist import RANK_ORDER
from trainer.placement import place_trainer, rank_bundles, resolve_device


def _tp_groups(tp: int, dp: int, pp: int, ep: int = 1) -> list[list[int]]:
    """Megatron's own TP groups (dense and expert layers) for this layout, in the order trainer/dist.py uses."""
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=RANK_ORDER).get_ranks("tp")
    expert = RankGenerator(tp=tp, ep=ep, dp=dp // ep, pp=pp, cp=1, order=RANK_ORDER).get_ranks("tp")
    return dense + expert


@pytest.mark.parametrize("tp,dp,pp,ep", [(2, 2, 1, 1), (2, 2, 2, 2), (4, 1, 2, 1), (1, 4, 1, 2)])
def test_rank_layout_packs_megatron_tp_groups(tp, dp, pp, ep):
    """Each of Megatron's TP groups is one placement group, and the ranks of one node are consecutive,
    whatever order Ray put the groups on the nodes in."""
    groups = dp * pp
    nodes = [f"node{(g * 7 + 3) % 3}" for g in range(groups)]  # groups scattered over 3 nodes, out of order
    layout = rank_bundles(nodes, tp)
    assert len(layout) == tp * dp * pp and len(set(layout)) == len(layout)
    for ranks in _tp_groups(tp, dp, pp, ep):
        assert len({layout[r][0] for r in ranks}) == 1, ranks  # one placement group = one node
        assert sorted(layout[r][1] for r in ranks) == list(range(tp))
    rank_nodes = [nodes[g] for g, _ in layout]
    assert rank_nodes == sorted(rank_nodes)  # a node's ranks are one run


def test_rank_layout_keeps_creation_order_on_one_node():
    assert rank_bundles(["b", "a", "b", "a"], 2) == [(1, 0), (1, 1), (3, 0), (3, 1), (0, 0), (0, 1), (2, 0), (2, 1)]
    assert rank_bundles(["x"], 3) == [(0, 0), (0, 1), (0, 2)]


@ray.remote(num_cpus=0)
class _Where:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _cluster(cpus_per_node: int, nodes: int = 2) -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def _cfg(**kw) -> TrainerConfig:
    base = {"device": "cpu", "cpus_per_rank": 1, "max_tokens_per_microbatch": 48}
    base.update(kw)
    return TrainerConfig(**base)


def _all_released(cpus: float) -> None:
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == cpus
    assert all(t["state"] == "REMOVED" for t in placement_group_table().values())


def test_tp_group_larger_than_any_node_fails_fast(dense_path):
    """TP=2 on nodes of 1 CPU: no node can hold a TP group; the job stops within the timeout, naming
    trainer.tp_size and what was asked vs what the nodes have, before any rank starts."""
    from trainer.group import TrainerGroup

    cluster = _cluster(cpus_per_node=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"`trainer.tp_size`.*one TP group \(2 rank\(s\), trainer.cpus_per_rank=1\) "
                                              r"asks for \{CPU: 2\} on ONE node; nodes \(total\):.*\{CPU: 1\}"):
            TrainerGroup(dense_path, _cfg(tp_size=2), AdvantageConfig(), num_steps=1, placement_timeout_s=3)
        assert time.monotonic() - t0 < 20
        _all_released(2)
        with pytest.raises(ConfigError, match=r"`trainer.device`: expected a node with what one rank asks for, \{CPU: 1, GPU: 1\}"):
            place_trainer(_cfg(device="cuda"), use_gpu=True, timeout_s=1)  # no node has a GPU
        _all_released(2)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def two_nodes():
    """Two nodes of 2 CPUs (and a head with none, so nothing lands on it)."""
    cluster = _cluster(cpus_per_node=2)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_tp2_dp2_on_two_nodes_each_tp_group_on_one_node(two_nodes):
    """Actors scheduled with the placement's options run where it says; each TP group shares a node."""
    placement = place_trainer(_cfg(dp_size=2, tp_size=2), use_gpu=False, timeout_s=60)
    try:
        probes = [_Where.options(**placement.actor_options(r)).remote() for r in range(4)]
        where = ray.get([p.node.remote() for p in probes])
    finally:
        placement.remove()
    assert where == placement.nodes
    for ranks in _tp_groups(2, 2, 1):
        assert len({where[r] for r in ranks}) == 1, (ranks, where)
    assert where[0] != where[2]  # two nodes of 2 CPUs: one TP group each
    _all_released(4)


def test_busy_nodes_time_out_with_the_resources(two_nodes):
    """Nodes large enough but held by someone else (here a 2-CPU reservation): a clear error, nothing kept."""
    held = placement_group([{"CPU": 2}])
    assert held.wait(30)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"trainer.dp_size/tp_size/pp_size.*1 of 2 TP groups not placed after "
                                          r"2 s.*\{CPU: 2\} on ONE node.*free in the cluster now: \{CPU: 0\}"):
        place_trainer(_cfg(dp_size=2, tp_size=2), use_gpu=False, timeout_s=2)
    assert time.monotonic() - t0 < 15
    ray.util.remove_placement_group(held)
    _all_released(4)


@pytest.mark.slow
def test_trainer_group_tp2_dp2_across_nodes(two_nodes, dense_path, dist_env):
    """The real TrainerGroup on two nodes: Megatron's TP groups (ranks sharing a dp_rank) are the co-located
    pairs, logprobs equal one rank's, and shutdown gives every CPU back."""
    from trainer.group import TrainerGroup
    from trainer.rank import TrainerRank

    adv = AdvantageConfig(alpha=0.5)
    batch = make_samples(5, seed=51)
    group = TrainerGroup(dense_path, _cfg(dp_size=2, tp_size=2), adv, num_steps=2, placement_timeout_s=60)
    try:
        nodes, dp_ranks = list(group.placement.nodes), list(group.dp_ranks)
        lps = group.compute_logprobs(batch)
    finally:
        group.shutdown()
    assert dp_ranks == [0, 0, 1, 1]
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]
    single = TrainerRank(dense_path, _cfg(), adv, num_steps=2)
    for a, b in zip(single.compute_logprobs(batch), lps):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    _all_released(4)


def test_device_auto_follows_the_clusters_gpus_and_the_timeout_is_validated():
    assert resolve_device({"CPU": 64.0}) == "cpu"
    assert resolve_device({"CPU": 64.0, "GPU": 16.0}) == "cuda"
    with pytest.raises(ConfigError, match="trainer.placement_timeout_s"):
        _cfg(placement_timeout_s=0).validate()


def test_engines_the_cluster_cannot_hold_fail_within_startup_timeout(two_nodes, dense_path):
    """Rollout engines asking for GPUs on a CPU-only cluster: an error after rollout.startup_timeout_s that
    says what was asked and what the cluster has, instead of waiting forever; nothing stays reserved."""
    from rollout.config import RolloutConfig
    from rollout.engines import launch_engines

    cfg = RolloutConfig(num_engines=2, gpus_per_engine=1, cpus_per_engine=1, startup_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"student engines: 2 x \{GPU: 1, CPU: 1\}.*not placed within 2s.*"
                                           r"the cluster has \{'CPU': 4.0\}"):
        launch_engines(str(dense_path), cfg, name="student")
    assert time.monotonic() - t0 < 15
    _all_released(4)
