"""Inter-process locks for writers of a local store (ingest runs, label saves).

A lock is an advisory ``fcntl.flock`` on a small file inside the store. The
kernel drops it when its holder exits, however it exits (``kill -9``
included), so a crashed writer never leaves a lock behind on a local disk;
the file itself stays and records the last holder (pid, host, time, what it
was doing) for the message another writer gets. On NFS, Linux maps ``flock``
to POSIX byte-range locks, which the NFS lock manager shares between hosts;
a lock held by a host that died is released when its lease expires.

Remote object stores (``s3://``, ``gs://``, ...) have no such primitive:
:func:`store_lock` does nothing there and the store assumes a single writer
per case (see README, "Safety and limits").
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spadkit.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows: no flock; documented as unsupported for concurrent writers
    fcntl = None  # type: ignore[assignment]

#: Seconds a label save waits for another save of the same label map.
LABEL_LOCK_TIMEOUT_S = 60.0


def local_root(url: str) -> Path | None:
    """The local folder of a store URL, or None for a remote (fsspec) store."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    return None if "://" in url else Path(url)


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on host {holder['host']} ({holder.get('what', 'a writer')}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def store_lock(url: str, name: str, what: str, *, timeout_s: float = 0.0) -> Iterator[None]:
    """Hold the lock file ``name`` inside the local store ``url`` for the block.

    Args:
        url: the store's path or URL (remote stores are not locked).
        name: lock file path relative to the store root, e.g. ``".spadkit/ingest.lock"``.
        what: what the holder does, recorded for the message of a waiting writer.
        timeout_s: how long to wait for the lock (0: fail at once).

    Raises:
        StoreError: the lock is held by another process (the message names it,
            the lock file and what to do).
    """
    root = local_root(url)
    if root is None or fcntl is None:
        yield
        return
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"the store is locked by {_describe_holder(path)}",
                        path=path,
                        fix="wait until it finishes and try again. The lock is released when its process exits, even when "
                        "it is killed; if that process no longer runs and the message persists (a network file system that "
                        f"lost the lock), delete {path}.",
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({**_holder(), "what": what}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
