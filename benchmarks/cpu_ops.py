"""The C++ CPU kernel ops timed alone, in nanoseconds per logit.

``python -m benchmarks.cpu_ops [--shapes 1024x1000,...] [--dtypes fp32,bf16] [--threads 1]
[--overhead [--overhead-shapes 32x5,256x5]]``

``bench_mit_loss`` times whole training steps, where Python, autograd and the machine's noise
add up to more than a kernel change moves. This times ``torch.ops.mitkernels_C.loss_forward_``
(the row pass and the finalize, no state update) and ``loss_backward`` (the gradient) by
themselves on canonical ``[N, C, S]`` logits (``NxC``, or ``NxCxHxW..`` for spatial logits,
laid out as NCHW is), and reports the best of ``--rounds`` means of
``--calls`` calls each: the least disturbed time, which is what an A/B of two builds needs. On a
shared VM, alternate the builds (run this with one, then the other, several times) rather than
compare runs minutes apart.

``--overhead``: where a small training step's time goes (microseconds a call, median of 3000),
at each of ``--overhead-shapes`` (fp32): each op, ``mitkernels.mit_loss`` +
``torch.autograd.grad`` as ``bench_mit_loss`` times it, ``F.cross_entropy`` +
``torch.autograd.grad`` (plain CE, the floor such a step is compared with), and the autograd
machinery alone on a two-op graph (``(w * 2).sum()``): its forward, with
``torch.autograd.grad``, and with the engine called directly (no Python wrapper).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List, Sequence, Tuple

import torch

from benchmarks.bench_mit_loss import parse_shapes
from mitkernels import reference
from mitkernels.state import initial_buffers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
TEMP = (reference.MIT_T_EPS, reference.MIT_T_MIN, reference.MIT_T_MAX)
MEAN = 1


def best_ns_per_elem(fn: Callable[[], object], elements: int, rounds: int, calls: int) -> float:
    for _ in range(max(2, calls)):  # warm caches, allocator and thread pool
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e9 / elements


def time_ops(shape: Sequence[int], dtype: torch.dtype, rounds: int, calls: int,
             seed: int = 0) -> Tuple[float, float]:
    """(forward, backward) ns per logit of the CPU ops at ``shape`` (``[N, C, ..]``)."""
    import mitkernels._C  # noqa: F401 - registers torch.ops.mitkernels_C

    ops = torch.ops.mitkernels_C
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(*shape, generator=g).to(dtype).reshape(n, c, -1)
    y = torch.randint(0, c, (x.shape[0] * x.shape[2],), generator=g)
    tau = torch.zeros(1, dtype=torch.float32)
    state = list(initial_buffers(c).values())
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def forward():
        return ops.loss_forward_(x, y, tau, state, 0, [], *TEMP, -100, MEAN, False, loss_dtype)

    _, _, row_stats, grad_info = forward()
    grad_loss = torch.ones((), dtype=loss_dtype)

    def backward():
        return ops.loss_backward(grad_loss, x, y, tau, row_stats, grad_info, *TEMP, -100, MEAN,
                                 True)

    return (best_ns_per_elem(forward, x.numel(), rounds, calls),
            best_ns_per_elem(backward, x.numel(), rounds, calls))


def median_us(fn: Callable[[], object], calls: int = 3000) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def step_overhead(n: int, c: int) -> List[Tuple[str, float]]:
    """Microseconds a call of a step's pieces at ``[n, c]`` fp32 (see the module docstring)."""
    import mitkernels
    import mitkernels._C  # noqa: F401

    ops = torch.ops.mitkernels_C
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g)
    state = mitkernels.MiTState(c)
    bufs = [state.class_counts, state.total_seen, state.lambda_entropy, state.dual_updates]
    x3, tau = x.detach().unsqueeze(-1), state.tau.detach().reshape(1)
    _, _, row_stats, grad_info = ops.loss_forward_(x3, y, tau, bufs, 0, [], *TEMP, -100, MEAN,
                                                   False, torch.float32)
    one = torch.ones(())
    w = torch.randn(n, c, generator=g).requires_grad_(True)
    engine = torch.autograd.Variable._execution_engine

    def step():
        loss, _ = mitkernels.mit_loss(x, y, state, backend="cpu")
        return torch.autograd.grad(loss, (x, state.tau))

    def cross_entropy_step():
        return torch.autograd.grad(torch.nn.functional.cross_entropy(x, y), (x,))

    pieces = [
        ("op loss_forward_", lambda: ops.loss_forward_(x3, y, tau, bufs, 0, [], *TEMP, -100,
                                                       MEAN, False, torch.float32)),
        ("op loss_backward", lambda: ops.loss_backward(one, x3, y, tau, row_stats, grad_info,
                                                       *TEMP, -100, MEAN, True)),
        ("mit_loss + autograd.grad (the bench step)", step),
        ("F.cross_entropy + autograd.grad", cross_entropy_step),
        ("(w * 2).sum()", lambda: (w * 2).sum()),
        ("(w * 2).sum() + autograd.grad", lambda: torch.autograd.grad((w * 2).sum(), (w,))),
        ("(w * 2).sum() + engine.run_backward",
         lambda: engine.run_backward(((w * 2).sum(),), (one,), False, False, (w,), False)),
    ]
    return [(name, median_us(fn)) for name, fn in pieces]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_shapes, default="1024x1000",
                   help="NxC or NxCxHxW.., comma-separated (default 1024x1000)")
    p.add_argument("--dtypes", default="fp32", help=f"of {','.join(DTYPES)} (default fp32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--overhead", action="store_true",
                   help="also a small step's pieces, microseconds a call")
    p.add_argument("--overhead-shapes", default="32x5",
                   help="NxC of the --overhead steps, comma-separated (default 32x5)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.overhead:
        for shape in args.overhead_shapes.split(","):
            n, c = (int(v) for v in shape.split("x"))
            print(f"# a {shape} fp32 step's pieces, us a call (median of 3000), {args.threads} "
                  f"thread(s), torch {torch.__version__}")
            for name, us in step_overhead(n, c):
                print(f"{name:>42} {us:8.1f}", flush=True)
    print(f"# ns per logit, best of {args.rounds} means of {args.calls} calls, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{'shape':>14} {'dtype':>5} {'forward':>8} {'backward':>8}")
    for shape in args.shapes:  # bench_mit_loss's Shape: NxC or NxCxHxW..
        for name in args.dtypes.split(","):
            fwd, bwd = time_ops((shape.n, shape.c, *shape.spatial), DTYPES[name], args.rounds,
                                args.calls)
            print(f"{shape.label:>14} {name:>5} {fwd:8.3f} {bwd:8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
