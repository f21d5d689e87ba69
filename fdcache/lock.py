"""One writer at a time: an advisory ``fcntl.flock`` on a lock file holding the holder's
host and pid. Stores (``STORE.fdcache-lock``, next to the store) and run directories use it.

The kernel drops the lock when its process dies, so a killed run leaves no stale lock, and
the file is removed when the holder releases it, so a finished or failed run leaves nothing
beside the user's files. Removing a lock file is safe only because every taker checks, after
``flock`` succeeds, that the path still names the file it locked (else it retries on the new
file): a taker that opened the file just before the holder removed it cannot hold a lock
nobody else sees. Local files only (object stores have no advisory locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from .errors import FdcacheError

__all__ = ["LOCK_SUFFIX", "AdvisoryLock"]

LOCK_SUFFIX = ".fdcache-lock"  # the lock of a store or run directory X is the file X.fdcache-lock beside it


class AdvisoryLock:
    """``with AdvisoryLock(path, what, error=SomeError):`` -- ``error`` (an FdcacheError
    subclass) is raised naming ``what`` and the holder when another process holds the lock."""

    def __init__(self, path: str | os.PathLike | None, what: str, error: type[FdcacheError] = FdcacheError):
        self.path = None if path is None else Path(path)
        self.what, self.error = what, error
        self.fd = None

    @classmethod
    def beside(cls, target: str | os.PathLike, what: str, error: type[FdcacheError] = FdcacheError) -> "AdvisoryLock":
        """The lock of the folder ``target``: ``TARGET.fdcache-lock`` next to it, in the same
        file system (so it works on shared ones), outside the folder fdcache writes. The path is
        resolved first, so ``.`` or a symlink to the folder finds the same lock."""
        return cls(os.path.realpath(target) + LOCK_SUFFIX, what, error)

    def __enter__(self) -> "AdvisoryLock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise self.error(f"{self.what} is being written by another fdcache process, {holder} "
                                 f"({self.path}): wait for it to finish, or stop it; then re-run") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we locked it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # our own file, removed while we still hold it
            except FileNotFoundError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(raw: bytes) -> str:
    """``on HOST, pid N`` from a lock file's record (its writer may not have written it yet)."""
    try:
        rec = json.loads(raw.decode())
        return f"on {rec['host']}, pid {rec['pid']}"
    except (ValueError, KeyError, TypeError):
        return "whose pid is not recorded yet"
