"""GPU: a whole training step in a CUDA graph, compile and autocast on CUDA (skipped without CUDA)."""
import pytest
import torch

import mitkernels

from conftest import cuda_backends, requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]
BACKENDS = cuda_backends() or ["triton"]


# launch "cpp": the Triton step through launch plans (mitkernels/triton/launch_plans.py), whose
# C++ replay allocates and launches inside the capture
@pytest.mark.parametrize("backend,launch", [(b, "python") for b in BACKENDS] + [("triton", "cpp")])
def test_training_step_captures_and_replays(monkeypatch, backend, launch):
    if backend not in BACKENDS or (launch == "cpp" and "cuda" not in BACKENDS):
        pytest.skip("needs the backend (plans: and the extension's CUDA part, which launches)")
    monkeypatch.setenv("MITKERNELS_TRITON_LAUNCH", launch)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Linear(32, 5).to(dev)
    crit = mitkernels.MiTLoss(5, backend=backend).to(dev)
    opt = torch.optim.SGD([*model.parameters(), *crit.parameters()], lr=0.05)
    static_x = torch.randn(64, 32, device=dev)
    static_y = torch.randint(0, 5, (64,), device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        loss, stats = crit(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss, stats

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up (also compiles the Triton kernels)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_stats = step()
    before = int(crit.dual_updates)
    counts_before = crit.class_counts.clone()
    tau_before = crit.tau.detach().clone()
    for i in range(4):
        static_x.copy_(torch.randn(64, 32, device=dev))
        graph.replay()
    torch.cuda.synchronize()
    assert int(crit.dual_updates) == before + 4
    expected = counts_before + 4 * torch.bincount(static_y, minlength=5).double()
    torch.testing.assert_close(crit.class_counts, expected)
    assert not torch.equal(crit.tau.detach(), tau_before)  # tau learns on replay
    assert torch.isfinite(static_loss).all()
    if launch == "cpp":  # plans served the captured step
        from mitkernels.triton import launch_plans

        info = launch_plans.info()
        assert info.get("hits", 0) > 0 and info.get("refused", 0) == 0, info


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_on_cuda(backend):
    torch.manual_seed(1)
    dev = torch.device("cuda")
    model = torch.nn.Linear(16, 7).to(dev)
    c1 = mitkernels.MiTLoss(7, backend=backend).to(dev)
    c2 = mitkernels.MiTLoss(7, backend=backend).to(dev)
    compiled = torch.compile(lambda c, x, y: c(model(x), y), fullgraph=True)
    for _ in range(2):
        x, y = torch.randn(32, 16, device=dev), torch.randint(0, 7, (32,), device=dev)
        l1, _ = c1(model(x), y)
        l2, _ = compiled(c2, x, y)
        torch.testing.assert_close(l2, l1)
    for k, v in c1.state_dict().items():
        torch.testing.assert_close(c2.state_dict()[k], v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(backend, dtype):
    torch.manual_seed(2)
    dev = torch.device("cuda")
    model = torch.nn.Linear(16, 9).to(dev)
    x, y = torch.randn(64, 16, device=dev), torch.randint(0, 9, (64,), device=dev)
    with torch.autocast("cuda", dtype=dtype):
        logits = model(x)
        loss, _ = mitkernels.mit_loss(logits, y, mitkernels.MiTState(9, device=dev),
                                      backend=backend)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    ref, _ = mitkernels.mit_loss(logits.float(), y, mitkernels.MiTState(9, device=dev),
                                 backend="reference")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_on_gpu_are_flagged_not_read(backend):
    dev = torch.device("cuda")
    crit = mitkernels.MiTLoss(4, backend=backend).to(dev)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    y = torch.tensor([0, 1, 7, 2, -3], device=dev)
    loss, stats = crit(torch.randn(5, 4, device=dev), y)
    torch.cuda.synchronize()
    assert torch.isnan(loss) and float(stats["invalid_targets"]) == 2.0
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k
