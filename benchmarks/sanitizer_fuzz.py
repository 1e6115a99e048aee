"""A small fuzz set for ``compute-sanitizer --tool memcheck``: every GPU backend, fwd + bwd.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --report-api-errors no \\
        python benchmarks/sanitizer_fuzz.py --cases 16

(``benchmarks/gpu_check.sh`` runs it so.) Without the caching allocator every tensor is its own
``cudaMalloc``, so a kernel that reads or writes past a tensor is caught instead of landing in a
neighbour inside a pooled block.

Each case draws a shape (rows 1..1000, classes 2..5000, optional spatial dims), a dtype, a layout
(contiguous, strided columns, transposed), a reduction, a loss (MiT, TET, CCT-EAL), rows with
``ignore_index`` (some cases all ignored) and, in some cases, invalid targets (negative, ``C``,
huge). It runs the forward and the backward to logits and temperature, synchronizes (so a fault
is blamed on its case), and checks what the op contract promises: finite results, a NaN loss
and an untouched state when a target is invalid, and agreement with the eager reference when
every target is valid. Exit status 0 when every case ran and every check held. On a GPU whose
extension has its CUDA part, ``triton-plans`` runs the Triton cases again through launch plans
(``MITKERNELS_TRITON_LAUNCH=cpp``, Triton's backward at every size): a first call records the
case's plans, and the checked call replays them.

Runs on CPU too (``--device cpu``), for checking the driver itself: there invalid targets are
refused with a ValueError before anything runs, which the driver expects.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

import mitkernels
from mitkernels import _backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def draw_case(rng: random.Random, index: int) -> dict:
    n = rng.choice([1, 2, 7, 33, 128, 257, 1000])
    c = rng.choice([2, 3, 5, 7, 64, 1000, 1025, 5000])
    spatial = rng.choice([(), (), (), (3,), (2, 3)])
    if n * c * (1 if not spatial else spatial[0] * (spatial[-1] if len(spatial) > 1 else 1)) > 2e6:
        n = 7
    return {
        "index": index,
        "n": n, "c": c, "spatial": spatial,
        "dtype": rng.choice(DTYPES),
        "layout": rng.choice(["contiguous", "contiguous", "strided", "transposed"]),
        "loss": rng.choice(["mit", "mit", "tet", "cct"]),
        "reduction": rng.choice(["mean", "mean", "sum", "none"]),
        "ignore_index": rng.choice([-100, -100, -1, 0]),
        "ignored": rng.choice([0.0, 0.0, 0.3, 1.0]),
        "invalid": rng.choice([None, None, None, "negative", "c", "huge"]),
        "seed": rng.randrange(2**31),
    }


def describe(case: dict) -> str:
    shape = "x".join(str(d) for d in (case["n"], case["c"], *case["spatial"]))
    return (f"case {case['index']:3d} {case['loss']:<3} {shape:<14} {str(case['dtype'])[6:]:<8} "
            f"{case['layout']:<10} red={case['reduction']:<4} ignore={case['ignore_index']}"
            f"@{case['ignored']:.1f} invalid={case['invalid']}")


def make_logits(case: dict, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(case["seed"])
    n, c, spatial = case["n"], case["c"], case["spatial"]
    shape = (n, c, *spatial)
    values = torch.randn(shape, generator=gen) * 3.0
    if case["layout"] == "strided":
        # Every other column of a wider tensor: a view with a column stride of 2.
        wide = torch.zeros((n, 2 * c, *spatial))
        wide[:, ::2] = values
        base = wide.to(device=device, dtype=case["dtype"]).requires_grad_()
        return base, base[:, ::2]
    if case["layout"] == "transposed" and not spatial:
        base = values.t().contiguous().to(device=device, dtype=case["dtype"]).requires_grad_()
        return base, base.t()
    base = values.to(device=device, dtype=case["dtype"]).requires_grad_()
    return base, base


def make_targets(case: dict, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(case["seed"] + 1)
    n, c, spatial = case["n"], case["c"], case["spatial"]
    y = torch.randint(0, c, (n, *spatial), generator=gen)
    ignored = torch.rand(y.shape, generator=gen) < case["ignored"]
    y[ignored] = case["ignore_index"]
    if case["invalid"]:
        bad = {"negative": -5, "c": c, "huge": 2**40}[case["invalid"]]
        if bad == case["ignore_index"]:
            bad = c
        y.view(-1)[y.numel() // 2] = bad
    return y.to(device)


def make_state(case: dict, device: torch.device):
    c = case["c"]
    if case["loss"] == "mit":
        return mitkernels.MiTState(c, temperature=1.3, device=device)
    if case["loss"] == "cct":
        tau_c = torch.linspace(-1.0, 1.0, c, device=device).requires_grad_()
        ema = torch.full((c,), 1.0 / c, dtype=torch.float64, device=device)
        alpha = torch.tensor(0.5, dtype=torch.float64, device=device)
        return (tau_c, ema, alpha)
    return None


def call_loss(case: dict, logits, targets, backend: str, state):
    """(loss, stats, the temperature parameters that take a gradient)."""
    red = case["reduction"]
    if case["loss"] == "cct" and red == "none":
        red = "mean"
    common = dict(backend=backend, ignore_index=case["ignore_index"], reduction=red)
    if case["loss"] == "mit":
        loss, stats = mitkernels.mit_loss(logits, targets, state, **common)
        return loss, stats, [state.tau]
    if case["loss"] == "tet":
        loss, stats = mitkernels.tet_loss(logits, targets, 0.7, 0.1, **common)
        return loss, stats, []
    tau_c, ema, alpha = state
    loss, stats = mitkernels.cct_eal_loss(logits, targets, tau_c, ema, alpha, **common)
    return loss, stats, [tau_c]


def state_tensors(state) -> list:
    if state is None:
        return []
    if isinstance(state, tuple):
        return [state[1], state[2]]
    return [state.class_counts, state.total_seen, state.lambda_entropy, state.dual_updates]


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) if b.numel() else 0.0


# The Triton backend through launch plans (mitkernels/triton/launch_plans.py), Triton's backward
# at every size: each case runs once to record its plans, then is checked on a replay.
PLANS = "triton-plans"
PLANS_ENV = {"MITKERNELS_TRITON_LAUNCH": "cpp", "MITKERNELS_TRITON_BACKWARD": "triton"}


def run_case(case: dict, backend: str, device: torch.device) -> str:
    """Runs one case; returns '' when every check held, else what went wrong."""
    if backend == PLANS:
        from unittest import mock

        with mock.patch.dict(os.environ, PLANS_ENV):
            base, logits = make_logits(case, device)
            try:
                loss, _, params = call_loss(case, logits, make_targets(case, device), "triton",
                                            make_state(case, device))
                torch.autograd.grad(loss.sum(), [base, *params], allow_unused=True)
            except ValueError:
                pass  # refused on CPU: the checked call below expects that too
            from mitkernels.triton import launch_plans

            before = launch_plans.info()
            problem = run_case(case, "triton", device)
            after = launch_plans.info()
            if after.get("hits", 0) == before.get("hits", 0):  # the Python launchers ran
                why = after.get("last_refusal", "") if after.get("refused") else "no plan"
                problem = "; ".join(p for p in (problem, f"not replayed: {why}") if p)
            return problem
    base, logits = make_logits(case, device)
    targets = make_targets(case, device)
    expect_refusal = case["invalid"] is not None and device.type == "cpu"
    state = make_state(case, device)
    before = [t.clone() for t in state_tensors(state)]
    try:
        loss, stats, params = call_loss(case, logits, targets, backend, state)
    except ValueError:
        return "" if expect_refusal else "unexpected ValueError"
    if expect_refusal:
        return "invalid targets were not refused on CPU"
    grads = torch.autograd.grad(loss.sum(), [base, *params], allow_unused=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    problems = []
    if case["invalid"]:
        # The contract on a GPU: masked, counted, a NaN loss, and no state update from the batch.
        if not bool(torch.isnan(loss).all()):
            problems.append("invalid target but the loss is not NaN")
        if float(stats["invalid_targets"]) < 1:
            problems.append("invalid target not counted")
        if any(not torch.equal(a, b) for a, b in zip(before, state_tensors(state))):
            problems.append("an invalid target changed the state")
        return "; ".join(problems)
    for g in grads:
        if g is not None and not bool(torch.isfinite(g).all()):
            problems.append("non-finite gradient")
    if not bool(torch.isfinite(loss).all()):
        problems.append("non-finite loss")
    # Agreement with the eager reference on the same inputs (fresh state).
    ref_base, ref_logits = make_logits(case, device)
    ref_loss, _, ref_params = call_loss(case, ref_logits, targets, "reference",
                                        make_state(case, device))
    ref_grads = torch.autograd.grad(ref_loss.sum(), [ref_base, *ref_params], allow_unused=True)
    tol = TOL[case["dtype"]]
    err = max_rel_err(loss, ref_loss)
    if err > tol:
        problems.append(f"loss differs from the reference by {err:.1e}")
    for name, g, r in zip(["logits", "tau"], grads, ref_grads):
        if g is not None and r is not None:
            err = max_rel_err(g, r)
            if err > tol * 5:
                problems.append(f"grad {name} differs from the reference by {err:.1e}")
    return "; ".join(problems)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=16, help="cases per backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", help="comma list (default: every kernel backend on the device)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in ("triton", "cuda", "cpu")
                    if _backends.unavailable_reason(b, device) is None
                    and not (b == "triton" and device.type == "cpu")]
        if "triton" in backends and "cuda" in _backends.available(device):
            backends.append(PLANS)  # plans launch through the extension's CUDA part
    if not backends:
        print(f"no kernel backend on {device}: {mitkernels.build_info()}", file=sys.stderr)
        return 3
    print(f"sanitizer fuzz on {device}: backends {backends}, {args.cases} cases each", flush=True)
    failures = 0
    start = time.perf_counter()
    for backend in backends:
        rng = random.Random(args.seed)
        for i in range(args.cases):
            case = draw_case(rng, i)
            label = f"{backend:<7}{describe(case)}"
            print(label, flush=True)  # before the launch: a sanitizer report follows its case
            try:
                problem = run_case(case, backend, device)
            except Exception as err:  # noqa: BLE001 - report, go on with the next case
                problem = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
            if problem:
                failures += 1
                print(f"    FAIL {problem}", flush=True)
    print(f"{failures} failing case(s) of {args.cases * len(backends)} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
