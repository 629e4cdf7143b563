"""An embedded job cluster is the job's own, even when another Ray instance runs on the machine."""

from __future__ import annotations

import ray
from ray.cluster_utils import Cluster

from mopd.config import JobConfig
from mopd.job import _init_ray


def test_embedded_cluster_does_not_join_a_running_one() -> None:
    """With no ray_address the job starts its own cluster, not the one `ray start` last recorded (which
    ray.init() without an address joins, refusing the job's num_cpus)."""
    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        job = JobConfig()
        job.ray_num_cpus = 2
        shutdown = _init_ray(job)
        try:
            assert ray.get_runtime_context().gcs_address != other.address
            assert ray.cluster_resources().get("CPU") == 2
        finally:
            shutdown()
    finally:
        other.shutdown()
