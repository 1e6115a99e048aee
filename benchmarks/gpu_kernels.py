"""Per-kernel GPU timings of the MiT ops, with a tile sweep of the streaming Triton kernels.

``python -m benchmarks.gpu_kernels [--shapes 4096x32000,16x5x256x256,...] [--dtypes fp32,bf16]
[--sweep]`` (``NxCxHxW``: segmentation logits, NCHW, the ops on their ``[N, C, H W]`` view)

Where ``bench_mit_loss`` times whole training steps (Python, autograd and state update included)
against eager and compiled PyTorch, this times the kernels of each backend on their own, so that
each one can be held against the bandwidth it could reach:

* ``copy``        ``out.copy_(x)``: 1 read + 1 write of the logits, the measured ceiling;
* ``<b>.fwd``     ``loss_forward_`` of backend ``b`` (all its launches): 1 read;
* ``<b>.bwd``     ``loss_backward``: 1 read + 1 write;
* ``<b>.step``    both, back to back: the loss's 2 reads + 1 write (KERNEL_MATH s.5);
* ``ce.eager`` / ``ce.compiled`` / ``ce.liger``  plain cross-entropy forward + gradient
  (``torch.autograd.grad``, no accumulation), the anchors a fused loss should match.

``frac`` is the fraction of the copy's bandwidth each reaches for its own traffic. ``--sweep``
retimes the Triton forward and backward kernels for other tiles of the large-C row of
``ROW_TABLE`` and ``ROW_TABLE_16`` (the launchers read the tables at call time), and for NCHW
shapes with the row tiles in place of the ``SPATIAL_TABLE`` ones (``sweep.*.rowtiles``), and
the forward with other caps on its grid (``sweep.fwd.p<programs an SM>``; the table's
``RowConfig.programs_per_sm`` by default). Times: ``triton.testing.do_bench`` medians (L2
flushed between calls). Prints a table; ``--csv`` writes it too.

``--overhead``: host time per call of small steps (``launch_overhead``), where the GPU waits on
the CPU: a Triton launch, allocations, each backend's ops, whole training steps at 256x5 (eager,
and replayed from a CUDA graph), the backward alone, and profiles of the Triton step. Then, for
each shape and dtype, a training step (``mit_loss`` + ``autograd.grad``) taken apart
(``step_timeline``): ``host`` the CPU's time to issue one step while the GPU is held busy (so the
CPU never waits), ``device`` the GPU's time for a step's work issued ahead of it (no idle gaps),
``isolated`` one step timed alone as ``bench_mit_loss`` does. ``isolated`` near ``device``: the
kernels bound the step; near ``host`` (or above both): the CPU does. ``triton`` is the eager
Triton step (``mitkernels_C::triton_loss_step_``, a C++ autograd node whose backward is the
extension's CUDA gradient kernel when it has one and the logits hold under 1 GiB), ``triton-tk``
the same with ``MITKERNELS_TRITON_BACKWARD=triton`` (Triton's backward, launched from Python on
the autograd thread), ``triton-cu`` with ``=cuda`` (the CUDA kernel at any size), ``triton-py``
the Triton step through the Python autograd node (no extension), ``triton-pl`` the step through
launch plans (``MITKERNELS_TRITON_LAUNCH=cpp``: its Triton kernels launched from C++) and
``triton-plk`` plans with Triton's backward at every size.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import os
import sys
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.bench_mit_loss import DTYPES, time_cuda
from mitkernels import _backends, reference
from mitkernels.state import initial_buffers

TEMP = (reference.MIT_T_EPS, reference.MIT_T_MIN, reference.MIT_T_MAX)
# (columns, warps, lanes) of the large-C row; lanes: the per-thread form of _lane_row_stats
# (else the row-block form).
SWEEP_TILES = ((8192, 8, False), (16384, 8, True), (4096, 4, True), (4096, 8, True),
               (2048, 4, True))
# Programs an SM for the forward's grid (RowConfig.programs_per_sm: 8, or 16 for 16-bit wide
# rows), each in place of the table's
SWEEP_PROGRAMS_PER_SM = (4, 8, 16, 32)


DEVICE = torch.device("cuda")


def bench(fn: Callable, rep_ms: int) -> float:
    if DEVICE.type != "cuda":  # --dry-run: one call, to exercise the code paths
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return time_cuda(fn, rep_ms).median_ms


def parse_shape(text: str):
    """``NxC`` or ``NxCxHxW..`` (segmentation, NCHW): ``(n, c, spatial)``."""
    dims = tuple(int(v) for v in text.lower().split("x"))
    if len(dims) < 2:
        raise ValueError(f"shape {text!r}: want NxC or NxCxHxW")
    return dims[0], dims[1], dims[2:]


class Case:
    def __init__(self, n: int, c: int, dtype: torch.dtype, seed: int = 0, spatial=()):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.n, self.c, self.dtype, self.spatial = n, c, dtype, tuple(spatial)
        self.label = "x".join(str(v) for v in (n, c) + self.spatial)
        self.x = (torch.randn(n, c, *self.spatial, device=DEVICE, generator=gen) * 3).to(dtype)
        self.x3 = self.x.view(n, c, -1)  # the ops' [N, C, S] view (NCHW: no copy)
        # targets shaped for mit_loss and F.cross_entropy; flat for the ops
        self.y_full = torch.randint(0, c, (n, *self.spatial), device=DEVICE, generator=gen)
        self.y = self.y_full.reshape(-1)
        self.tau = torch.tensor([0.3], device=DEVICE)
        self.nbytes = self.x.numel() * self.x.element_size()

    def state(self) -> List[torch.Tensor]:
        return [t.to(DEVICE) for t in initial_buffers(self.c).values()]


def _op_fns(kernels, case: Case):
    state = case.state()

    def fwd():
        # update_state=False: the same work as a training step, and the state stays put.
        return kernels.loss_forward_(case.x3, case.y, case.tau, state, 0, [], *TEMP, -100, 1,
                                     False, torch.float32)

    _, _, rs, gi = fwd()
    g = torch.ones((), device=DEVICE)

    def bwd():
        return kernels.loss_backward(g, case.x3, case.y, case.tau, rs, gi, *TEMP, -100, 1, True)

    def step():
        _, _, rs2, gi2 = fwd()
        return kernels.loss_backward(g, case.x3, case.y, case.tau, rs2, gi2, *TEMP, -100, 1, True)

    return fwd, bwd, step


def _forward_parts(kernels, case: Case):
    """The row_stats and finalize_ ops (the forward of the distributed path, and of CCT-EAL and
    TET beyond one block): rows + summary kernels, then the finalize, so that the fixed cost of
    the finalize shows on its own. (MiT's loss_forward_ of wide rows skips the summary.)"""
    state = case.state()
    rs, summary = kernels.row_stats(case.x3, case.y, case.tau, *TEMP, -100)

    def rows():
        return kernels.row_stats(case.x3, case.y, case.tau, *TEMP, -100)

    def finalize():
        return kernels.finalize_(summary, None, rs, case.tau, state, 0, [], *TEMP, 1, False,
                                 torch.float32)

    return rows, finalize


def _ce_fns(case: Case):
    x = case.x.detach().requires_grad_(True)
    y = case.y_full
    fns = {"ce.eager": lambda: torch.autograd.grad(F.cross_entropy(x, y), x)}
    if DEVICE.type == "cuda":
        compiled = torch.compile(F.cross_entropy, dynamic=False)
        fns["ce.compiled"] = lambda: torch.autograd.grad(compiled(x, y), x)
    if case.spatial:  # Liger's cross-entropy takes [N, C] logits
        return fns
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        fns["ce.liger"] = lambda: torch.autograd.grad(liger(x, y), x)
    except Exception:  # noqa: BLE001 - not installed here
        pass
    return fns


@dataclasses.dataclass
class Row:
    shape: str
    dtype: str
    what: str
    ms: float
    traffic: float  # units of the logits' size
    gbps: float = 0.0
    frac: float = 0.0
    note: str = ""


def run_case(case: Case, dtype_name: str, rep_ms: int, sweep: bool, with_ce: bool,
             backends=("triton", "cuda")) -> List[Row]:
    rows: List[Row] = []
    shape = case.label
    buf = torch.empty_like(case.x)
    copy_ms = bench(lambda: buf.copy_(case.x), rep_ms)
    copy_gbps = 2 * case.nbytes / copy_ms / 1e6
    rows.append(Row(shape, dtype_name, "copy", copy_ms, 2.0))

    def add(what, fn, traffic, note=""):
        try:
            ms = bench(fn, rep_ms)
        except Exception as err:  # noqa: BLE001 - record and go on
            rows.append(Row(shape, dtype_name, what, float("nan"), traffic,
                            note=f"{type(err).__name__}: {err}"[:120]))
            return None
        rows.append(Row(shape, dtype_name, what, ms, traffic, note=note))
        return ms

    def op_fns(kernels, *whats):
        """_op_fns (whose setup runs a forward), or None with the failure on the rows whats."""
        try:
            return _op_fns(kernels, case)
        except Exception as err:  # noqa: BLE001 - record and go on
            for what in whats:
                rows.append(Row(shape, dtype_name, what, float("nan"), 0.0,
                                note=f"{type(err).__name__}: {err}"[:120]))
            return None

    for backend in backends:
        if _backends.unavailable_reason(backend, case.x.device) is not None:
            continue
        fns = op_fns(_backends.get(backend, case.x.device), f"{backend}.fwd")
        if fns is None:
            continue
        fwd, bwd, step = fns
        add(f"{backend}.fwd", fwd, 1.0)
        add(f"{backend}.bwd", bwd, 2.0)
        add(f"{backend}.step", step, 3.0)
        if backend == "triton":
            rows_fn, finalize_fn = _forward_parts(_backends.get(backend, case.x.device), case)
            add("triton.fwd.row_stats", rows_fn, 1.0)
            add("triton.fwd.finalize", finalize_fn, 0.0)
    if with_ce:
        for what, fn in _ce_fns(case).items():
            add(what, fn, 3.0)
    if sweep and case.spatial:
        # NCHW logits: the SPATIAL tiles (the default where they cover C) against the row
        # tiles, both ways timed in the same run
        from mitkernels.triton import mit_loss as tk

        # either pass (16-bit logits of 9-16 classes: the backward alone)
        if (tk.spatial_config(case.x3) or tk.spatial_config(case.x3, backward=True)) is not None:
            kernels = _backends.get("triton", case.x.device)
            saved_spatial = tk.spatial_config
            try:
                tk.spatial_config = lambda logits, backward=False: None
                fns = op_fns(kernels, "sweep.fwd.rowtiles")
                if fns is not None:
                    add("sweep.fwd.rowtiles", fns[0], 1.0)
                    add("sweep.bwd.rowtiles", fns[1], 2.0)
            finally:
                tk.spatial_config = saved_spatial
    elif sweep:
        from mitkernels.triton import mit_loss as tk

        saved = tk.ROW_TABLE, tk.ROW_TABLE_16
        kernels = _backends.get("triton", case.x.device)
        try:
            for block_c, warps, lanes in SWEEP_TILES:
                # each table's wide row with this tile, its grid cap kept (16-bit: 16 an SM)
                tk.ROW_TABLE, tk.ROW_TABLE_16 = (
                    table[:-1] + (dataclasses.replace(table[-1], block_c=block_c,
                                                      num_warps=warps, lanes=lanes),)
                    for table in saved)
                if tk.row_config(case.c, case.dtype).max_classes is not None:
                    break  # C is not in the large-C row: the sweep does not apply
                tag = f"c{block_c}w{warps}" + ("l" if lanes else "")
                fns = op_fns(kernels, f"sweep.fwd.{tag}")
                if fns is not None:
                    add(f"sweep.fwd.{tag}", fns[0], 1.0)
                    add(f"sweep.bwd.{tag}", fns[1], 2.0)
        finally:
            tk.ROW_TABLE, tk.ROW_TABLE_16 = saved
    if sweep:
        # The forward's grid: at most RowConfig.programs_per_sm programs an SM walk the tiles
        # (8, 16 for the 16-bit wide rows); other caps in place of the table's, timed in the
        # same run.
        from mitkernels.triton import mit_loss as tk

        kernels = _backends.get("triton", case.x.device)
        saved_cap = tk._program_cap
        try:
            for per_sm in SWEEP_PROGRAMS_PER_SM:
                tk._program_cap = lambda device, _=None, k=per_sm: saved_cap(device, k)
                fns = op_fns(kernels, f"sweep.fwd.p{per_sm}")
                if fns is not None:
                    add(f"sweep.fwd.p{per_sm}", fns[0], 1.0)
        finally:
            tk._program_cap = saved_cap
    for r in rows:
        if r.ms == r.ms and r.ms > 0:
            r.gbps = r.traffic * case.nbytes / r.ms / 1e6
            r.frac = r.gbps / copy_gbps
    return rows


def _host_us(fn: Callable, calls: int = 300) -> float:
    """Microseconds a call, for calls issued back to back and synchronised once: the host's cost
    whenever it exceeds the device's."""
    import time

    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    for _ in range(20 if DEVICE.type == "cuda" else 1):
        fn()
    sync()
    calls = calls if DEVICE.type == "cuda" else 2
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def _graph_replay(step: Callable) -> Callable:
    """``step`` captured in a CUDA graph (warmed up on a side stream first): its replay, or a
    function that raises why the capture failed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as err:  # noqa: BLE001 - reported as the row's failure
        failure = err

        def failed():
            raise failure

        return failed
    return graph.replay


def _train_step(x: torch.Tensor, y: torch.Tensor, state, backend: str):
    """One training step of the loss, as bench_mit_loss times it: ``mit_loss`` (with the state
    update), then the gradient to the logits and ``tau``."""
    import mitkernels

    loss, _ = mitkernels.mit_loss(x, y, state, backend=backend)
    return torch.autograd.grad(loss, (x, state.tau))


def launch_overhead(n: int = 256, c: int = 5) -> List[str]:
    import types
    from unittest import mock

    import mitkernels
    from mitkernels import functional
    from mitkernels.state import MiTState
    from mitkernels.triton import mit_loss as tk

    case = Case(n, c, torch.float32)
    lines = []

    def add(what, fn):
        try:
            lines.append(f"{what:>40} {_host_us(fn):9.1f} us")
        except Exception as err:  # noqa: BLE001 - record and go on
            lines.append(f"{what:>40}   failed: {type(err).__name__}: {err}"[:160])
        print(lines[-1], flush=True)

    small = torch.empty(16, device=DEVICE)
    add("torch.empty(16)", lambda: torch.empty(16, device=DEVICE))
    add("torch.zeros(16)", lambda: torch.zeros(16, device=DEVICE))
    add("x.add_(1) (one ATen launch)", lambda: small.add_(1))
    rs = torch.zeros(tk.ROW_STATS, 16, device=DEVICE)
    gi = torch.zeros(3, device=DEVICE)
    st = torch.zeros(9, dtype=torch.float64, device=DEVICE)
    out = torch.empty(16, device=DEVICE)
    add("triton launch, 6 args (_none_loss_kernel)",
        lambda: tk._none_loss_kernel[(1,)](rs, gi, st, out, 16, BLOCK=tk.NONE_LOSS_BLOCK,
                                           num_warps=tk.NONE_LOSS_WARPS))
    for backend in ("triton", "cuda"):
        if _backends.unavailable_reason(backend, DEVICE) is not None:
            continue
        fwd, bwd, step = _op_fns(_backends.get(backend, DEVICE), case)
        add(f"{backend}.loss_forward_ {n}x{c}", fwd)
        add(f"{backend}.loss_backward {n}x{c}", bwd)
        state = MiTState(c, device=DEVICE)
        x = case.x.detach().requires_grad_(True)

        train_step = functools.partial(_train_step, x, case.y, state, backend)

        add(f"{backend} mit_loss + grad {n}x{c}", train_step)
        add(f"{backend} mit_loss, no grad {n}x{c}",
            lambda backend=backend, state=state: mitkernels.mit_loss(case.x, case.y, state,
                                                                     backend=backend))
        # The step's parts: the Triton launchers as the C++ step calls them (through the
        # dispatcher, which boxes their arguments into Python), and each backend's backward alone
        # (on a GPU the autograd engine runs it on its device thread; the Triton step's is the
        # extension's CUDA kernel when it has one, else Triton's launcher, which takes the GIL
        # there: "Triton's kernel" times that one).
        if backend == "triton" and functional._triton_step_op() is not None:
            ops = torch.ops.mitkernels_C
            fwd_d, bwd_d, _ = _op_fns(types.SimpleNamespace(
                loss_forward_=ops.triton_loss_forward_, loss_backward=ops.triton_loss_backward),
                case)
            add(f"triton_loss_forward_ (dispatcher) {n}x{c}", fwd_d)
            add(f"triton_loss_backward (dispatcher) {n}x{c}", bwd_d)
        if DEVICE.type == "cuda":
            # The same step captured once in a CUDA graph (tests/test_cuda_graphs.py): what a
            # small batch costs when no Python runs per step.
            add(f"{backend} mit_loss + grad, graph replay {n}x{c}", _graph_replay(train_step))
        backwards = [("", {})]
        if backend == "triton":
            backwards.append((", Triton's kernel", {"MITKERNELS_TRITON_BACKWARD": "triton"}))
            # launch plans: the Triton kernels launched from C++ once a call of the same
            # signature has been recorded (the warm-up calls of _host_us record it)
            plans = {"MITKERNELS_TRITON_LAUNCH": "cpp"}
            with mock.patch.dict(os.environ, plans):
                add(f"{backend} mit_loss + grad, plans {n}x{c}", train_step)
            backwards.append((", plans + Triton's kernel",
                              {**plans, "MITKERNELS_TRITON_BACKWARD": "triton"}))
        for suffix, env in backwards:
            with mock.patch.dict(os.environ, env):  # the step's forward chooses its backward
                loss, _ = mitkernels.mit_loss(x, case.y, state, backend=backend)
            add(f"{backend} backward alone{suffix} {n}x{c}",
                lambda loss=loss, state=state, x=x: torch.autograd.grad(loss, (x, state.tau),
                                                                        retain_graph=True))
        del loss
    xg = case.x.detach().requires_grad_(True)
    add(f"F.cross_entropy + grad {n}x{c}",
        lambda: torch.autograd.grad(F.cross_entropy(xg, case.y), xg))
    if _backends.unavailable_reason("triton", DEVICE) is None:
        # Where the host time of a Triton step goes (Python functions; C++ time shows as the
        # builtin methods that call it).
        import cProfile
        import pstats

        state = MiTState(c, device=DEVICE)
        x = case.x.detach().requires_grad_(True)
        steps = 200 if DEVICE.type == "cuda" else 2  # --dry-run: the interpreter is slow
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            _train_step(x, case.y, state, "triton")
        prof.disable()
        print(f"# cProfile of {steps} triton steps (mit_loss + grad), by own time:", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        # The same steps by op, with the time each takes on whichever thread runs it (cProfile
        # sees the main thread's Python only; the backward runs on the autograd device thread).
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            for _ in range(steps):
                _train_step(x, case.y, state, "triton")
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
        print(f"# torch.profiler of {steps} triton steps, by self CPU time:", flush=True)
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
    return lines


def _hold_gpu_ms(ms: float) -> None:
    """Keep the stream busy for about ``ms`` (a spin kernel), so that the host runs ahead."""
    clock_hz = getattr(torch.cuda.get_device_properties(DEVICE), "clock_rate", 2_000_000) * 1e3
    torch.cuda._sleep(int(ms * 1e-3 * clock_hz))


def step_timeline(shapes, dtypes, backends, steps: int = 20) -> List[str]:
    """Host time, device time and isolated time of one MiT training step (see the docstring)."""
    import contextlib
    import time
    from unittest import mock

    from mitkernels import functional
    from mitkernels.state import MiTState
    from mitkernels.triton import launch_plans

    lines = []
    print(f"# training step taken apart ({steps} steps each; ms)", flush=True)
    print(f"{'shape':>12} {'dtype':>5} {'backend':>9} {'host':>8} {'device':>8} {'isolated':>9}",
          flush=True)
    for n, c, spatial in shapes:
        for dtype_name in dtypes:
            case = Case(n, c, DTYPES[dtype_name], spatial=spatial)
            # triton-tk / triton-cu: the C++ node with Triton's / the CUDA backward (`triton`
            # chooses by size); triton-py: the Triton step through the Python autograd node (what
            # runs when the extension is missing)
            # triton-pl: through launch plans (MITKERNELS_TRITON_LAUNCH=cpp: the kernels
            # launched from C++, mitkernels/triton/launch_plans.py); triton-plk: plans and
            # Triton's backward at any size
            variants = list(backends) + (["triton-tk", "triton-cu", "triton-py", "triton-pl",
                                          "triton-plk"] if "triton" in backends else [])
            for label in variants:
                backend = label.split("-")[0]
                if _backends.unavailable_reason(backend, DEVICE) is not None:
                    continue
                state = MiTState(c, device=DEVICE)
                x = case.x.detach().requires_grad_(True)

                step = functools.partial(_train_step, x, case.y_full, state, backend)

                if label.endswith("-pl") or label.endswith("-plk"):
                    env = {"MITKERNELS_TRITON_LAUNCH": "cpp"}
                    if label.endswith("-plk"):
                        env["MITKERNELS_TRITON_BACKWARD"] = "triton"
                    variant = mock.patch.dict(os.environ, env)
                elif label.endswith("-py"):
                    variant = mock.patch.object(functional, "_triton_step_op", lambda: None)
                elif label.endswith("-tk"):
                    variant = mock.patch.dict(os.environ, {"MITKERNELS_TRITON_BACKWARD": "triton"})
                elif label.endswith("-cu"):
                    if "cuda" not in _backends.available(DEVICE):
                        continue
                    variant = mock.patch.dict(os.environ, {"MITKERNELS_TRITON_BACKWARD": "cuda"})
                else:
                    variant = contextlib.nullcontext()
                launch_plans.clear()  # counts from zero for the -pl rows
                with variant:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    # host: `steps` steps issued behind a long spin, so the CPU never waits
                    _hold_gpu_ms(50.0 + steps * 2.0)
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()  # recorded behind the spin: the device time excludes it
                    t0 = time.perf_counter()
                    out = None
                    for _ in range(steps):
                        out = step()
                    host_ms = (time.perf_counter() - t0) / steps * 1e3
                    end.record()
                    torch.cuda.synchronize()
                    # device: the steps above ran back to back once the spin ended
                    device_ms = start.elapsed_time(end) / steps
                    del out
                    isolated_ms = bench(step, 100)
                line = (f"{case.label:>12} {dtype_name:>5} {label:>9} {host_ms:8.4f} "
                        f"{device_ms:8.4f} {isolated_ms:9.4f}")
                if "-pl" in label:  # did plans serve these steps, or the Python launchers?
                    line += "  " + launch_plans.summary()
                lines.append(line)
                print(line, flush=True)
            del case
            torch.cuda.empty_cache()
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kernels", description=__doc__)
    p.add_argument("--shapes", default="4096x32000,1024x1000,256x5",
                   help="NxC or NxCxHxW (segmentation logits, NCHW), comma-separated")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--backends", default="triton,cuda", help="kernel backends to time")
    p.add_argument("--no-ce", action="store_true", help="skip the cross-entropy anchors")
    p.add_argument("--csv", help="write the table here too")
    p.add_argument("--overhead", action="store_true", help="also the host time per call")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU tensors, one call each (with TRITON_INTERPRET=1): checks the script")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    if args.dry_run:
        DEVICE = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "CPU dry run"
    print(f"# {name}, torch {torch.__version__}", flush=True)
    if args.overhead:
        print("# host time per call (back to back, one synchronisation)", flush=True)
        launch_overhead()
    if args.overhead and DEVICE.type == "cuda":
        step_timeline([parse_shape(t) for t in args.shapes.split(",")],
                      args.dtypes.split(","), tuple(args.backends.split(",")))
    header = f"{'shape':>12} {'dtype':>5} {'what':>22} {'ms':>9} {'GB/s':>8} {'frac':>6}  note"
    print(header, flush=True)
    all_rows: List[Row] = []
    for text in args.shapes.split(","):
        n, c, spatial = parse_shape(text)
        for dtype_name in args.dtypes.split(","):
            case = Case(n, c, DTYPES[dtype_name], spatial=spatial)
            rows = run_case(case, dtype_name, args.rep_ms, args.sweep, not args.no_ce,
                            tuple(args.backends.split(",")))
            for r in rows:
                print(f"{r.shape:>12} {r.dtype:>5} {r.what:>22} {r.ms:9.4f} {r.gbps:8.0f} "
                      f"{r.frac:6.3f}  {r.note}", flush=True)
            all_rows += rows
            del case
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([fld.name for fld in dataclasses.fields(Row)])
            for r in all_rows:
                writer.writerow(dataclasses.astuple(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
