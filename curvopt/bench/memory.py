"""Peak-memory measurement around a block of code, on the CPU and on CUDA.

CPU: PyTorch allocates tensor memory outside Python's allocator, so ``tracemalloc`` does not see it.
The harness therefore measures the **resident set size** (RSS, from ``/proc/self/statm``) of the
process: a background thread samples it every ``interval`` seconds while the block runs, and the
reported CPU peak is ``max(RSS during the block) - RSS at entry`` in bytes. Before entry, freed heap
memory is handed back to the operating system (glibc ``malloc_trim``) so that memory freed by an
earlier measurement is not silently reused. The figure is thus an estimate of the *extra* memory a
block needs: it misses peaks shorter than the sampling interval and includes anything else the
process allocates meanwhile. Where ``/proc`` is missing (macOS, Windows) the CPU figure is ``None``.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
allocated at entry (exact for the caching allocator's allocations), or ``None`` without CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def current_rss_bytes() -> int | None:
    """The process's resident set size in bytes, or ``None`` where ``/proc`` is not available."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """Context manager that records the peak extra CPU memory (RSS) and CUDA memory of a block.

    Args:
        device: The device whose CUDA memory is tracked (ignored unless it is a CUDA device).
        interval: RSS sampling period in seconds.

    Attributes:
        cpu_bytes: Peak RSS increase over entry, in bytes (``None`` if RSS cannot be read).
        cuda_bytes: Peak CUDA allocation increase over entry, in bytes (``None`` off CUDA).

    Example:
        >>> with PeakMemory() as mem:
        ...     x = torch.ones(1_000_000, dtype=torch.float64)
        >>> mem.cpu_bytes is None or mem.cpu_bytes >= 0
        True
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 1e-3) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.device = torch.device(device)
        self.interval = interval
        self.cpu_bytes: int | None = None
        self.cuda_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_rss: int | None = None
        self._max_rss: int | None = None
        self._start_cuda = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss_bytes()
            if rss is not None and rss > self._max_rss:
                self._max_rss = rss

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        self._start_rss = self._max_rss = current_rss_bytes()
        if self._start_rss is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_cuda = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            self.cuda_bytes = torch.cuda.max_memory_allocated(self.device) - self._start_cuda
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            end = current_rss_bytes()
            peak = max(self._max_rss, end if end is not None else 0)
            self.cpu_bytes = max(0, peak - self._start_rss)
