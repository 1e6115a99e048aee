"""Which kernel backend serves a call: availability, the automatic choice, and clear errors.

A backend is a module-like object with the four kernel functions of the op contract in
``mitkernels/ops.py`` (``row_stats``, ``finalize_``, ``loss_forward_``, ``loss_backward``):
``cpu`` and ``cuda`` are the compiled extension's ops, ``triton`` the launchers in
``mitkernels/triton``. The eager ``reference`` backend bypasses the ops (see ``functional.py``).
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import List, Optional

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
_KERNEL_BACKENDS = ("cpu", "cuda", "triton")
# The Triton kernels index rows (N x d1 x ..) with 32-bit integers (element offsets are 64-bit:
# a batch may hold more than 2^31 logits, not 2^31 rows); the C++ kernels index them in 64 bits.
# The margin below 2^31 keeps the kernels' other 32-bit row arithmetic from overflowing too: a
# tile count (R + BLOCK_R - 1) // BLOCK_R, a loop counter stepping past the last row by a block
# or by the grid (at most a few thousand programs). Without it a batch of 2^31 - 100 rows made
# the tile count negative: no row was read, and the spatial backward wrote before its buffer.
TRITON_MAX_ROWS = 2**31 - 2**16


class BackendUnavailableError(RuntimeError, ValueError):
    """A backend was asked for by name and cannot run here (or no backend has that name). A
    ValueError too: the name is an argument, and a module's other options raise ValueError."""


class _CompiledBackend:
    """The C++ (CPU) or C++/CUDA kernels, registered by the extension under ``mitkernels_C``."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, op: str):
        return getattr(torch.ops.mitkernels_C, op)


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module, or the ImportError explaining why it is not there."""
    try:
        from . import _C  # noqa: F401  (loading it registers the mitkernels_C ops)
    except ImportError as err:
        built = list(Path(__file__).parent.glob("_C*.so")) + list(Path(__file__).parent.glob("_C*.pyd"))
        if built:  # a build exists but does not load: stale against this torch, say so once
            warnings.warn(f"mitkernels._C exists ({built[0].name}) but does not load: {err}. "
                          "Rebuild it with `pip install --no-build-isolation -e .`; until then "
                          "the eager reference serves CPU calls.", RuntimeWarning, stacklevel=2)
        return err
    return _C


def _extension_problem() -> Optional[str]:
    ext = extension()
    if isinstance(ext, ImportError):
        return (
            f"the compiled extension mitkernels._C is missing or stale ({ext}); rebuild it with "
            "`pip install --no-build-isolation -e .` (or `make build`)"
        )
    return None


@functools.lru_cache(maxsize=None)
def triton_module():
    """The Triton launchers (mitkernels.triton.mit_loss), or the ImportError of Triton."""
    try:
        from .triton import mit_loss as triton_mit_loss
    except ImportError as err:
        return err
    return triton_mit_loss


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else why not (one sentence)."""
    # Only Triton's answer depends on TRITON_INTERPRET: the others skip the environment read.
    return _unavailable_reason(name, device.type, name == "triton" and triton_interpret())


@functools.lru_cache(maxsize=None)
def _unavailable_reason(name: str, device_type: str, interpret: bool) -> Optional[str]:
    # Cached: a tiny batch's whole step costs tens of microseconds, this must not add to it.
    device = torch.device(device_type)
    if name not in BACKENDS:
        return _unknown(name)
    if name == "reference":
        return None
    if name == "triton":
        mod = triton_module()
        if isinstance(mod, ImportError):
            return f"Triton is not importable ({mod})"
        if device.type == "cuda" or (device.type == "cpu" and interpret):
            return None
        return f"Triton runs on CUDA tensors (on {device.type} tensors only with TRITON_INTERPRET=1)"
    problem = _extension_problem()
    if problem:
        return problem
    info = extension().build_info()
    if name == "cpu":
        return None if device.type == "cpu" else f"the cpu backend needs CPU tensors, got {device.type}"
    if not info.get("cuda", False):
        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        return "the extension was built without CUDA kernels (set MITKERNELS_BUILD_CUDA=1 and rebuild)"
    return None if device.type == "cuda" else f"the cuda backend needs CUDA tensors, got {device.type}"


def available(device: Optional[torch.device] = None) -> List[str]:
    """Kernel backends (not the reference) that can run on ``device`` (default: CPU and CUDA)."""
    devices = [device] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in _KERNEL_BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]


@torch.compiler.assume_constant_result
def choose(requested: Optional[str], device: torch.device) -> str:
    """The backend name for a call: the requested one (or MITKERNELS_BACKEND), else the fastest.

    Evaluated once when torch.compile traces a call (the answer depends on what is installed,
    not on tensor values), so a compiled graph holds no backend logic.
    """
    name = requested if requested is not None else os.environ.get("MITKERNELS_BACKEND") or None
    if name is not None:  # "" is no backend's name, not a request for the automatic choice
        reason = unavailable_reason(name, device)
        if reason:
            source = "" if requested is not None else " (set by MITKERNELS_BACKEND)"
            raise BackendUnavailableError(f"backend {name!r}{source} is not available: {reason}")
        return name
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for candidate in order:
        if unavailable_reason(candidate, device) is None:
            return candidate
    return "reference"


def _unknown(name) -> str:
    return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (or None, automatic)"


def check_name(backend: Optional[str]) -> None:
    """A backend named when a module is built: ``None`` (the automatic choice) or one of
    ``BACKENDS``, so that a misspelt name fails there, as a call would, not at the first step."""
    if backend is not None and backend not in BACKENDS:
        raise BackendUnavailableError(_unknown(backend))


def choose_for_rows(requested: Optional[str], device: torch.device, rows, classes=1) -> str:
    """``choose``, and for a batch of more rows (``N x d1 x ..``) or classes than the Triton
    kernels index (``TRITON_MAX_ROWS``) the ``cuda`` backend in place of an automatic
    ``triton``: its kernels index both in 64 bits. A backend asked for by name is kept (Triton's
    launchers then refuse the batch, naming the way out). Under torch.compile the row and class
    counts are guards at most."""
    name = choose(requested, device)
    if name == "triton" and max(rows, classes) > TRITON_MAX_ROWS and \
            _cuda_takes_over(requested, device):
        return "cuda"
    return name


@torch.compiler.assume_constant_result
def _cuda_takes_over(requested: Optional[str], device: torch.device) -> bool:
    # Whether the automatic choice may switch to cuda: constant for a compiled graph, like
    # choose (its environment read and the extension's build_info do not trace).
    return not (requested or os.environ.get("MITKERNELS_BACKEND")) and \
        unavailable_reason("cuda", device) is None


def get(name: str, device: torch.device):
    """The kernel functions of backend ``name`` ('auto' picks one for ``device``)."""
    return _get(name, device.type, triton_interpret())


@functools.lru_cache(maxsize=None)
def _get(name: str, device_type: str, interpret: bool):
    device = torch.device(device_type)
    if name == "auto":
        name = choose(None, device)
    reason = unavailable_reason(name, device)
    if reason or name == "reference":
        raise BackendUnavailableError(
            f"backend {name!r} has no kernels for {device.type} tensors: {reason or 'it is eager'}")
    if name == "triton":
        return triton_module()
    return _CompiledBackend(name)
