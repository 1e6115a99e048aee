"""Launch plans: recording what the Triton launchers do, so that C++ can do it again.

The eager Triton step (``mitkernels_C::triton_loss_step_``, ``csrc/loss_step.cpp``) calls
``loss_forward_`` and ``loss_backward`` of ``mit_loss.py`` through the dispatcher. With
``MITKERNELS_TRITON_LAUNCH=cpp`` the first call with a given signature (dtypes, sizes, strides,
input alignment, scalar arguments, device: ``csrc/triton_plans.cpp``'s key) is recorded here:
every buffer the launchers allocate (``empty``, ``zeros``, ``empty_like`` below) and every
kernel launch (``launch``), with each kernel parameter traced to where its value came from (an
input, a buffer plus a byte offset, or a literal). Later calls with that signature replay the
plan in C++: the same allocations and launches, with the new tensors' pointers, and no Python
(no JIT binder, no launcher argument parsing, no GIL on the autograd engine's thread).

A launch is planned only when it can be launched exactly as Triton would: one CTA a cluster, no
cooperative grid, no programmatic dependent launch, no scratch memory, and parameters that match
the compiled kernel's PTX entry one for one (pointers, 32/64-bit integers, floats; then the
scratch pointers Triton appends, passed as null as Triton passes them when their size is 0).
Anything else keeps that signature on the Python launchers, silently: ``info()`` counts the
plans, their replays (``hits``) and the refusals, and gives the last refusal's reason. So does
a replay whose first launch the driver refuses (that call runs the Python launchers: none of
its kernels had run); a refusal after the first launch fails the call, as a kernel before it
may have updated the state.
A replay skips Triton's launch hooks (``triton.knobs.runtime.launch_enter_hook``, profilers).

A replay allocates each output of the op on its own, as the launchers do, and the scratch
buffers as views of one block (one allocator call; the zeroed buffers first, one memset): an
output sharing a block would keep all of it alive (``tau.grad``, one number, held the logits'
gradient; a kept loss held the row statistics).

Plans suit a training loop's few fixed shapes: each new signature costs one Python call plus
its recording, and the store keeps at most 4096 (later ones stay on Python).
"""
from __future__ import annotations

import functools
import inspect
import re
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mitkernels import _backends

# csrc/triton_plans.cpp's ParamKind, in order.
PARAM_KINDS = ("input", "buffer", "i32", "i64", "f32", "f64", "null")
_INPUT, _BUFFER, _I32, _I64, _F32, _F64, _NULL = range(len(PARAM_KINDS))
# Triton's scalar parameter types -> kind, and the PTX parameter types each compiles to.
_SCALARS = {"i32": _I32, "i64": _I64, "u64": _I64, "fp32": _F32, "fp64": _F64}
_PTX_TYPES = {_INPUT: ("u64",), _BUFFER: ("u64",), _I32: ("u32", "s32", "b32"),
              _I64: ("u64", "s64", "b64"), _F32: ("f32",), _F64: ("f64",), _NULL: ("u64",)}
# Above it Triton's launcher adds a launch attribute (oversized shared memory) cuLaunchKernel
# lacks. Below it any size works: above 48 KB the function's dynamic-shared attribute, which
# Triton's loader sets when it loads the kernel (Triton 3.6 and 3.9), is what a launch needs.
_MAX_SHARED = 228 * 1024

# Interpreted launches (TRITON_INTERPRET=1) compile nothing: tests set this to a function
# (kernel, args, kwargs) -> an object like triton's CompiledKernel (src, metadata, asm,
# function), to record plans of CPU tensors for the C++ test launcher.
compiled_for: Optional[Callable] = None


class Unplannable(Exception):
    """A launch or buffer that a plan cannot reproduce."""


class Recorder:
    """What one op call allocates and launches, until ``plan`` turns it into a plan."""

    def __init__(self, inputs: Sequence[Tensor]):
        self.inputs = list(inputs)
        self.buffers: List[Tuple[Tensor, bool]] = []
        self.launches: list = []
        self.compiled: list = []  # kept alive with the plan: Triton 3.9 unloads collected ones
        self.problem: Optional[str] = None

    def buffer(self, t: Tensor, zero: bool) -> None:
        self.buffers.append((t, zero))

    def launch(self, kernel, grid, args, kwargs, compiled) -> None:
        if self.problem is not None:
            return
        try:
            if compiled is None and compiled_for is not None:
                compiled = compiled_for(kernel, args, kwargs)
            self.launches.append(self._launch(kernel, grid, args, kwargs, compiled))
            self.compiled.append(compiled)
        except Exception as err:  # noqa: BLE001 - whatever it is, this call is not planned
            self.problem = f"{kernel.fn.__name__}: {err}"

    def _pointer(self, value) -> tuple:
        if not isinstance(value, Tensor):
            raise Unplannable(f"a pointer parameter got {type(value).__name__}")
        # Inputs are matched by identity, the first match: the key holds which inputs share a
        # pointer, so a replay gives that parameter the same pointer.
        for i, t in enumerate(self.inputs):
            if value is t:
                return (_INPUT, i, 0, 0.0)
        storage = value.untyped_storage().data_ptr()
        for j, (b, _) in enumerate(self.buffers):
            # a view of a buffer: same storage (below autograd, as C++ calls the launchers,
            # views do not record their base); empty storages all sit at 0
            if value is b or (storage != 0 and storage == b.untyped_storage().data_ptr()):
                offset = value.data_ptr() - b.data_ptr()
                if b.data_ptr() % 16 or not 0 <= offset < max(1, b.untyped_storage().nbytes()):
                    raise Unplannable("a buffer view the plan cannot place")
                return (_BUFFER, j, offset, 0.0)
        raise Unplannable("a tensor that is neither an input nor a buffer of the call")

    def _launch(self, kernel, grid, args, kwargs, compiled) -> tuple:
        if compiled is None:
            raise Unplannable("the launch returned no compiled kernel (interpreter)")
        md = compiled.metadata
        if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_pdl", False) or \
                getattr(md, "launch_cooperative_grid", False) or \
                getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0) \
                or md.shared > _MAX_SHARED:
            raise Unplannable("a launch that needs more than cuLaunchKernel")
        names = set(kernel.arg_names)
        # the Python function's own signature: a JITFunction's and an interpreted one's alike
        bound = inspect.signature(kernel.fn).bind(
            *args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        types = compiled.src.signature
        params = []
        for name, value in bound.arguments.items():
            ty = types[name] if isinstance(types, dict) else None
            if ty is None:
                raise Unplannable(f"no type for parameter {name}")
            if ty == "constexpr":
                continue
            if ty.startswith("*"):
                try:
                    params.append(self._pointer(value))
                except Unplannable as err:
                    raise Unplannable(f"{name}: {err}") from None
            elif ty in _SCALARS:
                kind = _SCALARS[ty]
                params.append((kind, 0, int(value), 0.0) if kind in (_I32, _I64)
                              else (kind, 0, 0, float(value)))
            else:
                raise Unplannable(f"parameter {name} of type {ty}")
        ptx = _ptx_params_of(compiled)
        # Triton appends its scratch pointers (global, then profile: two in Triton 3.6 and 3.9).
        extra = len(ptx) - len(params)
        if not 0 <= extra <= 2 or any(t != "u64" for t in ptx[len(params):]):
            raise Unplannable(f"{len(params)} arguments against {len(ptx)} PTX parameters")
        params += [(_NULL, 0, 0, 0.0)] * extra
        for p, t in zip(params, ptx):
            if t not in _PTX_TYPES[p[0]]:
                raise Unplannable(f"a {PARAM_KINDS[p[0]]} parameter compiled as .{t}")
        dims = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        return (int(compiled.function), list(dims), 32 * md.num_warps, int(md.shared), params)

    def plan(self, outputs: Sequence[Tensor]) -> tuple:
        if self.problem is not None:
            raise Unplannable(self.problem)
        device = self.inputs[0].device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            # Triton loaded the kernels into the current device's context; a replay launches
            # them on the logits' device
            raise Unplannable(f"logits on {device}, current device cuda:"
                              f"{torch.cuda.current_device()}")
        outs = []
        for out in outputs:
            idx = [j for j, (b, _) in enumerate(self.buffers) if out is b]
            if not idx:
                raise Unplannable("an output that is not a buffer of the call")
            outs.append(idx[0])
        buffers = [(list(b.shape), list(b.stride()), str(b.dtype).rpartition(".")[2], zero)
                   for b, zero in self.buffers]
        return len(self.inputs), buffers, self.launches, outs


_PTX_PARAMS: dict = {}


def _ptx_params_of(compiled) -> List[str]:
    # Read once a compiled kernel (a regex over its whole PTX): a new shape records new plans
    # with kernels compiled before.
    key = (compiled.metadata.name, getattr(compiled.metadata, "hash", None))
    if key[1] is None:
        return ptx_params(compiled.asm["ptx"], compiled.metadata.name)
    if key not in _PTX_PARAMS:
        _PTX_PARAMS[key] = ptx_params(compiled.asm["ptx"], compiled.metadata.name)
    return _PTX_PARAMS[key]


def ptx_params(ptx: str, name: str) -> List[str]:
    """The PTX types (``u64``, ``u32``, ``f64``, ..) of kernel ``name``'s parameters, in order."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise Unplannable(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


_state = threading.local()
# The compiled kernels of stored plans: their CUfunction handles stay loaded while plans exist
# (a process keeps its plans to the end, or until clear(), which keeps these too).
_KEPT: list = []


def active() -> Optional[Recorder]:
    """The recorder of this thread's op call, when C++ asked for a plan of it."""
    return getattr(_state, "recorder", None)


@functools.lru_cache(maxsize=None)
def _ext():
    ext = _backends.extension()
    return None if isinstance(ext, ImportError) or not hasattr(ext, "_triton_plan_pending") else ext


def recordable(inputs_of: Callable[..., Sequence[Tensor]]):
    """Decorates a launcher op: when C++ asked (``_triton_plan_pending``), its call is recorded
    and the plan stored under the key C++ made; ``inputs_of(*args)`` lists the op's tensor
    inputs in C++'s order (csrc/loss_step.cpp)."""
    def wrap(fn):
        @functools.wraps(fn)
        def op(*args):
            ext = _ext()
            if ext is None or not ext._triton_plan_pending():
                return fn(*args)
            rec = Recorder(inputs_of(*args))
            _state.recorder = rec
            try:
                out = fn(*args)
            finally:
                _state.recorder = None
            try:
                ext._triton_plan_store(*rec.plan(out))
                _KEPT.extend(rec.compiled)
            except Exception as err:  # noqa: BLE001
                # Unplannable, the store's ValueError for a malformed plan, or a surprise: the
                # call's own result stands (its launches ran, the state is updated), and the
                # signature stays on the Python launchers.
                ext._triton_plan_refuse(f"{type(err).__name__}: {err}")
            return out
        return op
    return wrap


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, recorded when a plan is being made."""
    compiled = kernel[grid](*args, **kwargs)
    rec = active()
    if rec is not None:
        rec.launch(kernel, grid, args, kwargs, compiled)


def _buffer(t: Tensor, zero: bool) -> Tensor:
    rec = active()
    if rec is not None:
        rec.buffer(t, zero)
    return t


def empty(shape, dtype: torch.dtype, device) -> Tensor:
    """``torch.empty``, a buffer of the plan being made."""
    return _buffer(torch.empty(shape, dtype=dtype, device=device), False)


def zeros(shape, dtype: torch.dtype, device) -> Tensor:
    """``torch.zeros``, a buffer the plan zeroes."""
    return _buffer(torch.zeros(shape, dtype=dtype, device=device), True)


def empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like`` (its strides are recorded: a dense ``x``'s layout)."""
    return _buffer(torch.empty_like(x), False)


def info() -> dict:
    """The plan store's counts (plans, hits, recorded, refused, last_refusal); {} without it."""
    ext = _ext()
    return dict(ext._triton_plan_info()) if ext is not None else {}


def summary(since: Optional[dict] = None) -> str:
    """Whether plans served the calls since ``since`` (an earlier ``info()``; default: since the
    last ``clear``), for a benchmark row run under plans: replays, refusals, the last reason."""
    now, since = info(), since or {}
    hits = now.get("hits", 0) - since.get("hits", 0)
    refused = now.get("refused", 0) - since.get("refused", 0)
    why = f" ({now.get('last_refusal', '')[:80]})" if refused else ""
    return f"plans: {hits} replays, {refused} refused{why}"


def clear() -> None:
    """Forget every plan. A plan holds what the launchers chose when it was recorded: after a
    change to what they read at call time (``mit_loss.py``'s tile tables, ``spatial_config``,
    the program caps), plans recorded before would replay the old choice. (The benchmarks'
    sweeps change them but call the launchers directly, never through plans.)"""
    ext = _ext()
    if ext is not None:
        ext._triton_plan_clear()


__all__ = ["PARAM_KINDS", "Recorder", "Unplannable", "active", "clear", "compiled_for", "empty",
           "empty_like", "info", "launch", "ptx_params", "recordable", "summary", "zeros"]
