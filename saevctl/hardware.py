"""What the machine's processor offers, read without importing torch (for defaults and notes)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where bfloat16 matmuls run in hardware (AMX tiles or AVX-512 BF16): about 3x float32 on such CPUs,
    while elsewhere bfloat16 is emulated and slower than float32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def bf16_is_fast(device: str) -> bool:
    """Whether bfloat16 autocast speeds up matmuls on `device`: on a GPU, or on a CPU with fast bfloat16. Where it
    does not, a bfloat16 request (train --dtype, extract and mine --compute) runs in float32 with a warning."""
    return not device.startswith("cpu") or cpu_has_fast_bf16()


def runs_in(precision: str, device: str) -> str:
    """The precision a run asked for `precision` works in on `device`: bfloat16 only where it is fast (the rule
    `bf16_if_fast` applies), without its warning (to know, before a run, what it would record)."""
    return precision if precision != "bfloat16" or bf16_is_fast(device) else "float32"


def bf16_if_fast(flag: str, device: str, doing: str) -> bool:
    """Whether a bfloat16 request (`flag`: train --dtype, extract or mine --compute) runs in bfloat16 on `device`.
    Where bfloat16 matmuls would be emulated (a CPU without AMX or AVX512-BF16: slower than float32, #17) the work
    runs in float32 instead, and a warning says so."""
    if runs_in("bfloat16", device) == "bfloat16":
        return True
    log.warning("%s: this CPU has no AMX or AVX512-BF16, where bfloat16 matmuls are slower than float32; %s in "
                "float32", flag, doing)
    return False
