"""The Sandbox interface shared by the local-process and Kubernetes-pod backends.

Both backends start the same in-sandbox agent and differ only in how they create and destroy it;
every operation goes through ``AgentClient`` so the code path is identical locally and at scale.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from envs.config import MAX_CALL_TIMEOUT_S
from envs.sandbox.client import AgentClient


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    output: str
    truncated: bool
    timed_out: bool
    killed_reason: str | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ExecResult":
        return cls(
            obj.get("exit_code"),
            obj.get("output", ""),
            bool(obj.get("truncated")),
            bool(obj.get("timed_out")),
            obj.get("killed_reason"),
            float(obj.get("duration_s", 0.0)),
        )


def tar_directory(path: str, arcname: str = ".") -> bytes:
    """A directory as an in-memory tar, for ``Sandbox.upload``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cannot upload {path!r}: not a directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=arcname, filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return buf.getvalue()


class Sandbox:
    """One isolated workspace: ``exec``, ``read_file``, ``write_file``, ``upload``, ``close``."""

    def __init__(
        self,
        sandbox_id: str,
        client: AgentClient,
        closer: Callable[[], Awaitable[None]],
        info: dict[str, Any] | None = None,
    ) -> None:
        self.id = sandbox_id
        self.client = client
        self.info = info or {}
        self._closer = closer
        self.closed = False

    async def exec(
        self,
        command: str,
        timeout: float | None = None,
        max_output: int | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        body: dict[str, Any] = {"command": command}
        if timeout is not None:
            if (
                isinstance(timeout, bool)
                or not isinstance(timeout, (int, float))
                or not (0 < timeout <= MAX_CALL_TIMEOUT_S)
            ):  # also refuses NaN, which would switch the HTTP timeout below off
                raise ValueError(
                    f"timeout must be a number of seconds in (0, {MAX_CALL_TIMEOUT_S:g}], got {timeout!r}"
                )
            body["timeout"] = timeout
        if max_output is not None:
            body["max_output"] = max_output
        if cwd is not None:
            body["cwd"] = cwd
        http_timeout = (timeout or 600.0) + 30.0
        return ExecResult.from_json(await self.client.call("/exec", body, timeout=http_timeout))

    async def read_file(self, path: str) -> str:
        return (await self.client.read(path)).decode("utf-8", "replace")

    async def write_file(self, path: str, content: str | bytes, mode: int | None = None) -> None:
        """Replace a file; ``mode`` None keeps an existing file's permission bits (0644 for a new one)."""
        await self.client.write(path, content.encode() if isinstance(content, str) else content, mode)

    async def upload(self, local_dir: str, dest: str = ".") -> int:
        return await self.client.upload(tar_directory(local_dir), dest)

    async def alive(self) -> bool:
        return await self.client.healthy()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.client.close()
        finally:
            await self._closer()
