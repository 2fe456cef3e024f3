"""Training on the CPU keeps its peak memory to what it uses (glibc on Linux).

glibc serves a large allocation from its own mapping and unmaps it when freed, but each time it frees such a
block it raises its threshold for the next ones to that block's size (up to 32 MiB). After a few training steps,
the activations and the per-layer weight copies (a quantized base dequantizes each linear layer's weight at every
product) come from the heap instead, where freed blocks stay resident: the process's peak grows step after step
to several times what the tensors need (docs/benchmarks.md, "Memory levers"). A fixed threshold keeps glibc from
raising it. Setting MALLOC_MMAP_THRESHOLD_ yourself overrides this; elsewhere than glibc it does nothing.
"""

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and more are mapped, and given back when freed

_done = False


def keep_freed_memory_returned() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES for this process, once; True where it was set."""
    global _done
    if _done or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _done = True
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or one without mallopt (not glibc)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
