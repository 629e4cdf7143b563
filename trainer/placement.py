"""Where the trainer's ranks run: Ray placement groups laid out for TP x PP x DP.

Megatron's rank order (trainer/dist.py: RANK_ORDER, TP fastest) makes each tensor-parallel group a run of
`tp_size` consecutive global ranks, and TP is the chattiest collective (every layer, forward and backward),
so its ranks must share a node (NVLink, not the network). Each TP group gets its own STRICT_PACK placement
group: Ray then guarantees the co-location, where one PACK group over all ranks only tries to and would
need a check after the fact (and a retry when it split a TP group). The groups are then ordered by the
node Ray put them on, so that the ranks of one node are consecutive (data- and pipeline-parallel
neighbours share a node whenever the node holds several TP groups).

A TP group that fits no node would leave its placement group pending forever: `place_trainer` waits at
most `timeout_s` and then names `trainer.tp_size`, what one TP group asks for and what the nodes have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mopd.core.errors import ConfigError
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # a KubeRay cluster may still be pulling images or scaling up when the trainer starts


def resolve_device(cluster_resources: dict[str, float]) -> str:
    """trainer.device=auto: cuda when the Ray cluster has GPUs. The driver's own torch.cuda says nothing
    about the workers' nodes (a KubeRay head runs without a GPU)."""
    return "cuda" if cluster_resources.get("GPU", 0) > 0 else "cpu"


def rank_bundles(group_nodes: Sequence[Any], tp_size: int) -> list[tuple[int, int]]:
    """Global rank -> (TP placement group, bundle): TP group k of the result (ranks k*tp .. k*tp+tp-1, one
    Megatron TP group) is one placement group, the groups sorted by their node (`group_nodes[g]`, any
    sortable key) so that ranks on one node are consecutive; ties keep the groups' creation order."""
    order = sorted(range(len(group_nodes)), key=lambda g: (group_nodes[g], g))
    return [(g, b) for g in order for b in range(tp_size)]


def tp_group_bundles(cfg: TrainerConfig, use_gpu: bool) -> list[dict[str, float]]:
    """One bundle per rank of a TP group: its CPUs, plus one GPU on GPU."""
    bundle = {"CPU": float(cfg.cpus_per_rank)}
    if use_gpu:
        bundle["GPU"] = 1.0
    return [dict(bundle) for _ in range(cfg.tp_size)]


@dataclass
class TrainerPlacement:
    """The trainer's placement groups (one per TP group) and which bundle each global rank runs in."""

    groups: list[PlacementGroup]
    ranks: list[tuple[int, int]]  # global rank -> (index into groups, bundle index)
    nodes: list[str]  # global rank -> Ray node id
    use_gpu: bool
    cpus_per_rank: float

    def actor_options(self, rank: int) -> dict[str, Any]:
        """`.options(...)` for the actor of global rank `rank`: its bundle's resources, in its bundle."""
        g, b = self.ranks[rank]
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_rank,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.groups[g], placement_group_bundle_index=b),
        }
        if self.use_gpu:
            options["num_gpus"] = 1
        return options

    def remove(self) -> None:
        """Give the reserved CPUs/GPUs back (idempotent; actors still in a group are killed by Ray)."""
        _remove_all(self.groups)
        self.groups = []


def place_trainer(cfg: TrainerConfig, *, use_gpu: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> TrainerPlacement:
    """Reserve one STRICT_PACK placement group per TP group (dp_size * pp_size of them) and lay the global
    ranks out on them. If they are not all placed within `timeout_s` seconds: a ConfigError naming the field
    to change (`trainer.tp_size` when no node can hold a TP group) and the resources asked and present;
    nothing stays reserved then."""
    if timeout_s <= 0:
        raise ValueError(f"the trainer's placement timeout must be > 0 seconds, got {timeout_s!r}")
    bundles = tp_group_bundles(cfg, use_gpu)
    groups = [placement_group(bundles, strategy="STRICT_PACK") for _ in range(cfg.world_size // cfg.tp_size)]
    try:
        _, pending = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=timeout_s)
        if pending:
            raise _not_placed(cfg, bundles, len(pending), len(groups), timeout_s)
        group_nodes = [_node_of(pg) for pg in groups]
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    except BaseException:
        _remove_all(groups)
        raise
    ranks = rank_bundles([(address.get(node, ""), node) for node in group_nodes], cfg.tp_size)
    nodes = [group_nodes[g] for g, _ in ranks]
    per_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        per_node.setdefault(f"{address.get(node, '?')} ({node[:8]})", []).append(rank)
    log.info("trainer ranks per node (tp=%d pp=%d dp=%d): %s", cfg.tp_size, cfg.pp_size, cfg.dp_size, per_node)
    return TrainerPlacement(groups=groups, ranks=ranks, nodes=nodes, use_gpu=use_gpu,
                            cpus_per_rank=float(cfg.cpus_per_rank))


def _node_of(pg: PlacementGroup) -> str:
    """The one node a created STRICT_PACK group sits on."""
    nodes = set(placement_group_table(pg)["bundles_to_node_id"].values())
    if len(nodes) != 1:  # STRICT_PACK promises one node; refuse to train on a broken promise
        raise RuntimeError(f"a STRICT_PACK placement group spans nodes {sorted(nodes)}")
    return nodes.pop()


def _remove_all(groups: list[PlacementGroup]) -> None:
    for pg in groups:
        remove_placement_group(pg)


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _not_placed(cfg: TrainerConfig, bundles: list[dict[str, float]], pending: int, total: int,
                timeout_s: float) -> ConfigError:
    """The error for TP groups still pending at the deadline: what one asks, what each node has."""
    ask: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            ask[k] = ask.get(k, 0.0) + v
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = [{k: n["Resources"].get(k, 0.0) for k in ask} for n in nodes]
    fits = any(all(t[k] >= v for k, v in ask.items()) for t in totals)
    short = [k for k, v in bundles[0].items() if all(t[k] < v for t in totals)]  # not even one rank fits
    free = ray.available_resources()
    per_node = "; ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]}) {_fmt(t)}" for n, t in zip(nodes, totals))
    what = (f"{pending} of {total} TP groups not placed after {timeout_s:g} s: one TP group ({cfg.tp_size} rank(s), "
            f"trainer.cpus_per_rank={cfg.cpus_per_rank:g}{', one GPU each' if 'GPU' in ask else ''}) asks for "
            f"{_fmt(ask)} on ONE node; nodes (total): {per_node or 'none'}; free in the cluster now: "
            f"{_fmt({k: free.get(k, 0.0) for k in ask})}")
    if short:
        field = "trainer.device" if "GPU" in short else "trainer.cpus_per_rank"
        return ConfigError(field, f"a node with what one rank asks for, {_fmt(bundles[0])} ({what})",
                           cfg.device if "GPU" in short else cfg.cpus_per_rank)
    if not fits:
        return ConfigError("trainer.tp_size", f"a TP group that fits one node ({what}): lower trainer.tp_size or "
                           "trainer.cpus_per_rank, or use larger nodes", cfg.tp_size)
    return ConfigError("trainer.dp_size/tp_size/pp_size", f"a layout the cluster can hold ({what}): other actors "
                       "(engines, teachers) hold the rest, or nodes are still starting; use fewer ranks or "
                       "engines, or a longer placement timeout", (cfg.dp_size, cfg.tp_size, cfg.pp_size))
