"""Writing a run's files past the page cache: ``O_DIRECT`` from one reused, page-aligned buffer, hashed as written.

A commit writes tens of MB (the accumulators' new generation alone is ~50 MB for SmolLM2) that nothing reads soon.
Through the page cache every one of those bytes first needs a fresh page of memory: ~0.25-0.4 s per 50 MB where
the host lends free pages lazily (a VM), against ~0.03 s for the same bytes written directly; on bare metal both
are cheap, and a direct write leaves the cache to the data being read. Where ``O_DIRECT`` is missing (not Linux) or
refused (tmpfs, some network file systems), the file is written the ordinary way.

The sha256 of every file written here is remembered by its inode, size and mtime (``known_sha256``), so that a
commit records the checksum of what it wrote without reading it back from disk.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["known_sha256", "remember", "write_file"]

_ALIGN = 4096  # offsets, lengths and the buffer's address: a multiple of any device's logical block
_BUFFER = 4 << 20
_local = threading.local()  # one staging buffer per thread, touched once and reused
_known: collections.OrderedDict = collections.OrderedDict()  # (dev, inode) -> (size, mtime_ns, sha256)
_KNOWN_MAX = 1024


def write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write the bytes-like ``chunks`` one after another as ``path`` (created or truncated) and fsync it; returns
    their sha256. ``O_DIRECT`` where the file system takes it, else buffered."""
    chunks = [memoryview(c).cast("B") for c in chunks]
    digest = _write_direct(path, chunks)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "wb") as f:
            for c in chunks:
                f.write(c)
                sha.update(c)
            f.flush()
            os.fsync(f.fileno())
        digest = sha.hexdigest()
    remember(path, digest)
    return digest


def remember(path: Path, digest: str) -> None:
    """Note ``digest`` as the sha256 of the file now at ``path`` (until it changes: inode, size, mtime)."""
    st = os.stat(path)
    _known[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, digest)
    _known.move_to_end((st.st_dev, st.st_ino))
    while len(_known) > _KNOWN_MAX:
        _known.popitem(last=False)


def known_sha256(path: Path) -> str | None:
    """The sha256 of ``path`` if this process wrote it (``write_file``) and it has not changed since, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    got = _known.get((st.st_dev, st.st_ino))
    return got[2] if got is not None and got[:2] == (st.st_size, st.st_mtime_ns) else None


def _buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(mmap.mmap(-1, _BUFFER))
    return buf


def _write_direct(path: Path, chunks: list[memoryview]) -> str | None:
    """The sha256 of ``chunks`` written to ``path`` with ``O_DIRECT``; None (and no file) where it is refused."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:  # the file system does not do direct I/O
            return None
        raise
    sha = hashlib.sha256()
    try:
        buf, fill, size = _buffer(), 0, 0
        for c in chunks:
            sha.update(c)
            size += len(c)
            pos = 0
            while pos < len(c):
                n = min(len(c) - pos, len(buf) - fill)
                buf[fill : fill + n] = c[pos : pos + n]
                fill, pos = fill + n, pos + n
                if fill == len(buf):
                    _write_all(fd, buf)
                    fill = 0
        if fill:  # the tail, zero-padded to the block size, then cut back
            pad = -fill % _ALIGN
            buf[fill : fill + pad] = bytes(pad)
            _write_all(fd, buf[: fill + pad])
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL:  # alignment the device does not take: start again, buffered
            Path(path).unlink(missing_ok=True)
            return None
        raise
    os.close(fd)
    return sha.hexdigest()


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]
