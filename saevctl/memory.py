"""Memory estimates checked before any work: a setting that cannot fit (a --batch-size, a --top-k) is one line naming
it, instead of a process that swaps for an hour or is killed half-way. Torch-free (torch only for a GPU's size).
"""

from __future__ import annotations

import os
from pathlib import Path

from saevctl.atomic import fmt_bytes
from saevctl.errors import InputError


def physical_memory() -> int | None:
    """Memory this process may use, in bytes: the machine's RAM, or a lower cgroup limit (a container's or a job's
    cap); None where the OS does not say."""
    try:
        ram: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    for fpath in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(fpath).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" means no limit; v1 writes a huge number for none
            ram = min(ram, int(text)) if ram is not None else int(text)
    return ram


def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes, how to name it) of the memory a resolved `device` has: the GPU's, or this machine's RAM."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory, "the GPU"
    return physical_memory(), "this machine"


def check_memory(need: int, what: str, hint: str, *, available: int | None, where: str = "this machine",
                 of: str = "memory") -> None:
    """Refuse, before any work, a setting whose estimated memory `need` (bytes; estimates are lower bounds, so
    nothing that fits is refused) exceeds `available` (None: unknown, let it run); one line naming the option."""
    if available is None or need <= available:
        return
    raise InputError(f"{what} needs about {fmt_bytes(need)} of {of}, more than {where} has ({fmt_bytes(available)})",
                     hint)
