"""Local-sandbox latencies, without Ray: a no-op call, a tool call, and a session's first observation
cold and warm. Prints one JSON object; ``run.py`` runs it for each variant and interleaves them.

``--tree DIR`` imports ``envs`` from DIR (e.g. a ``git archive`` of an older commit), so the code
of another revision is measured by the same script on the same machine in the same run.

    python benchmarks/toolbox/sandbox_latency.py [--tree DIR] [--exec-mode forkserver|process]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

GREP = "grep -c tomat inflection/__init__.py"  # the tool call of run.py's toolbox benchmark


async def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    await fn(*args)
    return time.perf_counter() - t0


async def measure(backend, snapshot: str, calls: int, sessions: int) -> dict[str, list[float]]:
    """Samples in seconds, per measurement."""
    out: dict[str, list[float]] = {"noop": [], "tool": [], "cold": [], "warm": [], "warm_preloaded": []}
    sb = await backend.create()
    await sb.upload(snapshot)
    for _ in range(3):
        await sb.exec("true")
    for _ in range(calls):
        out["noop"].append(await _timed(sb.exec, "true"))
        out["tool"].append(await _timed(sb.exec, GREP))
    await sb.close()

    async def first_observation(sandbox, upload: bool) -> None:
        if not await sandbox.alive():  # what the toolbox worker checks before handing one out
            raise RuntimeError("warm sandbox not alive")
        if upload:
            await sandbox.upload(snapshot)
        r = await sandbox.exec(GREP)
        if r.exit_code != 0:
            raise RuntimeError(f"tool call failed: {r}")

    async def cold() -> None:
        sandbox = await backend.create()
        try:
            await first_observation(sandbox, upload=True)
        finally:
            await sandbox.close()

    warm = [await backend.create() for _ in range(sessions)]
    preloaded = [await backend.create(snapshot=snapshot) for _ in range(sessions)]
    await asyncio.sleep(1.0)  # a warm pool's sandboxes were started a while before they are used
    for i in range(sessions):
        out["cold"].append(await _timed(cold))
        out["warm"].append(await _timed(first_observation, warm[i], True))
        out["warm_preloaded"].append(await _timed(first_observation, preloaded[i], False))
    for sandbox in warm + preloaded:
        await sandbox.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default="", help="import envs from this directory (default: this checkout)")
    p.add_argument("--exec-mode", default="", help="LocalSandboxBackend(exec_mode=...); empty: its default")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--sessions", type=int, default=4)
    args = p.parse_args()
    root = args.tree or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.abspath(root))
    from envs.config import SandboxConfig
    from envs.sandbox.local import LocalSandboxBackend
    from envs.swe.task import builtin_tasks

    base = tempfile.mkdtemp(prefix="mopd-bench-", dir="/tmp")
    os.chmod(base, 0o711)
    kwargs = {"exec_mode": args.exec_mode} if args.exec_mode else {}
    backend = LocalSandboxBackend(SandboxConfig(base_dir=base), **kwargs)
    snapshot = builtin_tasks()[0].snapshot_dir
    result = asyncio.run(measure(backend, snapshot, args.calls, args.sessions))
    os.rmdir(base)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
