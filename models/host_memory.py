"""How a training process keeps the memory it frees.

glibc serves each allocation above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with
a fresh mapping and unmaps it on free. A training step allocates and frees the same activation and
gradient buffers every iteration, so on the CPU each step faults all of them in again: tens of
thousands of page faults per step, each zero-filling a page (costly in a virtual machine). Raising
the mmap threshold to its maximum and not trimming the heap keeps freed blocks in the process for the
next step to reuse; the process's resident memory then stays at its peak, as a caching allocator's
would (PyTorch's CUDA allocator does the same for device memory).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
NEVER_TRIM = 2 ** 31 - 1


@functools.cache
def reuse_freed_memory() -> bool:
    """Makes this process keep freed heap memory for reuse; True where the C library is glibc and
    took the settings, False elsewhere (musl, macOS, Windows: their allocators are left as they are)."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
