"""Suite-wide settings: keep every embedded Ray cluster on loopback, one thread per process, wandb offline."""

import os

# Ray's embedded cluster binds to the machine's interface address unless told that it is a
# single-node "laptop" cluster; this keeps all of its traffic on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
