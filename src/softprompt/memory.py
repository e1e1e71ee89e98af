"""How much memory is free now, so that sizes are checked before anything is allocated (the theory lab's limits,
the fixed decoding buffers of text generation)."""

from __future__ import annotations

import os


def available_host_memory() -> int | None:
    """Bytes the host can still allocate: Linux's MemAvailable (page cache included; free pages alone undercount
    it), else the physical memory on other POSIX systems, else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other POSIX systems: physical memory (no notion of "available")
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def free_bytes(device) -> int | None:
    """Bytes free on ``device`` (a ``torch.device``) now: a CUDA device's free memory, or the host's available
    memory; None if unknown."""
    if device.type == "cuda":
        import torch  # here, not at import: the theory lab's CLI checks sizes without loading torch

        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()
