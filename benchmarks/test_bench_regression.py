"""pytest-benchmark twin of ``bench_mit_loss``: a few shapes, tracked across commits.

    pytest benchmarks/ --benchmark-only                       (make bench-regress)
    pytest benchmarks/ --benchmark-only --benchmark-autosave  then  --benchmark-compare

Each test first checks its provider against the eager step on a fresh state (a regression in the
numbers fails here, before any timing), then times one step on a persistent state. Without
``--benchmark-only`` the same tests run as ordinary tests (each benchmark a few rounds);
``--benchmark-disable`` runs every step once, as a smoke test. ``make test`` does not collect
this folder (``testpaths = ["tests"]``).
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from benchmarks import bench_mit_loss as bench  # noqa: E402
from mitkernels import _backends  # noqa: E402
from mitkernels.state import MiTState  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    SHAPES = [bench.Shape("medical", 256, 5), bench.Shape("mid", 1024, 1000),
              bench.Shape("large", 4096, 32000),
              bench.Shape("segmentation", 16, 5, spatial=(256, 256))]
    DTYPES = ["fp32", "bf16"]
else:
    # Small enough that the eager step stays well under a second a call on two cores.
    SHAPES = [bench.Shape("medical", 256, 5), bench.Shape("mid", 1024, 1000),
              bench.Shape("large", 256, 32000),
              bench.Shape("segmentation", 4, 5, spatial=(64, 64))]
    DTYPES = ["fp32"]


def _kernel_backends():
    names = []
    for name in ("cpu", "cuda", "triton"):
        if _backends.unavailable_reason(name, DEVICE) is not None:
            continue
        if name == "triton" and DEVICE.type == "cpu":
            continue  # the interpreter is for tests, not timing
        names.append(name)
    return names


PROVIDERS = ["eager", "compiled", *_kernel_backends(), "torch_ce"]
_COMPILED = bench.CompiledProvider()  # one compiled callable per case, shared by the tests


def _provider(name: str) -> bench.Provider:
    if name == "eager":
        return bench.EagerProvider()
    if name == "compiled":
        return _COMPILED
    if name == "torch_ce":
        return bench.TorchCEProvider()
    return bench.KernelProvider(name)


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(shape, dtype_name):
        key = (shape, dtype_name)
        if key not in cache:
            cache.clear()  # one set of logits alive at a time
            cache[key] = bench.make_inputs(shape, bench.DTYPES[dtype_name], DEVICE, seed=0)
        return cache[key]

    return get


def _timed(step):
    if DEVICE.type == "cuda":
        def call():
            step()
            torch.cuda.synchronize()
        return call
    return step


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_mit_step(benchmark, inputs, shape, dtype_name, provider_name, mode):
    if provider_name == "compiled" and mode == "fwd" and DEVICE.type == "cpu":
        pytest.skip("compile time on CPU: the compiled step is tracked in fwdbwd only")
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    bench.configure_dynamo()
    x, y = inputs(shape, dtype_name)
    x.requires_grad_(mode == "fwdbwd")
    case = bench.Case(shape, dtype_name, mode, DEVICE, x, y)
    provider = _provider(provider_name)

    if provider.is_mit and provider_name != "eager":
        ref_state = MiTState(shape.c, device=DEVICE)
        ref_step = bench.EagerProvider().make(case, ref_state)
        ref = bench._snapshot(ref_step(), ref_state, DEVICE, big=False)
        state = MiTState(shape.c, device=DEVICE)
        err = bench._compare(provider.make(case, state)(), state, ref)
        assert err <= bench.ERROR_TOL[case.dtype], f"{provider_name}: relative error {err:.2e}"

    state = MiTState(shape.c, device=DEVICE) if provider.is_mit else None
    step = provider.make(case, state)
    step()  # warm: compiles, allocator, thread pool

    benchmark.group = f"{shape.label} {dtype_name} {mode}"
    benchmark.extra_info.update(device=bench.device_name(DEVICE), n=shape.n, c=shape.c,
                                spatial=list(shape.spatial), dtype=dtype_name, mode=mode, provider=provider_name,
                                bytes=int(x.numel() * x.element_size() * bench.TRAFFIC[mode]))
    benchmark.pedantic(_timed(step), rounds=_rounds(shape), warmup_rounds=1, iterations=1)


def _rounds(shape: bench.Shape) -> int:
    # Enough rounds for a stable median, bounded time on a small CPU.
    elements = shape.numel
    if DEVICE.type == "cuda":
        return 50
    return 30 if elements < 1_000_000 else 8
