"""Peak memory of a stage: `torch.cuda` peak statistics on GPU, the resident-set high-water mark on Linux CPU.

torch has no peak-memory API for CPU tensors. Linux exposes the process's peak resident set as `VmHWM` in
`/proc/self/status`, and writing `5` to `/proc/self/clear_refs` resets it, so a per-stage peak can be read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


__all__ = ["PeakMemory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _read_status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Resets and reads the peak memory of one device.

    Args:
        device (`torch.device`): a CUDA device is measured with `torch.cuda.max_memory_allocated`; anything else with
            the process's resident-set high-water mark (bytes of the whole process, model included).

    Example:
        ```python
        >>> meter = PeakMemory(torch.device("cpu"))
        >>> meter.reset()
        >>> _ = torch.ones(1_000_000)
        >>> meter.read() > 0
        True
        ```
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss_hwm"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Where this is not permitted, the high-water mark covers the whole process lifetime instead.
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text("5")

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _read_status_kib("VmHWM")

    def current(self) -> int | None:
        """Memory held now, measured as `read` measures a peak: CUDA allocated bytes, or the process's resident set."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self.current_rss()

    @staticmethod
    def current_rss() -> int | None:
        """Current resident set of this process, in bytes (Linux)."""
        return _read_status_kib("VmRSS")
