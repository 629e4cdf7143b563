"""File work on a model's behalf that can never leave the sandbox root (standard library only).

The agent does file work outside the jail, as root on the local backend. A path the model chose, or
a file the model left behind (a symlink, a FIFO, a device node, a hard link), must never make that
work touch anything outside the sandbox directory, block the agent, or hand the model a file it
could not read itself. So every path is walked one component at a time from a descriptor of the
root with ``O_NOFOLLOW``: a symlink anywhere on the way is refused, not followed. Leaves are opened
with ``O_NOFOLLOW | O_NONBLOCK`` and must be regular files; writes go to a fresh ``O_EXCL`` temporary
file in the same directory that is renamed over the target, so nothing the model planted is ever
opened for writing.

Paths are relative to the root (or absolute inside it); ``..`` is resolved lexically and may not climb
above the root. The file ships next to ``agent.py`` (and into the sandbox pod's ConfigMap).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import stat
from typing import Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_PREFIX = ".mopd-tmp-"


class Refused(Exception):
    """A request the agent will not carry out; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parts(root: str, path: object) -> list[str]:
    """The components of `path` below `root`; refuses what is not a path inside the sandbox."""
    if not isinstance(path, str) or not path:
        raise Refused(400, "field `path` must be a non-empty string")
    if "\x00" in path:
        raise Refused(400, "field `path` must not contain NUL bytes")
    if posixpath.isabs(path):
        norm = posixpath.normpath(path)
        if norm != root and not norm.startswith(root.rstrip("/") + "/"):
            raise Refused(403, f"path {path!r} is outside the sandbox")
        rel = posixpath.relpath(norm, root)
    else:
        rel = posixpath.normpath(path)
    if rel == ".":
        return []
    names = rel.split("/")
    if names[0] == "..":
        raise Refused(403, f"path {path!r} is outside the sandbox")
    return names


def _open_dir(at: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=at)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise Refused(
                403, f"{shown!r} is a symlink or not a directory (links are not followed)"
            ) from None
        raise


@contextlib.contextmanager
def directory(
    root: str, names: list[str], create: bool = False, owner: tuple[int, int] | None = None
) -> Iterator[int]:
    """A descriptor of root/names, walked without following links; missing dirs made when `create`."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for i, name in enumerate(names):
            shown = "/".join(names[: i + 1])
            try:
                nxt = _open_dir(fd, name, shown)
            except FileNotFoundError:
                if not create:
                    raise Refused(404, f"no such directory: {shown}") from None
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # raced with another request: open whatever is there, still without following
                nxt = _open_dir(fd, name, shown)
                if owner is not None:
                    os.fchown(nxt, *owner)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_file(root: str, path: object, limit: int) -> bytes:
    """At most `limit` bytes of a regular file (413 past that); links and special files refused."""
    names = parts(root, path)
    if not names:
        raise Refused(400, f"{path!r} is a directory")
    with directory(root, names[:-1]) as dfd:
        try:
            fd = os.open(names[-1], _READ_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise Refused(404, f"no such file: {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(403, f"{path!r} is a symlink (links are not followed)") from None
            if exc.errno == errno.ENXIO:  # a unix socket (or a FIFO without a writer on some kernels)
                raise Refused(
                    400, f"{path!r} is not a regular file (FIFOs, sockets and devices are refused)"
                ) from None
            raise
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Refused(400, f"{path!r} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise Refused(400, f"{path!r} is not a regular file (FIFOs, sockets and devices are refused)")
            if st.st_nlink > 1:
                raise Refused(400, f"{path!r} has other hard links; the agent reads only singly-linked files")
            chunks, size = [], 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    if size > limit:
        raise Refused(413, f"{path!r} is larger than {limit} bytes")
    return b"".join(chunks)


def write_file(root: str, path: object, data: bytes, mode: int | None, owner: tuple[int, int] | None) -> None:
    """Replace root/path with `data` atomically; parents are created, nothing existing is written through.

    ``mode`` None keeps the permission bits of the file replaced (an edited script stays executable),
    0644 for a new file."""
    names = parts(root, path)
    if not names:
        raise Refused(400, f"{path!r} is a directory")
    if mode is not None and (not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777):
        raise Refused(400, f"field `mode` must be a permission integer in 0..0o777, got {mode!r}")
    with directory(root, names[:-1], create=True, owner=owner) as dfd:
        name = names[-1]
        old = lstat_at(dfd, name)
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise Refused(400, f"{path!r} is a directory")
        if mode is None:
            mode = (
                stat.S_IMODE(old.st_mode) & 0o777 if old is not None and stat.S_ISREG(old.st_mode) else 0o644
            )
        tmp = TMP_PREFIX + secrets.token_hex(8)
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dfd)
        except OSError as exc:
            _refuse_if_full(exc, path)
            raise
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if owner is not None:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            if isinstance(exc, OSError):
                _refuse_if_full(exc, path)
            raise


def _refuse_if_full(exc: OSError, path: object) -> None:
    """A full disk quota is the sandbox's own doing: 507, as WebDAV's Insufficient Storage."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise Refused(
            507, f"cannot write {path!r}: the sandbox's disk quota is full (no space left on device)"
        ) from None


def make_dirs(root: str, path: object, owner: tuple[int, int] | None) -> str:
    """Create root/path (no links followed on the way) and return it as a path string."""
    names = parts(root, path)
    with directory(root, names, create=True, owner=owner):
        pass
    return posixpath.join(root, *names) if names else root


def existing_dir(root: str, path: object) -> str:
    """root/path as a path string, after checking it is a directory reached without links."""
    names = parts(root, path)
    with directory(root, names):
        pass
    return posixpath.join(root, *names) if names else root


def check_extract_target(root: str, dest: str, member_name: str, is_dir: bool) -> None:
    """Refuse a tar member that would land on a link or special file the model left in the sandbox."""
    names = parts(root, posixpath.join(dest, member_name))
    try:
        with directory(root, names[:-1]) as dfd:
            st = lstat_at(dfd, names[-1]) if names else None
    except Refused as exc:
        if exc.status == 404:
            return  # parents will be created fresh by the extraction
        raise
    if st is None:
        return
    if is_dir and stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        raise Refused(403, f"upload would write through {member_name!r}, which is a link or special file")
