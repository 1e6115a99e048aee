"""Benchmark of the MiT loss step: every implementation side by side, in one process.

``python -m benchmarks.bench_mit_loss --quick`` (``make bench``, the default) or ``--full``.

Providers, timed on the same tensors:

* ``eager``     ``mitkernels.reference.mit_step``: the published step in eager PyTorch, state update
                included (a persistent ``MiTState``).
* ``compiled``  ``torch.compile(dynamic=False)`` of that step, one compiled callable per shape,
                dtype and mode, warmed up before timing (its compile time is reported).
* ``cpu`` / ``cuda`` / ``triton``  ``mitkernels.mit_loss(..., backend=name)`` for every kernel
                backend ``mitkernels._backends.available(device)`` lists.
* ``triton_plans``  the ``triton`` step through launch plans (``MITKERNELS_TRITON_LAUNCH=cpp``),
                on CUDA when the extension has its CUDA part.
* ``torch_ce``  ``F.cross_entropy``: a plain cross-entropy anchor (no temperature, no entropy).
* ``liger_ce``  Liger-Kernel's ``LigerCrossEntropyLoss`` when it is importable (CUDA only).
* ``copy``      ``out.copy_(x)`` of the logits (1 read + 1 write): the machine's bandwidth. The loss
                roofline is 1.5 copy times for ``fwdbwd`` (2 reads + 1 write of the logits, the
                traffic of docs/KERNEL_MATH.md s.5) and 0.5 copy times for ``fwd`` (1 read).

Shapes are ``NxC`` or, for segmentation, ``NxCxHxW..``: logits ``[N, C, H, W, ..]`` laid out as
NCHW, targets ``[N, H, W, ..]``.

Modes: ``fwd`` (forward with state update, no grad) and ``fwdbwd`` (forward with state update and
backward to the logits and ``tau``: a training step of the loss).

The providers of a case take turns at being timed, in rounds (``--rounds``), so that a burst of
load falls on all of them. Each row: median and 20%/80% quantiles, achieved GB/s (bytes = 1
read of the logits for fwd, 2 reads + 1 write for fwdbwd), fraction of the measured roofline,
speed-up vs eager and vs compiled, the peak of extra live bytes during one step (CUDA:
``max_memory_allocated`` delta; CPU: allocation events of ``torch.profiler`` with
``profile_memory=True``, beyond the inputs and state that exist before the step, outputs and
gradients included), and the relative error
against the eager step, both at the second step on a fresh state (loss, gradients, every state
buffer).

Outputs under ``benchmarks/results/`` (or ``--out-dir``): ``<kind>_<device>_<time>.csv`` (one row
per measurement, with device, versions, git commit and timestamps), a PNG beside it, and
``latest_<kind>.csv`` / ``latest_<kind>.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Every provider allocates with transparent huge pages, as mitkernels' cpu gradient does (it
# asks for them with madvise): on 4 KB pages, the baselines' page faults on their fresh
# temporaries cost more than their arithmetic at large shapes (compiled 299 against 133 ms at
# 4096 x 32000 on the 2-core VM, README's CSVs), and would be measured as mitkernels' speed-up.
# THP_MEM_ALLOC_ENABLE=0 in the environment measures torch's default allocator instead. Torch
# reads it at its first allocation, so only before torch is imported (the CSV says which).
THP_ALLOC = os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1") if "torch" not in sys.modules \
    else os.environ.get("THP_MEM_ALLOC_ENABLE", "0") + "?"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mitkernels
from mitkernels import _backends, reference
from mitkernels.state import MiTState

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwdbwd")
# Traffic of the logits, in units of the logits' size: fwd reads once; fwdbwd reads twice, writes once.
TRAFFIC = {"fwd": 1.0, "fwdbwd": 3.0}
# The copy moves 2 units (1 read + 1 write): the roofline time of a mode is TRAFFIC / 2 copy times.
# A row whose p80 is this many times its p20 is flagged: a burst of load during it.
NOISY_SPREAD = 1.5
# A CPU call shorter than this is warmed up for a while before its repeats are sized.
CHEAP_CALL_S = 0.02
# The providers of a case take turns at being timed, in this many rounds (--rounds).
ROUNDS = 5
# CUDA logits larger than this are timed one provider after another, each step freed before the
# next is made: the caching allocator would otherwise hold every provider's blocks at once.
INTERLEAVE_MAX_BYTES = 2**30
ERROR_TOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Shape:
    family: str  # medical | mid | large | segmentation
    n: int
    c: int
    dtypes: Optional[Tuple[str, ...]] = None  # None: every dtype of the sweep
    spatial: Tuple[int, ...] = ()  # d1, d2, ..: logits [N, C, d1, ..] (NCHW), targets [N, d1, ..]

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in (self.n, self.c, *self.spatial))

    @property
    def numel(self) -> int:
        return self.n * self.c * math.prod(self.spatial)

    @property
    def spatial_text(self) -> str:  # the CSV's spatial column: "128x128", or "" for [N, C]
        return "x".join(str(d) for d in self.spatial)


# CPU quick mode keeps the large shape at 1024 x 32000: the eager step at 4096 x 32000 takes
# seconds a call on two cores, and --quick must finish within minutes, compiles included.
SWEEPS = {
    ("cpu", "quick"): ([Shape("medical", 256, 5), Shape("mid", 1024, 1000),
                        Shape("large", 1024, 32000),
                        Shape("segmentation", 8, 5, spatial=(128, 128))], ("fp32",)),
    ("cpu", "full"): ([Shape("medical", 32, 2), Shape("medical", 128, 3), Shape("medical", 256, 5),
                       Shape("medical", 1024, 7), Shape("mid", 1024, 1000),
                       Shape("large", 4096, 32000),
                       Shape("segmentation", 8, 5, spatial=(128, 128))], ("fp32", "bf16")),
    ("cuda", "quick"): ([Shape("medical", 256, 5), Shape("mid", 1024, 1000),
                         Shape("large", 4096, 32000), Shape("large", 16384, 131072, ("bf16",)),
                         Shape("segmentation", 16, 5, spatial=(256, 256))],
                        ("fp32", "bf16")),
    ("cuda", "full"): ([Shape("medical", 32, 2), Shape("medical", 256, 5), Shape("medical", 1024, 7),
                        Shape("mid", 1024, 1000), Shape("large", 4096, 32000),
                        Shape("large", 8192, 65536), Shape("large", 16384, 131072, ("bf16",)),
                        Shape("segmentation", 16, 5, spatial=(256, 256))],
                       ("fp32", "bf16")),
}

CSV_FIELDS = [
    "run_id", "timestamp", "device_kind", "device_name", "torch", "triton", "python", "git_commit",
    "build", "thp_alloc", "threads", "load_avg", "family", "n", "c", "spatial", "dtype", "mode",
    "provider", "status", "median_ms", "p20_ms", "p80_ms", "repeats", "rounds", "bytes", "gbps",
    "roofline_ms", "roofline_frac", "speedup_vs_eager", "speedup_vs_compiled", "peak_extra_mb",
    "max_rel_err", "compile_s", "note",
]


class Skip(Exception):
    """A provider that cannot run for this case (not an error of the provider)."""


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - any import problem means "not there"
        return ""


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        # untracked files too (a new source is a change), but not the results folder this
        # writes to, nor ignored build outputs (the build column names the extension)
        dirty = bool(subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", ".",
             ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip())
        return sha + ("-dirty" if dirty and sha else "")
    except Exception:  # noqa: BLE001 - a tarball without git
        return ""


def build_summary() -> str:
    """The extension that ran: its CPU kernel set and CUDA architectures (the git commit does
    not say which build of an ignored .so was loaded)."""
    try:
        import mitkernels

        info = mitkernels.build_info()
    except Exception as err:  # noqa: BLE001
        return f"unavailable ({type(err).__name__})"
    parts = [f"cpu:{info.get('cpu_kernels', '-') if info.get('cpu') else '-'}"]
    if info.get("cuda"):
        parts.append("cuda:" + "+".join(str(a) for a in info.get("cuda_archs", [])))
    return " ".join(parts)


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always / madvise / never), as set."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        m = re.search(r"\[(\w+)\]", text)
        return m.group(1) if m else "?"
    except OSError:
        return "?"


def load_average() -> Optional[float]:
    """The 1-minute load average: CPU timings taken under load are not the machine's."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def slug(text: str) -> str:
    text = re.sub(r"\(.*?\)", "", text).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:limit]


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: Optional[int]

    @staticmethod
    def of(ms: Sequence[float]) -> "Timing":
        return Timing(quantile(ms, 0.5), quantile(ms, 0.2), quantile(ms, 0.8), len(ms))


# The timed calls of a step come in chunks, so that the providers of a case can take turns
# (time_group): estimate a call's length once, then any number of chunks.
def cpu_estimate(fn: Callable, target_s: float, warm_call_s: Optional[float] = None) -> float:
    """Seconds a call, after a warmup. ``warm_call_s``: the length of a warm call just made;
    slow calls then skip the warmup call (a step of seconds needs no more warming, and the sweep
    its time)."""
    if warm_call_s is not None and warm_call_s >= 0.05:
        return warm_call_s
    start = time.perf_counter()
    fn()
    estimate = time.perf_counter() - start
    if estimate < CHEAP_CALL_S:  # cheap calls: warm caches and the thread pool for a while
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < min(0.1, target_s / 4) and calls < 2000:
            fn()
            calls += 1
        estimate = (time.perf_counter() - start) / max(calls, 1)
    return estimate


def cpu_chunk(fn: Callable, reps: int) -> List[float]:
    """perf_counter around each of ``reps`` calls, in ms, after one untimed call: after another
    provider's turn this one's code, data and allocator blocks are not where its steady state
    keeps them, and that first call would time the difference."""
    fn()
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def cuda_estimate(fn: Callable) -> float:
    """Seconds a call (host and device), after three warm calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return max(time.perf_counter() - t0, 1e-6)


def cuda_chunk(fn: Callable, reps: int, flush: torch.Tensor) -> List[float]:
    """CUDA events around each call, L2 flushed between calls, and the host synchronized after
    the flush: triton.testing.do_bench (used before) records its start event while the flush
    still runs, so a call's host time up to the flush's length (about 60-90 us, estimated: 256 MB
    zeroed at 3-4 TB/s) went uncounted, in the host-bound rows most of all. One untimed call
    first, as ``cpu_chunk`` makes."""
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for begin, end in events:
        flush.zero_()
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [b.elapsed_time(e) for b, e in events]


def cuda_flush_buffer(device="cuda") -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.int8, device=device)


def cuda_repeats(fn: Callable, rep_ms: int) -> int:
    """Calls to make of ``fn`` for about ``rep_ms`` of them, 5 to 1000."""
    return int(min(max(rep_ms * 1e-3 / cuda_estimate(fn), 5), 1000))


def time_cuda(fn: Callable, rep_ms: int) -> Timing:
    """One step timed alone: repeats sized to ``rep_ms`` of calls."""
    flush = cuda_flush_buffer()
    return Timing.of(cuda_chunk(fn, cuda_repeats(fn, rep_ms), flush))


@contextlib.contextmanager
def gc_paused():
    """A collection inside a timed call is noise, not the kernel."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2: keep the table readable."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_extra_bytes(fn: Callable) -> Optional[int]:
    """Peak of live bytes allocated during one call, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    try:
        events = prof.profiler.kineto_results.events()
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except Exception:  # noqa: BLE001 - private API moved: fall back on the public event list
        allocs = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events()
                        if e.name == "[memory]")
    live = peak = 0
    for _, nbytes in allocs:
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_extra_bytes(fn: Callable, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


# --------------------------------------------------------------------------------------------
# Providers: each builds a step function on given tensors and state
# --------------------------------------------------------------------------------------------
def _compiled_target(x, y, state):
    # The state goes in as the object holding it, the way a training step sees its criterion.
    # (Passed as direct arguments, torch 2.13's compile drops the in-place update of the 0-dim
    # float64 buffers lambda_entropy and total_seen: see benchmarks/README.md.)
    loss, _ = reference.mit_step(x, y, state.tau, state.class_counts, state.total_seen,
                                 state.lambda_entropy, state.dual_updates)
    return loss


def _own_code_copy(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo caches per code object, so each shape
    gets its own cache entry instead of piling recompiles onto one function."""
    name = f"{fn.__name__}_{re.sub(r'[^0-9a-zA-Z_]', '_', tag)}"
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name)


def configure_dynamo() -> None:
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                        ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(cfg, name):
            try:
                setattr(cfg, name, max(int(getattr(cfg, name)), value))
            except Exception:  # noqa: BLE001 - an alias that refuses assignment
                pass


@dataclass
class Case:
    shape: Shape
    dtype_name: str
    mode: str
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def backward(self) -> bool:
        return self.mode == "fwdbwd"

    @property
    def key(self) -> str:
        return f"{self.shape.label}_{self.dtype_name}_{self.mode}"


def _grad_ctx(case: Case):
    return contextlib.nullcontext() if case.backward else torch.no_grad()


def _loss_step(case: Case, state: MiTState, loss_fn: Callable) -> Callable:
    """The step of a MiT provider: forward with state update (+ backward to logits and tau)."""
    x, y = case.x, case.y
    if case.backward:
        def step():
            loss = loss_fn(x, y, state)
            return (loss, *torch.autograd.grad(loss, (x, state.tau)))
    else:
        def step():
            with torch.no_grad():
                return (loss_fn(x, y, state),)
    return step


class Provider:
    name = ""
    is_mit = True  # computes the MiT step (checked against eager); anchors do not

    def make(self, case: Case, state: Optional[MiTState]) -> Callable:
        raise NotImplementedError


class EagerProvider(Provider):
    name = "eager"

    def make(self, case, state):
        return _loss_step(case, state, _compiled_target)


class CompiledProvider(Provider):
    name = "compiled"

    def __init__(self):
        self.cache: Dict[str, Callable] = {}
        self.failed: Dict[str, str] = {}

    def make(self, case, state):
        if case.key in self.failed:
            raise Skip(self.failed[case.key])
        if case.key not in self.cache:
            self.cache[case.key] = torch.compile(_own_code_copy(_compiled_target, case.key),
                                                 dynamic=False)
        return _loss_step(case, state, self.cache[case.key])


class KernelProvider(Provider):
    def __init__(self, backend: str):
        self.name = backend
        self.backend = backend

    def make(self, case, state):
        backend = self.backend

        def loss_fn(x, y, s):
            loss, _ = mitkernels.mit_loss(x, y, s, backend=backend)
            return loss

        return _loss_step(case, state, loss_fn)


class PlansProvider(KernelProvider):
    """The Triton backend through launch plans (``MITKERNELS_TRITON_LAUNCH=cpp``: its kernels
    launched from C++ once the first call has recorded them). The variable is set around each
    call (the step's forward reads it), which adds about 2 us of host time a step."""

    def __init__(self):
        super().__init__("triton")
        self.name = "triton_plans"

    def make(self, case, state):
        from mitkernels.triton import launch_plans

        inner = super().make(case, state)
        self.since = launch_plans.info()

        def step():
            old = os.environ.get("MITKERNELS_TRITON_LAUNCH")
            os.environ["MITKERNELS_TRITON_LAUNCH"] = "cpp"
            try:
                return inner()
            finally:
                if old is None:
                    del os.environ["MITKERNELS_TRITON_LAUNCH"]
                else:
                    os.environ["MITKERNELS_TRITON_LAUNCH"] = old

        return step

    def served(self) -> str:
        """Whether plans served the calls since the last ``make`` (a refused signature runs the
        Python launchers under this provider's name): the row's note."""
        from mitkernels.triton import launch_plans

        return launch_plans.summary(self.since)


class TorchCEProvider(Provider):
    name = "torch_ce"
    is_mit = False

    def make(self, case, state):
        x, y = case.x, case.y
        if case.backward:
            def step():
                loss = F.cross_entropy(x, y)
                return (loss, *torch.autograd.grad(loss, (x,)))
        else:
            def step():
                with torch.no_grad():
                    return (F.cross_entropy(x, y),)
        return step


def liger_cross_entropy():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # noqa: BLE001 - not installed, or installed without a usable Triton
        return None
    return LigerCrossEntropyLoss


class LigerCEProvider(Provider):
    name = "liger_ce"
    is_mit = False

    def __init__(self, cls):
        self.cls = cls

    def make(self, case, state):
        if case.device.type != "cuda":
            raise Skip("Liger-Kernel runs on CUDA")
        if case.x.dim() != 2:
            raise Skip("Liger's cross-entropy takes [N, C] logits")
        loss_mod = self.cls()
        # Liger writes the gradient into its input during the forward: give it its own copy.
        x = case.x.detach().clone().requires_grad_(case.backward)
        y = case.y
        if case.backward:
            def step():
                loss = loss_mod(x, y)
                return (loss, *torch.autograd.grad(loss, (x,)))
        else:
            def step():
                with torch.no_grad():
                    return (loss_mod(x, y),)
        return step


class CopyProvider(Provider):
    name = "copy"
    is_mit = False

    def make(self, case, state):
        src = case.x.detach()
        out = torch.empty_like(src)

        def step():
            return out.copy_(src)

        return step


# --------------------------------------------------------------------------------------------
# Checking against the eager step
# --------------------------------------------------------------------------------------------
def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in chunks (huge gradients must not double in memory)."""
    got = got.detach().reshape(-1)
    ref = ref.detach().reshape(-1)
    if got.numel() != ref.numel():
        return float("inf")
    worst, scale = 0.0, 0.0
    chunk = 1 << 24
    for i in range(0, max(ref.numel(), 1), chunk):
        # On the provider's device: a reference kept on the host travels a chunk at a time.
        g = got[i:i + chunk].double()
        r = ref[i:i + chunk].to(g.device).double()
        if r.numel() == 0:
            break
        diff = (g - r).abs()
        worst = max(worst, float(torch.nan_to_num(diff, nan=float("inf")).max()))
        scale = max(scale, float(r.abs().max()))
    return worst / max(scale, 1e-12)


def _snapshot(outputs, state: MiTState, device: torch.device, big: bool):
    """The eager step's results, kept on the CPU when they are large."""
    keep = (lambda t: t.detach().to("cpu")) if big and device.type == "cuda" else (
        lambda t: t.detach().clone())
    return [keep(t) for t in outputs] + [b.detach().clone() for b in state.buffers().values()]


def _compare(outputs, state: MiTState, ref) -> float:
    # every state buffer (counts, total seen, lambda, updates), not lambda alone
    got = list(outputs) + list(state.buffers().values())
    return max(_max_rel_err(g, r) for g, r in zip(got, ref))


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    device: torch.device
    sweep: str
    shapes: List[Shape]
    dtypes: Tuple[str, ...]
    modes: Tuple[str, ...]
    providers: List[Provider]
    target_s: float
    min_reps: int
    max_reps: int
    rep_ms: int
    measure_memory: bool
    budget_s: Optional[float]
    rounds: int = ROUNDS


def plan(cfg: Config) -> List[Tuple[Shape, str, str]]:
    groups = []
    for shape in cfg.shapes:
        for dtype_name in cfg.dtypes:
            if shape.dtypes is not None and dtype_name not in shape.dtypes:
                continue
            for mode in cfg.modes:
                groups.append((shape, dtype_name, mode))
    return groups


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    # Drawn on the device itself: gigabytes of logits must not be made on the host and copied.
    gen = torch.Generator(device=device).manual_seed(seed)
    # Logits with a spread like a trained classifier's (std 2), targets uniform over classes.
    x = torch.randn(shape.n, shape.c, *shape.spatial, generator=gen, device=device,
                    dtype=dtype).mul_(2.0)
    y = torch.randint(0, shape.c, (shape.n, *shape.spatial), generator=gen, device=device)
    return x, y


@dataclass
class Prepared:
    """A provider's step for a case, checked and warm, waiting for its timed calls."""
    provider: "Provider"
    row: dict
    step: Callable
    warm_call_s: float
    reps: int = 0
    turns: int = 0
    samples: List[float] = field(default_factory=list)


def _record_failure(row: dict, provider: "Provider", case: Case, err: BaseException) -> None:
    if isinstance(err, Skip):
        row.update(status="skipped", note=str(err))
    elif is_oom(err):
        row.update(status="oom", note=short(err, 80))
    elif provider.name == "compiled" and "compile_s" not in row:
        row.update(status="compile_failed", note=short(err))
        if isinstance(provider, CompiledProvider):
            provider.failed[case.key] = row["note"]
    else:
        row.update(status="error", note=short(err))


def prepare_provider(provider: Provider, case: Case, cfg: Config,
                     ref) -> Tuple[dict, object, Optional[Prepared]]:
    """Check (fresh state) and memory (one warm call) of one provider, and its step with a
    persistent state for the timed calls; no step where it failed (the row says why)."""
    row = {"provider": provider.name, "status": "ok", "note": ""}
    device = case.device
    new_ref = None
    needs_state = provider.is_mit
    try:
        # 1. Two calls on a fresh state: correctness of the second against eager's (lambda's
        # running average past its first step, every state buffer), and the compile, if any.
        state = MiTState(case.shape.c, device=device) if needs_state else None
        step = provider.make(case, state)
        t0 = time.perf_counter()
        outputs = step()
        synchronize(device)
        first_s = time.perf_counter() - t0
        if provider.name == "compiled":
            row["compile_s"] = first_s
        if provider.is_mit:
            del outputs
            outputs = step()
        if provider.name == "eager":
            big = case.x.numel() * case.x.element_size() > 2**30
            new_ref = _snapshot(outputs, state, device, big)
        elif provider.is_mit and ref is not None:
            row["max_rel_err"] = _compare(outputs, state, ref)
            if not row["max_rel_err"] <= ERROR_TOL[case.dtype]:
                row["note"] = "MISMATCH vs eager"
        del outputs, step
        # 2. A persistent state for the timed calls (a training run's state); memory of one call.
        state = MiTState(case.shape.c, device=device) if needs_state else None
        step = provider.make(case, state)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        warm_call_s = time.perf_counter() - t0
        if cfg.measure_memory:
            if device.type == "cuda":
                row["peak_extra_mb"] = cuda_peak_extra_bytes(step, device) / 2**20
            else:
                peak = cpu_peak_extra_bytes(step)
                row["peak_extra_mb"] = None if peak is None else peak / 2**20
        return row, new_ref, Prepared(provider, row, step, warm_call_s)
    except Exception as err:  # noqa: BLE001 - one failing provider must not end the sweep
        _record_failure(row, provider, case, err)
        free_memory(device)
        return row, new_ref, None


def time_group(prepared: List[Prepared], case: Case, cfg: Config) -> None:
    """Times the prepared steps of a case in ``cfg.rounds`` rounds: in each, every provider in
    turn makes a share of its calls, the order rotated from round to round. A burst of load or
    a change of clocks then falls on every provider alike, instead of on whichever was timed
    while it lasted, and the ratios between providers measured in one run stay fair."""
    cuda = case.device.type == "cuda"
    rounds = max(1, cfg.rounds)
    with gc_paused():
        flush = cuda_flush_buffer(case.device) if cuda else None
        live = []
        for p in prepared:
            try:
                if cuda:
                    p.reps = cuda_repeats(p.step, cfg.rep_ms)
                else:
                    estimate = cpu_estimate(p.step, cfg.target_s, p.warm_call_s)
                    reps = cfg.target_s / max(estimate, 1e-7)
                    p.reps = int(min(max(reps, cfg.min_reps), cfg.max_reps))
                live.append(p)
            except Exception as err:  # noqa: BLE001
                _record_failure(p.row, p.provider, case, err)
        for r in range(rounds):
            turn = r % len(live) if live else 0
            for p in live[turn:] + live[:turn]:
                if p.row["status"] != "ok":
                    continue
                # the repeats spread over the rounds, exactly (a 3-call step turns in 3 of 5)
                share = p.reps * (r + 1) // rounds - p.reps * r // rounds
                if share == 0:
                    continue
                p.turns += 1
                try:
                    p.samples += (cuda_chunk(p.step, share, flush) if cuda
                                  else cpu_chunk(p.step, share))
                except Exception as err:  # noqa: BLE001
                    _record_failure(p.row, p.provider, case, err)
    for p in live:
        row = p.row
        if row["status"] != "ok":
            continue
        timing = Timing.of(p.samples)
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                   repeats=timing.repeats, rounds=p.turns if len(prepared) > 1 else 1)
        if timing.p80_ms > NOISY_SPREAD * timing.p20_ms:
            # a burst of load during this provider's calls moves every ratio built from it
            row["note"] = (row["note"] + f" noisy: p80/p20 = "
                           f"{timing.p80_ms / timing.p20_ms:.2f}, rerun").strip()
        if isinstance(p.provider, PlansProvider):
            row["note"] = (row["note"] + " " + p.provider.served()).strip()


def run_group(case: Case, cfg: Config, on_row: Callable[[], None] = lambda: None) -> List[dict]:
    """Every provider's row for one case. The providers take turns at being timed
    (``time_group``) unless the logits are too large on CUDA for every provider's step to be
    held at once: then one after another, each freed before the next."""
    size = case.x.numel() * case.x.element_size()
    together = case.device.type != "cuda" or size <= INTERLEAVE_MAX_BYTES
    rows, ref, waiting = [], None, []
    for provider in cfg.providers:
        row, new_ref, prep = prepare_provider(provider, case, cfg, ref)
        if new_ref is not None:
            ref = new_ref
        rows.append(row)
        if prep is not None:
            waiting.append(prep)
            if not together:
                time_group(waiting, case, cfg)
                waiting = prep = []  # both held the step: free it before the next is made
                free_memory(case.device)
        on_row()
    del ref
    if waiting:
        time_group(waiting, case, cfg)
    waiting = None
    free_memory(case.device)
    return rows


def finish_group(rows: List[dict], case: Case, best_copy_ms: Optional[float]) -> Optional[float]:
    """GB/s, roofline fraction and speed-ups, once every provider of the group has run.

    The roofline comes from the fastest copy median measured so far for these logits (the
    machine's bandwidth only looks lower when something else disturbs a measurement).
    Returns that copy time.
    """
    by_name = {r["provider"]: r for r in rows if r["status"] == "ok"}
    size = case.x.numel() * case.x.element_size()
    copy = by_name.get("copy")
    if copy:
        best_copy_ms = min(copy["median_ms"], best_copy_ms or math.inf)
    roofline_ms = best_copy_ms * TRAFFIC[case.mode] / 2.0 if best_copy_ms else None
    eager = by_name.get("eager")
    compiled = by_name.get("compiled")
    for r in rows:
        traffic = 2.0 if r["provider"] == "copy" else TRAFFIC[case.mode]
        r["bytes"] = int(size * traffic)
        if r["status"] != "ok":
            continue
        r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        if r["provider"] != "copy" and roofline_ms:
            r["roofline_ms"] = roofline_ms
            r["roofline_frac"] = roofline_ms / r["median_ms"]
            if r["roofline_frac"] > 1.0:
                # no step moves its bytes faster than a copy: the copy was slowed by something
                r["note"] = (r.get("note", "") + " over the roofline: the copy was disturbed, "
                             "rerun").strip()
        if eager:
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
        if compiled:
            r["speedup_vs_compiled"] = compiled["median_ms"] / r["median_ms"]
    return best_copy_ms


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _fmt(value, spec: str, width: int) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def format_group(rows: List[dict], case: Case, best_copy_ms: Optional[float]) -> str:
    roof = ""
    if best_copy_ms:
        size = case.x.numel() * case.x.element_size()
        roof = (f"  roofline {TRAFFIC[case.mode] / 2:g} x copy = "
                f"{best_copy_ms * TRAFFIC[case.mode] / 2:.4g} ms "
                f"(copy {2 * size / (best_copy_ms * 1e-3) / 1e9:.3g} GB/s)")
    head = f"\n{case.shape.family} {case.shape.label} {case.dtype_name} {case.mode}{roof}"
    cols = (f"  {'provider':<10}{'median ms':>11}{'p20':>10}{'p80':>10}{'GB/s':>9}{'roof':>7}"
            f"{'x eager':>9}{'x compl':>9}{'peak MB':>9}{'rel err':>9}  note")
    lines = [head, cols]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  {r['provider']:<10}{r['status']:>11}  {r.get('note', '')}")
            continue
        note = r.get("note", "")
        if r.get("compile_s") is not None:
            note = (f"compile {r['compile_s']:.1f}s " + note).strip()
        frac = r.get("roofline_frac")
        lines.append(
            f"  {r['provider']:<10}{_fmt(r['median_ms'], '.4g', 11)}{_fmt(r['p20_ms'], '.4g', 10)}"
            f"{_fmt(r['p80_ms'], '.4g', 10)}{_fmt(r.get('gbps'), '.3g', 9)}"
            f"{_fmt(None if frac is None else 100 * frac, '.0f', 6)}{'%' if frac else ' '}"
            f"{_fmt(r.get('speedup_vs_eager'), '.2f', 9)}{_fmt(r.get('speedup_vs_compiled'), '.2f', 9)}"
            f"{_fmt(r.get('peak_extra_mb'), '.1f', 9)}{_fmt(r.get('max_rel_err'), '.1e', 9)}  {note}")
    return "\n".join(lines)


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class CsvSink:
    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()

    def write(self, rows: List[dict]) -> None:
        for r in rows:
            full = {**self.meta, **r}
            self.writer.writerow({k: _csv_value(full.get(k)) for k in CSV_FIELDS})
        self.file.flush()  # a killed run keeps every finished group

    def close(self) -> None:
        self.file.close()


def _row_shape(row: dict) -> Shape:
    """The shape a CSV row measured (its spatial column is Shape.spatial_text)."""
    text = row.get("spatial") or ""
    spatial = tuple(int(d) for d in text.split("x")) if text else ()
    return Shape(row.get("family", ""), row["n"], row["c"], spatial=spatial)


def _elements(row: dict) -> int:
    return _row_shape(row).numel


def _label(row: dict) -> str:
    return _row_shape(row).label


def plot(rows: List[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        print(f"no plot: matplotlib unavailable ({err})")
        return None
    ok = [r for r in rows if r.get("status") == "ok"]
    panels = sorted({(r["dtype"], r["mode"]) for r in ok}, key=lambda k: (k[0], MODES.index(k[1])))
    if not panels:
        return None
    providers = []
    for r in ok:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for (dtype_name, mode), (ax_t, ax_s) in zip(panels, axes):
        sel = [r for r in ok if r["dtype"] == dtype_name and r["mode"] == mode]
        sizes = sorted({(_elements(r), _label(r)) for r in sel})
        for p in providers:
            pts = sorted((_elements(r), r["median_ms"], r.get("speedup_vs_eager"))
                         for r in sel if r["provider"] == p)
            if not pts:
                continue
            style = dict(color=colors[p], marker="o", lw=1.5, ms=4)
            if p == "copy":
                style.update(ls=":", marker="x")
            ax_t.plot([a for a, _, _ in pts], [b for _, b, _ in pts], label=p, **style)
            sp = [(a, s) for a, _, s in pts if s]
            if sp and p not in ("copy", "eager"):
                ax_s.plot([a for a, _ in sp], [s for _, s in sp], label=p, **style)
        roof = sorted((_elements(r), r["roofline_ms"]) for r in sel
                      if r["provider"] == "eager" and r.get("roofline_ms"))
        if not roof:
            roof = sorted({(_elements(r), r["roofline_ms"]) for r in sel if r.get("roofline_ms")})
        if roof:
            ax_t.plot([a for a, _ in roof], [b for _, b in roof], color="k", ls="--", lw=1,
                      label=f"roofline ({TRAFFIC[mode] / 2:g} x copy)")
        for ax in (ax_t, ax_s):
            ax.set_xscale("log")
            ax.set_xticks([s for s, _ in sizes])
            ax.set_xticklabels([lbl for _, lbl in sizes], rotation=30, fontsize=7)
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("median time (ms)")
        ax_t.set_xlabel("logits N x C (x d1 ..) (axis: elements, log)", fontsize=8)
        ax_s.set_xlabel("logits N x C (x d1 ..) (axis: elements, log)", fontsize=8)
        ax_t.set_title(f"{dtype_name} {mode}: time", fontsize=10)
        ax_s.set_yscale("log")
        ax_s.axhline(1.0, color="gray", lw=0.8, label="eager")
        ax_s.set_ylabel("speed-up vs eager")
        ax_s.set_title(f"{dtype_name} {mode}: speed-up vs eager (higher is better)", fontsize=10)
        ax_t.legend(fontsize=7)
        ax_s.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_shapes(text: str) -> List[Shape]:
    shapes = []
    for item in text.split(","):
        if not re.fullmatch(r"\s*\d+(\s*x\s*\d+)+\s*", item):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not NxC or NxCxHxW..")
        n, c, *spatial = (int(d) for d in item.split("x"))
        if spatial:
            family = "segmentation"
        else:
            family = "medical" if c <= 16 else ("mid" if n * c <= 4_000_000 else "large")
        shapes.append(Shape(family, n, c, spatial=tuple(spatial)))
    return shapes


def build_providers(device: torch.device, args) -> Tuple[List[Provider], List[str]]:
    notes = []
    providers: List[Provider] = [EagerProvider()]
    if not args.no_compile:
        providers.append(CompiledProvider())
    for name in ("cpu", "cuda", "triton"):
        reason = _backends.unavailable_reason(name, device)
        if reason is None and name == "triton" and device.type == "cpu" and not args.interpret:
            reason = "the Triton interpreter is for tests, not timing (--interpret to time it)"
        if reason is None:
            providers.append(KernelProvider(name))
            if name == "triton" and device.type == "cuda" and \
                    _backends.unavailable_reason("cuda", device) is None:
                providers.append(PlansProvider())  # plans launch through the CUDA part
        elif not (name == "cuda" and device.type == "cpu"):
            notes.append(f"backend {name}: not timed: {reason}")
    providers.append(TorchCEProvider())
    liger = liger_cross_entropy()
    if liger is not None and device.type == "cuda":
        providers.append(LigerCEProvider(liger))
    elif device.type == "cuda":
        notes.append("liger_ce: Liger-Kernel is not installed")
    providers.append(CopyProvider())
    if args.providers:
        wanted = set(args.providers.split(","))
        providers = [p for p in providers if p.name in wanted]
    return providers, notes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_mit_loss",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="few shapes, fp32 on CPU (default)")
    sweep.add_argument("--full", action="store_true", help="the whole sweep")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    p.add_argument("--shapes", type=parse_shapes,
                   help="override: comma list of NxC or NxCxHxW.. (segmentation, NCHW), "
                        "e.g. 256x5,1024x1000,8x5x128x128")
    p.add_argument("--dtypes", help="override: comma list of fp32,bf16,fp16")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd,fwdbwd")
    p.add_argument("--providers", help="only these (eager,compiled,cpu,cuda,triton,"
                   "triton_plans,torch_ce,liger_ce,copy)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--interpret", action="store_true",
                   help="also time Triton on CPU when TRITON_INTERPRET=1 (slow; off by default)")
    p.add_argument("--target-s", type=float, help="CPU: seconds of timed calls per row")
    p.add_argument("--rep-ms", type=int, help="CUDA: milliseconds of timed calls per row")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help=f"the providers of a case take turns at being timed, in this many rounds "
                        f"(default {ROUNDS}; 1: one after another)")
    p.add_argument("--budget-s", type=float,
                   help="start no new case after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def make_config(args) -> Config:
    device = resolve_device(args.device)
    sweep = "full" if args.full else "quick"
    kind = "cuda" if device.type == "cuda" else "cpu"
    shapes, dtypes = SWEEPS[(kind, sweep)]
    if sweep == "full":
        # The quick sweep's shapes first, all of them (on the CPU the full sweep has 4096 x 32000
        # where the quick one has 1024 x 32000): a run cut short by --budget-s holds them all.
        quick = SWEEPS[(kind, "quick")][0]
        shapes = list(quick) + [s for s in shapes if s not in quick]
    if args.shapes:
        shapes = args.shapes
    if args.dtypes:
        dtypes = tuple(args.dtypes.split(","))
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            raise SystemExit(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    modes = tuple(m for m in args.modes.split(",") if m)
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: choose from {MODES}")
    providers, _ = build_providers(device, args)
    quick = sweep == "quick"
    default_budget = 240.0 if quick and device.type == "cpu" else None
    return Config(
        device=device, sweep=sweep, shapes=list(shapes), dtypes=dtypes, modes=modes,
        providers=providers,
        target_s=args.target_s if args.target_s else (0.3 if quick else 1.0),
        min_reps=3 if quick else 5, max_reps=200 if quick else 1000,
        rep_ms=args.rep_ms if args.rep_ms else (100 if quick else 200),
        measure_memory=not args.no_memory,
        budget_s=args.budget_s if args.budget_s is not None else default_budget,
        rounds=args.rounds,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    _, backend_notes = build_providers(cfg.device, args)
    groups = plan(cfg)
    device = cfg.device
    started = _dt.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    kind = device.type
    meta = {
        "run_id": f"{kind}-{stamp}", "device_kind": kind, "device_name": device_name(device),
        "torch": torch.__version__, "triton": triton_version(),
        "python": platform.python_version(), "git_commit": git_commit(),
        "build": build_summary(), "thp_alloc": THP_ALLOC + "/" + thp_mode(),
        "threads": torch.get_num_threads() if kind == "cpu" else "",
    }
    print(f"mitkernels benchmark ({cfg.sweep}) on {meta['device_name']}")
    print(f"torch {meta['torch']}  triton {meta['triton'] or '-'}  python {meta['python']}  "
          f"commit {meta['git_commit'] or '-'}")
    print(f"providers: {', '.join(p.name for p in cfg.providers)}")
    for note in backend_notes:
        print(f"  {note}")
    load = load_average()
    if kind == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {load:.1f} on {os.cpu_count()} cpus: other work shares the "
              "cores, CPU timings are noisy (the load is recorded in every row)")
    print(f"{len(groups)} cases: " + ", ".join(sorted({s.label for s, _, _ in groups},
                                                      key=lambda t: [int(v) for v in t.split('x')]))
          + f"; dtypes {','.join(cfg.dtypes)}; modes {','.join(cfg.modes)}")
    if args.list:
        for shape, dtype_name, mode in groups:
            print(f"  {shape.family:<8}{shape.label:>14} {dtype_name} {mode}")
        return 0

    configure_dynamo()
    sink = None
    csv_path = png_path = None
    if not args.no_save:
        base = f"{kind}_{slug(meta['device_name'])}_{stamp}"
        csv_path = args.out_dir / f"{base}.csv"
        png_path = args.out_dir / f"{base}.png"
        sink = CsvSink(csv_path, meta)

    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a comfort, not a requirement
        tqdm = None
    total_jobs = len(groups) * len(cfg.providers)
    bar = tqdm(total=total_jobs, desc="bench", unit="row", dynamic_ncols=True,
               mininterval=1.0) if tqdm else None
    say = (lambda s: tqdm.write(s)) if bar else print

    all_rows: List[dict] = []
    t_start = time.perf_counter()
    current = None  # (shape, dtype) whose inputs are allocated
    x = y = None
    skipped_groups = 0
    best_copy: Dict[Tuple[Shape, str], Optional[float]] = {}
    try:
        for shape, dtype_name, mode in groups:
            def skip(note: str) -> None:
                # rows for every provider, so that the CSV tells a skipped case from one never
                # planned
                rows = [{"family": shape.family, "n": shape.n, "c": shape.c,
                         "spatial": shape.spatial_text, "dtype": dtype_name,
                         "mode": mode, "provider": p.name, "status": "skipped", "note": note,
                         "timestamp": _dt.datetime.now().isoformat(timespec="seconds")}
                        for p in cfg.providers]
                if sink:
                    sink.write(rows)
                if bar:
                    bar.update(len(cfg.providers))

            if cfg.budget_s is not None and time.perf_counter() - t_start > cfg.budget_s:
                skipped_groups += 1
                skip(f"time budget of {cfg.budget_s:g}s spent")
                continue
            dtype = DTYPES[dtype_name]
            if current != (shape, dtype_name):
                x = y = None
                free_memory(device)
                need = shape.numel * torch.empty((), dtype=dtype).element_size()
                if device.type == "cuda":
                    free_bytes, _ = torch.cuda.mem_get_info(device)
                    if need * 3 > free_bytes:
                        note = (f"the logits need {need / 2**30:.1f} GiB and "
                                f"{free_bytes / 2**30:.1f} GiB are free")
                        say(f"\n{shape.label} {dtype_name}: skipped, {note}")
                        skip(note)
                        continue
                x, y = make_inputs(shape, dtype, device, args.seed)
                current = (shape, dtype_name)
            x.requires_grad_(mode == "fwdbwd")
            case = Case(shape, dtype_name, mode, device, x, y)
            if bar:
                bar.set_postfix_str(f"{shape.label} {dtype_name} {mode}")
            rows = run_group(case, cfg, (lambda: bar.update(1)) if bar else (lambda: None))
            for row in rows:
                row.update(family=shape.family, n=shape.n, c=shape.c,
                           spatial=shape.spatial_text, dtype=dtype_name, mode=mode,
                           timestamp=_dt.datetime.now().isoformat(timespec="seconds"),
                           load_avg=load_average())
            key = (shape, dtype_name)
            best_copy[key] = finish_group(rows, case, best_copy.get(key))
            say(format_group(rows, case, best_copy[key]))
            if sink:
                sink.write(rows)
            all_rows.extend(rows)
    except KeyboardInterrupt:
        say("\ninterrupted: saving what was measured")
    finally:
        if bar:
            bar.close()
        if sink:
            sink.close()
    x = y = None
    elapsed = time.perf_counter() - t_start
    print(f"\n{len(all_rows)} rows in {elapsed:.0f} s"
          + (f"; {skipped_groups} cases skipped (budget {cfg.budget_s:g}s)" if skipped_groups else ""))
    bad = [r for r in all_rows if "MISMATCH" in str(r.get("note", ""))]
    for r in bad:
        print(f"WARNING: {r['provider']} {r['n']}x{r['c']} {r['dtype']} {r['mode']}: "
              f"relative error {r.get('max_rel_err'):.2e} vs eager")
    if csv_path:
        shutil.copyfile(csv_path, csv_path.parent / f"latest_{kind}.csv")
        print(f"csv: {csv_path}")
        if not args.no_plot and all_rows:
            title = (f"MiT loss step on {meta['device_name']} - torch {meta['torch']} - "
                     f"{meta['git_commit']} - {started:%Y-%m-%d %H:%M}")
            if plot(all_rows, png_path, title):
                shutil.copyfile(png_path, png_path.parent / f"latest_{kind}.png")
                print(f"png: {png_path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
