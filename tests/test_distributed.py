"""Two gloo processes on this machine hold identical state, equal to one process on the whole batch."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mitkernels
from mitkernels import _backends

WORLD = 2
STEPS = 4
NUM_CLASSES = 5
BATCH_PER_RANK = 6

needs_kernels = pytest.mark.skipif(
    _backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="the distributed path runs on the kernel backends (C++ extension not built)")


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(STEPS):
        logits = torch.randn(WORLD * BATCH_PER_RANK, NUM_CLASSES, generator=g, dtype=torch.float64)
        targets = torch.randint(0, NUM_CLASSES, (WORLD * BATCH_PER_RANK,), generator=g)
        targets[step] = -100  # an ignored row on rank 0 only: unequal valid counts across ranks
        out.append((logits, targets))
    return out


def _train(criterion, batches, rank=None, functional=False):
    opt = torch.optim.SGD([criterion.tau], lr=0.5)
    for logits, targets in batches:
        if rank is not None:
            rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
            logits, targets = logits[rows], targets[rows]
        opt.zero_grad()
        x = logits.clone().requires_grad_(True)
        if functional:
            loss, _ = mitkernels.mit_loss(x, targets, criterion, backend="cpu",
                                          process_group=dist.group.WORLD)
        else:
            loss, _ = criterion(x, targets)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in criterion.state_dict().items()}


def _worker(rank, path, out_dir, functional):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        crit = mitkernels.MiTLoss(NUM_CLASSES, backend="cpu",
                                  process_group=dist.group.WORLD).double()
        state = _train(crit, _batches(), rank=rank, functional=functional)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_kernels
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_two_ranks_equal_one_process_on_global_batch(functional):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(os.path.join(out_dir, "store"), out_dir, functional),
                 nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    single = _train(mitkernels.MiTLoss(NUM_CLASSES, backend="cpu").double(), _batches())
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
        torch.testing.assert_close(ranks[0][key], single[key], atol=1e-12, rtol=1e-12)
    assert int(single["dual_updates"]) == STEPS
    assert float(single["total_seen"]) == STEPS * (WORLD * BATCH_PER_RANK - 1)


def test_process_group_without_init_is_a_clear_error():
    crit = mitkernels.MiTLoss(3, process_group=object())
    if _backends.unavailable_reason("cpu", torch.device("cpu")) is None:
        with pytest.raises(RuntimeError, match="not initialized"):
            crit(torch.randn(2, 3), torch.tensor([0, 1]))
    else:
        with pytest.raises(ValueError, match="process_group needs a kernel backend"):
            crit(torch.randn(2, 3), torch.tensor([0, 1]))


@needs_kernels
def test_a_none_loss_warns_that_tau_gradient_is_the_ranks_own():
    # With reduction='none' the per-element gradient the loss receives is local, so tau's
    # gradient is the rank's own: said once, at the caller's line; 'mean' is global and silent.
    import warnings

    with tempfile.TemporaryDirectory() as out_dir:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                                rank=0, world_size=1)
        try:
            x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
            with pytest.warns(UserWarning, match="tau's gradient is this rank's") as record:
                mitkernels.MiTLoss(3, reduction="none", process_group=dist.group.WORLD)(x, y)
            assert record[0].filename == __file__
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                mitkernels.MiTLoss(3, process_group=dist.group.WORLD)(x, y)
        finally:
            dist.destroy_process_group()
