"""The plumbing shared by saevctl's compiled (numba) CPU kernels: the `kernel` decorator, the thread count, and
bfloat16 support (numba has none: a bfloat16 tensor goes in as its uint16 bits, read and written through `ld`/`st`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

NAN_SAFE = {"reassoc", "nsz", "arcp"}
"""fastmath flags for kernels whose sums may be reordered but must keep NaN and inf ("nnan"/"ninf" left out: a NaN in
the batch or the gradient must reach the loss, and the trainer stops on it)."""
log = logging.getLogger(__name__)


def kernel(parallel: bool = False, fastmath: bool | set[str] = False, inline: bool = False) -> Callable[[F], F]:
    """numba.njit, cached on disk, of the function itself (unwrapped: the test suite's type-checking import hook
    wraps every saevctl function, and numba compiles Python, not a wrapper). `inline`: inlined into its callers
    by numba itself (a small per-element helper taking many arrays, whose call would cost more than its body)."""

    def compile(fn: F) -> F:
        dispatcher = njit(cache=True, parallel=parallel, fastmath=fastmath,
                          inline="always" if inline else "never")(inspect.unwrap(fn))
        cache = getattr(dispatcher, "_cache", None)
        if cache is not None and hasattr(cache, "save_overload"):
            cache.save_overload = _cache_or_warn(cache.save_overload, fn.__qualname__)
        return cast(F, dispatcher)

    return compile


def _cache_or_warn(save: Callable[..., None], name: str) -> Callable[..., None]:
    """numba's on-disk cache write, where a failure (a full disk, a read-only or vanished folder) costs only the
    cache: the compiled kernel is in memory and the run goes on (numba itself would raise out of the first call)."""

    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            save(*args, **kwargs)
        except OSError as e:
            log.warning("could not cache the compiled kernel %s (%s); it is compiled again next run", name, e)

    return guarded


def n_threads(want: int | None = None) -> int:
    """The threads a kernel runs on: `want`, or else torch's setting, capped by numba's pool.

    numba's OpenMP pool shares the process's OpenMP runtime with torch, and starting it sets that runtime's thread
    count to numba's own default (every core): torch's setting is put back, so that a kernel never changes how
    many threads torch's own operations run on (nor, with them, their results' summation order)."""
    n_torch = torch.get_num_threads()
    numba_now = numba.get_num_threads()  # starts numba's pool on first use
    n = max(1, min(want or n_torch, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    if numba_now != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != n_torch:
        torch.set_num_threads(n_torch)
    return n


def as_array(x: Tensor) -> np.ndarray:
    """A CPU tensor's memory as numpy (no copy), bfloat16 as its uint16 bits (read back with `ld`)."""
    return x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


@intrinsic
def _f32_from_bits(typingctx: Any, u: Any) -> Any:
    """The float32 whose bits are the uint32 u (a bitcast, free once compiled)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def f32_bits(typingctx: Any, v: Any) -> Any:
    """The uint32 bits of the float32 v."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def ld(a: np.ndarray, j: int) -> np.float32:
    """a[j] as float32, a holding float32 or bfloat16 bits as uint16 (compiled code only)."""
    raise NotImplementedError


def ld2(a: np.ndarray, i: int, j: int) -> np.float32:
    """a[i, j] as float32, as `ld`."""
    raise NotImplementedError


def st2(a: np.ndarray, i: int, j: int, v: np.float32) -> None:
    """a[i, j] = v, rounded to the nearest bfloat16 (ties to even) where a holds bfloat16 bits."""
    raise NotImplementedError


# numba matches each implementation's signature to its overload's, so these carry no annotations; no nested def
# either (the tests' type-checking import hook would wrap it, and numba cannot compile the wrapper)
@overload(ld)
def _ld(a, j):  # type: ignore[no-untyped-def]
    if a.dtype == types.uint16:
        return lambda a, j: _f32_from_bits(np.uint32(a[j]) << np.uint32(16))  # type: ignore[call-arg]
    return lambda a, j: a[j]


@overload(ld2)
def _ld2(a, i, j):  # type: ignore[no-untyped-def]
    if a.dtype == types.uint16:
        return lambda a, i, j: _f32_from_bits(np.uint32(a[i, j]) << np.uint32(16))  # type: ignore[call-arg]
    return lambda a, i, j: a[i, j]


@overload(st2)
def _st2(a, i, j, v):  # type: ignore[no-untyped-def]
    if a.dtype == types.uint16:
        return lambda a, i, j, v: _store_bf16(a, i, j, v)
    return lambda a, i, j, v: _store_f32(a, i, j, v)


@kernel()
def _store_bf16(a: np.ndarray, i: int, j: int, v: float) -> None:
    u = f32_bits(np.float32(v))  # type: ignore[call-arg, var-annotated]
    a[i, j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@kernel()
def _store_f32(a: np.ndarray, i: int, j: int, v: float) -> None:
    a[i, j] = v


@kernel()
def f16_bits(v: float) -> np.uint16:
    """The bits of float32 v rounded to the nearest float16 (ties to even; overflow to inf, NaN kept), as
    `torch.Tensor.half()` rounds (numba has no float16 on a CPU)."""
    u = f32_bits(np.float32(v))  # type: ignore[call-arg, var-annotated]
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    e = np.int64((u >> np.uint32(23)) & np.uint32(0xFF))
    mant = u & np.uint32(0x7FFFFF)
    if e == 0xFF:  # inf, NaN (quiet)
        return np.uint16(sign | np.uint32(0x7C00) | (np.uint32(0x200) if mant else np.uint32(0)))
    ex = e - 112  # the float16 biased exponent
    if ex >= 31:
        return np.uint16(sign | np.uint32(0x7C00))
    if ex <= 0:  # a float16 subnormal, or zero
        if ex < -10:
            return np.uint16(sign)
        m = mant | np.uint32(0x800000)
        shift = np.uint32(14 - ex)
        h = m >> shift
        rem = m & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if rem > half or (rem == half and (h & np.uint32(1))):
            h += np.uint32(1)
        return np.uint16(sign | h)
    h = (np.uint32(ex) << np.uint32(10)) | (mant >> np.uint32(13))
    rem = mant & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)  # a carry into the exponent is right, up to inf
    return np.uint16(sign | h)
