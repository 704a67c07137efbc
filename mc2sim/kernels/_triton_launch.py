"""Launching the Triton kernels with little host time, and what they share per device.

Imported only by the Triton kernels (:mod:`mc2sim.kernels._ifa_triton`,
:mod:`mc2sim.kernels._gmm_triton`), on a CUDA device where ``triton`` imports.

Triton's own launch path binds, specializes and hashes every argument in Python on each
call: about 70 us of host time per launch on the H200's host, as much as the kernels
themselves take on the GPU at a decode step's sizes. :class:`KernelLaunch` takes that path on
the first launch of a specialization only, and afterwards calls the compiled kernel's
launcher itself.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import triton

from mc2sim.kernels._cache import put_bounded

__all__ = [
    "DIRECT_LAUNCH",
    "KernelLaunch",
    "current_stream",
    "device_index",
    "launching_on",
    "multiprocessors",
    "workspace",
]

DIRECT_LAUNCH = triton.__version__.split(".")[:2] == ["3", "6"]
"""Launch a compiled kernel directly (see :class:`KernelLaunch`) only on the Triton whose
launcher signature this was written against (3.6); any other goes through Triton's launch
each time."""
_COMPILED: dict[tuple[object, ...], tuple[Any, Any, Any]] = {}
"""Compiled kernels' launchers by everything Triton specializes them on, and the device."""
_COMPILED_MAX = 4096
_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}
"""Per (device, stream): a float32 workspace, grown when a call needs more."""


def _stream_getter() -> Callable[[int], int]:
    """Triton's own reader of the current raw CUDA stream (torch's, under torch)."""
    return cast(Callable[[int], int], triton.runtime.driver.active.get_current_stream)


current_stream = _stream_getter()
"""``current_stream(device_index)``: the raw CUDA stream kernels are queued on now."""


def device_index(device: torch.device) -> int:
    """The index of CUDA ``device`` (the current device where it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def launching_on(index: int) -> contextlib.AbstractContextManager[object]:
    """A context in which CUDA device ``index`` is current (Triton launches on the current one).

    Nothing changes where it is current already, the usual case.
    """
    if index != torch.cuda.current_device():
        return cast(contextlib.AbstractContextManager[object], torch.cuda.device(index))
    return _SAME_DEVICE


_SAME_DEVICE = contextlib.nullcontext()
"""A context that changes nothing, for launches already on the current device."""


@functools.lru_cache(maxsize=64)
def multiprocessors(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked of the driver once)."""
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def workspace(index: int, stream: int, elements: int) -> torch.Tensor:
    """A float32 buffer of at least ``elements`` for kernels queued on ``stream``.

    Kernels on one stream run in order, so a call's workspace is free again for the next
    call on that stream (of either kernel family) once its kernels are queued; a call that
    needs more replaces the buffer (the caching allocator recycles the old one in the same
    stream order).

    Args:
        index: the CUDA device.
        stream: the raw stream the kernels are queued on.
        elements: float32 elements needed.

    Returns:
        A 1-D float32 tensor of at least ``elements`` on device ``index``.
    """
    key = (index, stream)
    found = _WORKSPACES.get(key)
    if found is None or found.numel() < elements:
        found = torch.empty(elements, dtype=torch.float32, device=torch.device("cuda", index))
        _WORKSPACES[key] = found
    return found


class KernelLaunch:
    """One kernel's launch with everything fixed but the addresses of its tensors.

    The first call for a pattern of the tensors' 16-byte alignment (which Triton specializes
    pointers on) launches through Triton (``kernel[grid](...)``), which compiles or finds
    the kernel; later calls, on Triton 3.6 (:data:`DIRECT_LAUNCH`), call that compiled
    kernel's launcher with the same arguments, the tensors as their data pointers, and no
    launch hooks (a profiler hooked into Triton's launches sees the first launch only). The
    compiled launchers are kept process-wide by everything Triton specializes on and more
    (kernel, device, options, constexprs, the scalars' values themselves, the tensors' dtypes
    and alignment), at most :data:`_COMPILED_MAX`, so a new ``KernelLaunch`` of a known
    specialization launches directly at once; a ``KernelLaunch`` kept across calls (a
    decode step's layers repeat one) also skips building and hashing that key.

    The compiled kernel's launcher and its argument order are Triton's internals: any other
    Triton version takes Triton's own launch path on every call.
    """

    __slots__ = ("_constexpr_names", "_grid", "_handles", "_kernel", "_static", "constexprs",
                 "options", "scalars")  # fmt: skip

    def __init__(
        self,
        kernel: Any,
        constexpr_names: tuple[str, ...],
        grid: Sequence[int],
        index: int,
        dtypes: tuple[torch.dtype, ...],
        scalars: tuple[int | float, ...],
        constexprs: tuple[object, ...],
        options: tuple[int, int],
    ) -> None:
        """Fix a launch.

        Args:
            kernel: the ``triton.jit`` function, whose arguments are the tensors, then the
                scalars, then the constexprs, in that order.
            constexpr_names: its constexpr parameters' names, in the kernel's order.
            grid: programs along up to three axes.
            index: the CUDA device the kernel runs on.
            dtypes: the dtypes of the tensors every call passes, in order.
            scalars: the int and float arguments.
            constexprs: the constexpr arguments, in the kernel's order.
            options: ``(num_warps, num_stages)``.
        """
        self._kernel = kernel
        self._constexpr_names = constexpr_names
        self._grid = (*grid, *(1,) * (3 - len(grid)))
        self.scalars = scalars
        self.constexprs = constexprs
        self.options = options
        # the kernel by identity: the kernels are module globals, never collected
        self._static = (id(kernel), index, options, constexprs, scalars, dtypes)
        self._handles: dict[tuple[bool, ...], tuple[Any, Any, Any]] = {}

    def __call__(self, stream: int, tensors: Sequence[torch.Tensor]) -> None:
        """Queue the kernel on ``stream`` (the current device must be the launch's).

        Args:
            stream: the raw CUDA stream (:data:`current_stream`).
            tensors: the pointer arguments, of the dtypes given at construction.
        """
        pointers = [t.data_ptr() for t in tensors]
        aligned = tuple([p % 16 == 0 for p in pointers])
        found = self._handles.get(aligned)
        if found is None:
            key = (*self._static, aligned)
            found = _COMPILED.get(key)
            if found is None or not DIRECT_LAUNCH:
                self._first(key, tensors)
                return
            self._handles[aligned] = found
        run, function, metadata = found
        # the pointers as ints: the launcher takes them as they are (a tensor it would ask for
        # its data_ptr and have the driver confirm it is a device pointer, per argument)
        gx, gy, gz = self._grid
        run(gx, gy, gz, stream, function, metadata, None, None, None,
            *pointers, *self.scalars, *self.constexprs)  # fmt: skip

    def _first(self, key: tuple[object, ...], tensors: Sequence[torch.Tensor]) -> None:
        """Launch through Triton, and keep the compiled kernel's launcher under ``key``."""
        compiled = self._kernel[self._grid](
            *tensors,
            *self.scalars,
            **dict(zip(self._constexpr_names, self.constexprs, strict=True)),
            num_warps=self.options[0],
            num_stages=self.options[1],
        )
        launcher = (compiled.run, compiled.function, compiled.packed_metadata)
        put_bounded(_COMPILED, key, launcher, _COMPILED_MAX)
