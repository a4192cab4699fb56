"""Host memory: keep the heap's freed pages for the next batch during a run, and give them back to the OS between
layers of a long prompt."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ["keep_freed_memory", "release_freed_memory"]


def _libc():
    """glibc's ``malloc_trim`` and ``mallinfo2`` (None where there is no glibc >= 2.33)."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_TRIM_ABOVE = 1 << 29  # free heap bytes worth giving back


def release_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the OS once they add up to 512 MiB (glibc; a no-op elsewhere).

    glibc keeps what a layer frees for the next one: ~0.4 GB at 2,048 tokens of SmolLM2 (reused, so trimming it only
    makes the pages fault back in: ~1 s a profile at a 256 MiB threshold), but a pool of 1.2-1.7 GB at 8,192 tokens
    that set the peak RSS (3.8 GiB without a trim, 2.56 GiB trimming past 1 GiB, 1.79 GiB past 512 MiB).
    """
    if _LIBC is not None and _LIBC.mallinfo2().fordblks > _TRIM_ABOVE:
        _LIBC.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_LOCK = threading.Lock()
_KEEP_USERS = 0


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """While open (in any thread), glibc keeps freed heap memory for reuse instead of returning the top of the heap
    to the OS on every large free (trim threshold 1 GiB; blocks up to 32 MiB from the heap): a forward pass frees
    and allocates the same blocks layer after layer and batch after batch, and each page handed back costs a page
    fault when it comes back (~1 us on bare metal, 20 us and more in a VM whose host reclaims free pages). On close
    the thresholds are left where glibc's own adaptive ones end up after the first large free (32 MiB mmap,
    64 MiB trim). ``release_freed_memory`` still trims explicitly. A no-op without glibc."""
    global _KEEP_USERS
    if _LIBC is None:
        yield
        return
    with _KEEP_LOCK:
        if _KEEP_USERS == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _KEEP_USERS += 1
    try:
        yield
    finally:
        with _KEEP_LOCK:
            _KEEP_USERS -= 1
            if _KEEP_USERS == 0:
                _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
