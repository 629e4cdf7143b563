"""A real embedded Ray cluster (2 CPUs, no dashboard) shared by the toolbox tests of a module."""

from __future__ import annotations

import os

import pytest
import ray

from envs.sandbox.local import sweep_stale


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="mopd")
    yield
    ray.shutdown()
    sweep_stale()  # sandboxes of worker actors that the tests killed on purpose
