"""Host time of an eager Triton step through launch plans, measured on the CPU (no GPU needed).

    TRITON_INTERPRET=1 python benchmarks/plans_host_cpu.py --shapes 256x5,32x5

A proxy for what plans save on a GPU's host, where a small step is bound by host time: on CPU
tensors a plan replays into the extension's logging launcher (the test launcher of
``tests/test_launch_plans.py``, which records each launch and runs no kernel), so its time is
the C++ step's own: the views, the plan lookup, the allocations, the parameter packing and the
autograd node. Beside it, in the same run and process:

* ``python``: the same step through the Python launchers with every launch made a no-op (and
  their buffers zeroed, as the replay's are), i.e. the Python around Triton's launches without
  the launches themselves (Triton's JIT binder, cache key and launcher come on top on a GPU);
* ``cpu``: the ``cpu`` backend's step (the extension's C++ kernels, one thread), the host floor
  of a step whose launches are C++.

Medians of 7 rounds of ``--calls`` steps (``mit_loss`` + ``autograd.grad`` to logits and tau).
Plans are recorded with the kernels compiled for sm_90 as a launch would compile them (Triton
3.9's JIT internals, as the tests do).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_us(fn, calls: int, after=lambda: None) -> float:
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        after()
    return sorted(rounds)[3]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="256x5,32x5", help="comma list of NxC")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 (Triton on CPU tensors)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    import mitkernels
    from mitkernels import _backends
    from mitkernels.triton import launch_plans
    from test_launch_plans import AotCompiler

    ext = _backends.extension()
    if isinstance(ext, ImportError) or not hasattr(ext, "_triton_plan_test_launcher"):
        print(f"the extension with launch plans is not built: {ext}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    aot = AotCompiler()
    launch_plans.compiled_for = aot
    ext._triton_plan_test_launcher(True, buffers=False)  # no buffer checks in the timing
    real_launch, real_empty = launch_plans.launch, launch_plans.empty
    print(f"# torch {torch.__version__}, one thread; us a step (median of 7 x {args.calls})")
    print(f"{'shape':>10} {'plans':>8} {'python':>8} {'cpu':>8}")
    try:
        for shape in args.shapes.split(","):
            n, c = (int(v) for v in shape.split("x"))
            x = torch.randn(n, c).requires_grad_(True)
            y = torch.randint(0, c, (n,))
            state = mitkernels.MiTState(c)

            def step(backend="triton"):
                loss, _ = mitkernels.mit_loss(x, y, state, backend=backend)
                return torch.autograd.grad(loss, (x, state.tau))

            def drain():
                ext._triton_plan_test_log()

            os.environ["MITKERNELS_TRITON_LAUNCH"] = "cpp"
            step()  # records
            plans_us = median_us(step, args.calls, drain)
            assert ext._triton_plan_info()["hits"] > 0, ext._triton_plan_info()
            os.environ["MITKERNELS_TRITON_LAUNCH"] = "python"
            launch_plans.launch = lambda *a, **k: None
            launch_plans.empty = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype,
                                                                          device=device)
            try:
                python_us = median_us(step, args.calls)
            finally:
                launch_plans.launch, launch_plans.empty = real_launch, real_empty
            cpu_us = median_us(lambda: step("cpu"), args.calls)
            print(f"{shape:>10} {plans_us:8.1f} {python_us:8.1f} {cpu_us:8.1f}", flush=True)
    finally:
        os.environ.pop("MITKERNELS_TRITON_LAUNCH", None)
        ext._triton_plan_test_launcher(False)
        ext._triton_plan_clear()
        aot.pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
