"""The Zarr store under an :class:`~spadkit.io.omezarr.OMEZarrStore`: lost chunks are errors.

Zarr reads an absent chunk as its fill value, which is right for sparse
arrays but turns lost data (a deleted or never-copied chunk file) into zeros.
spadkit writes every chunk of its arrays (``write_empty_chunks``) and records
``all_chunks_written`` in the case attributes; for such cases
:class:`CheckedStore` raises :class:`~spadkit.errors.StoreError` naming the
chunk instead. The check costs nothing extra: Zarr already asked the store
for the chunk and got "absent" back. Every read path (``read_image``,
``read_label``, ``spadkit info``, the patch stream) goes through it. In
unsharded stores the Blosc header of such a chunk is checked against its size
before decoding, so a truncated or garbled chunk is a
:class:`~spadkit.errors.CorruptFileError` naming it, not a decoder crash.
On a local disk every ``zarr.json`` is replaced atomically (temporary file,
fsync, rename): readers never see half a metadata document.

Label versions are copy-on-write: :meth:`CheckedStore.share` makes a chunk
(or shard) file of a new version a *hard link* to the previous version's
file, so every version stays a complete, ordinary Zarr array while an edit
writes only the files it changes. Sharing is safe because no file is ever
rewritten in place: Zarr's local store writes a temporary file and renames it
over the old name (a new inode; the other versions keep theirs), and deleting
a version only removes its names. :meth:`CheckedStore.journal` records what a
save wrote so that :meth:`CheckedStore.make_durable` can fsync those files and
their folders before the metadata that points at them is replaced. Remote
(fsspec) stores have no links: every version is written in full there.

This is also the one place where spadkit runs a store coroutine synchronously
(:func:`run_sync`: listing a store's children, reading metadata of many cases
at once, deleting a case folder whatever its state).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from spadkit.atomic import atomic_path, fsync_dir, fsync_file
from spadkit.errors import CorruptFileError, StoreError

T = TypeVar("T")

LOST_CHUNK_FIX = "the store lost data (e.g. an interrupted copy): copy it again, or re-ingest the case with `spadkit ingest DATASET --out STORE --repair`."


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store coroutine on Zarr's I/O event loop and return its result."""
    return sync(coro)


def is_chunk_key(key: str) -> bool:
    """True for the key of a chunk or shard (``.../c/0/1/2/3``), False for metadata."""
    return "/c/" in key and not key.endswith("zarr.json")


@dataclass
class Journal:
    """What was written through a store while a journal was open: bytes, and the keys of written and linked files."""

    prefix: str = ""
    bytes_written: int = 0
    written: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)


class CheckedStore(WrapperStore):
    """A store whose absent chunks are errors for the case ids in ``strict``.

    Args:
        store: the wrapped Zarr store.
        url: the store's URL, for messages.
        strict: case ids (top-level group names) whose arrays have every chunk written;
            shared by every copy :meth:`with_read_only` makes.
    """

    def __init__(self, store: Any, url: str = "", strict: set[str] | None = None, *, local: bool = False):
        super().__init__(store)
        self.url = url
        self.strict: set[str] = set() if strict is None else strict
        self.local = local
        #: Check the Blosc frame header of each chunk of a strict case (unsharded stores only:
        #: a whole-shard read is not one frame).
        self.check_frames = False
        #: Open journals (shared by every copy), see :meth:`journal`.
        self.journals: list[Journal] = []

    def _with_store(self, store: Any) -> CheckedStore:
        clone = type(self)(store, self.url, self.strict, local=self.local)
        clone.check_frames = self.check_frames
        clone.journals = self.journals
        return clone

    async def set(self, key: str, value: Buffer) -> None:
        """Write ``key``; on a local disk a metadata document is replaced atomically (temp file + rename),
        so a reader never sees half of a ``zarr.json``."""
        for journal in self.journals:
            journal.bytes_written += len(value)
            journal.written.append(key)
        if not (self.local and key.endswith("zarr.json")):
            await self._store.set(key, value)
            return
        self._check_writable()
        await asyncio.to_thread(_replace_file, Path(self._store.root) / key, value.to_bytes())

    @contextmanager
    def journal(self, prefix: str) -> Iterator[Journal]:
        """Record every key written (and linked) through this store, by any thread, inside the block.

        Chunks under ``prefix`` (the arrays being written) may be absent meanwhile.
        """
        journal = Journal(prefix=prefix.rstrip("/") + "/")
        self.journals.append(journal)
        try:
            yield journal
        finally:
            self.journals.remove(journal)

    def share(self, source: str, target: str) -> bool:
        """Make the file at key ``target`` a hard link to the file at ``source`` (local stores only).

        Where the file system refuses links the file is copied (and counted as written).
        Returns False, doing nothing, when ``source`` does not exist.

        Raises:
            StoreError: the store is remote (it cannot share files).
        """
        if not self.local:
            raise StoreError("a remote store cannot share files between label versions", path=self.url, fix="write the version in full.")
        self._check_writable()
        root = Path(self._store.root)
        src, dst = root / source, root / target
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except FileNotFoundError:
            return False
        except OSError:  # no hard links here (FAT, some network file systems): a copy is safe too
            shutil.copyfile(src, dst)
            for journal in self.journals:
                journal.bytes_written += dst.stat().st_size
                journal.written.append(target)
            return True
        for journal in self.journals:
            journal.linked.append(target)
        return True

    def make_durable(self, journal: Journal, upto: str) -> None:
        """fsync the files a journal recorded and every folder between them and ``upto`` (a key prefix), inclusive.

        Metadata documents are skipped (their atomic replace already fsyncs them).
        Does nothing on remote stores, whose writes are durable when they return.
        """
        if not self.local:
            return
        root = Path(self._store.root)
        for key in journal.written:
            if not key.endswith("zarr.json"):
                fsync_file(root / key)
        top = upto.strip("/")
        folders = {top}
        for key in [*journal.written, *journal.linked]:
            folder = key.rpartition("/")[0]
            while folder.startswith(f"{top}/") and folder not in folders:
                folders.add(folder)
                folder = folder.rpartition("/")[0]
        for folder in sorted(folders, key=lambda f: f.count("/"), reverse=True):  # children before parents
            fsync_dir(root / folder)

    def _check(self, key: str, value: Buffer | None) -> Buffer | None:
        if not is_chunk_key(key) or key.split("/", 1)[0] not in self.strict:
            return value
        array, chunk = key.split("/c/", 1)
        where = f"{self.url.rstrip('/')}/{array}"
        if value is None:
            if any(key.startswith(journal.prefix) for journal in self.journals):
                return None  # an array being written: a partial shard write reads the shard that is not there yet
            raise StoreError(f"chunk file c/{chunk} is missing", path=where, fix=LOST_CHUNK_FIX)
        problem = blosc_frame_problem(value.as_numpy_array()) if self.check_frames else None
        if problem:
            raise CorruptFileError(f"chunk file c/{chunk} is truncated or damaged ({problem})", path=where, fix=LOST_CHUNK_FIX)
        return value

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, value) for (key, _), value in zip(key_ranges, values)]

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (groups, arrays and plain files), sorted."""

        async def collect() -> list[str]:
            return [name async for name in self._store.list_dir(prefix)]

        return sorted(run_sync(collect()))

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes stored at ``keys`` (None where absent), fetched concurrently."""

        async def fetch() -> list[Buffer | None]:
            prototype = default_buffer_prototype()
            return await asyncio.gather(*(self._store.get(key, prototype) for key in keys))

        return [None if value is None else value.to_bytes() for value in run_sync(fetch())]


def blosc_frame_problem(data: bytes | np.ndarray) -> str | None:
    """Why ``data`` is not one whole Blosc 1 frame, or None if its header matches its size.

    Checked before decoding because the Blosc decoder trusts the header: a truncated
    frame makes it read past the buffer (a crash, not an exception). Bytes 12-15
    of the header hold the frame's total size; byte 0 its format version (2).
    """
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data.view(np.uint8).reshape(-1)
    declared = blosc_declared_size(raw)
    if declared is None:
        return f"it is no Blosc frame ({raw.size} bytes)"
    return None if declared == raw.size else f"its Blosc header gives {declared} bytes, the file holds {raw.size}"


def blosc_declared_size(data: bytes | bytearray | memoryview | np.ndarray) -> int | None:
    """The total frame size (bytes) a Blosc 1 header declares, or None when ``data`` starts with no such header."""
    header = bytes(memoryview(data)[:16]) if not isinstance(data, np.ndarray) else data[:16].tobytes()
    if len(header) < 16 or header[0] != 2:
        return None
    return int.from_bytes(header[12:16], "little")


def _replace_file(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def open_store(url: str, mode: str, storage_options: Mapping[str, Any] | None = None) -> CheckedStore:
    """A :class:`CheckedStore` over a local folder or an fsspec URL (``s3://...``), read-only for ``mode="r"``."""
    read_only = mode == "r"
    if "://" in url and not url.startswith("file://"):
        base: Any = FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)
    else:
        base = LocalStore(url.removeprefix("file://"), read_only=read_only)
    return CheckedStore(base, url, local=isinstance(base, LocalStore))
