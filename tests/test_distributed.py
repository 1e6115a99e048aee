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


def _spawn(worker, *args):
    """``worker(rank, store_path, out_dir, *args)`` on WORLD gloo processes; what each rank saved
    to ``out_dir/rank<r>.pt``, by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(os.path.join(out_dir, "store"), out_dir, *args), nprocs=WORLD,
                 join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


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
    ranks = _spawn(_worker, functional)
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
    with pytest.raises(RuntimeError, match="not initialized"):
        mitkernels.calibrate_temperature(torch.randn(2, 3), torch.tensor([0, 1]),
                                         backend="reference", process_group=object())


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


def _calibration_worker(rank, path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        logits, labels = _calibration_data()
        half = logits.shape[0] // 2
        rows = slice(0, half) if rank == 0 else slice(half, None)
        results = {}
        crit = mitkernels.MiTLoss(NUM_CLASSES, backend="cpu", process_group=dist.group.WORLD)
        results["split"] = crit.calibrate_(logits[rows], labels[rows])
        results["tau"] = crit.tau.detach().clone()
        # rank 1 holds no row: the optimum is rank 0's rows'
        mine = slice(None) if rank == 0 else slice(0, 0)
        results["one_rank"] = mitkernels.calibrate_temperature(
            logits[mine], labels[mine], backend="cpu", process_group=dist.group.WORLD)
        # rank 1 holds a label out of range: both ranks raise (rank 0 alone would wait forever)
        bad = labels[rows].clone()
        if rank == 1:
            bad[0] = NUM_CLASSES
        try:
            mitkernels.calibrate_temperature(logits[rows], bad, backend="cpu",
                                             process_group=dist.group.WORLD)
            results["raised"] = ""
        except ValueError as e:
            results["raised"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _calibration_data():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, NUM_CLASSES, (40,), generator=g)
    logits = torch.randn(40, NUM_CLASSES, generator=g, dtype=torch.float64)
    logits[torch.arange(40), labels] += 1.5  # some skill: an interior optimum
    return logits, labels


@needs_kernels
def test_calibration_over_ranks_is_that_of_all_their_rows():
    # calibrate_ ignored its process_group: each rank took its own rows' optimum, and the ranks'
    # tau stayed apart for good (the gradients that follow are the same on every rank).
    ranks = _spawn(_calibration_worker)
    logits, labels = _calibration_data()
    whole = mitkernels.calibrate_temperature(logits, labels, backend="cpu")
    assert 0.01 < float(whole) < 100.0
    for r in ranks:
        torch.testing.assert_close(r["split"], whole, rtol=1e-9, atol=0.0)
        assert torch.equal(r["tau"], ranks[0]["tau"])
        torch.testing.assert_close(r["one_rank"], whole, rtol=1e-9, atol=0.0)
        assert "labels must lie" in r["raised"] or "another rank" in r["raised"], r["raised"]
    assert "labels must lie" in ranks[1]["raised"] and "another rank" in ranks[0]["raised"]


def _edge_worker(rank, path, out_dir):
    from datetime import timedelta

    # A short timeout: a deadlock fails the collective (and the test) instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    results = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = ""
        except ValueError as e:
            results[name] = str(e)

    try:
        x = torch.randn(4, NUM_CLASSES)
        good = torch.tensor([0, 1, 2, 3])
        bad = torch.tensor([0, NUM_CLASSES + 2, 2, 3])
        crit = mitkernels.MiTLoss(NUM_CLASSES, backend="cpu", process_group=dist.group.WORLD)
        before = {k: v.clone() for k, v in crit.state_dict().items()}
        # an invalid target on rank 1 only: every rank raises, none updates its state
        attempt("invalid", lambda: crit(x, bad if rank == 1 else good))
        # ... and so does a rank with an empty batch (it returned a NaN loss and went on)
        attempt("invalid_empty", lambda: crit(x[:0] if rank == 0 else x,
                                              good[:0] if rank == 0 else bad))
        results["untouched"] = all(torch.equal(v, before[k])
                                   for k, v in crit.state_dict().items())
        # evaluation on rank 0 alone: no state update, no gradient, so no collective to wait on
        if rank == 0:
            crit.eval()
            with torch.no_grad():
                loss, stats = crit(x, good)
            results["eval_valid"] = float(stats["valid"])
            crit.train()
        # a rank outside the loss's group gets told so
        sub = dist.new_group([0])
        attempt("non_member", lambda: mitkernels.MiTLoss(
            NUM_CLASSES, backend="cpu", process_group=sub)(x, good) if rank == 1 else None)
        # calibration too: torch's all-reduce only warned there, and the rank calibrated alone
        attempt("calibrate_non_member", lambda: mitkernels.calibrate_temperature(
            x, good, backend="cpu", process_group=sub) if rank == 1 else None)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_kernels
def test_one_ranks_bad_targets_eval_and_group_membership():
    ranks = _spawn(_edge_worker)
    # rank 0's check indexed an empty selection (IndexError); an empty rank 0 returned NaN
    assert "found 7" in ranks[1]["invalid"] and "another rank" in ranks[0]["invalid"]
    assert "found 7" in ranks[1]["invalid_empty"] and "another rank" in ranks[0]["invalid_empty"]
    assert ranks[0]["untouched"] and ranks[1]["untouched"]
    assert ranks[0]["eval_valid"] == 4.0  # the rank's own rows: it ran alone
    assert "not a member" in ranks[1]["non_member"] and ranks[0]["non_member"] == ""
    assert "not a member" in ranks[1]["calibrate_non_member"]


def _gradient_worker(rank, path, out_dir):
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    group = dist.group.WORLD
    make = lambda: mitkernels.MiTLoss(NUM_CLASSES, backend="cpu", process_group=group).double()
    rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    logits, targets = _batches()[0]
    x, y = logits[rows], targets[rows]
    out = {}
    try:
        # a training step
        crit = make()
        xg = x.clone().requires_grad_(True)
        crit(xg, y)[0].backward()
        out["x_grad"], out["tau_grad"] = xg.grad, crit.tau.grad.clone()
        # frozen logits (a frozen backbone's features): tau still learns
        crit = make()
        crit(x, y)[0].backward()
        out["frozen_tau_grad"] = None if crit.tau.grad is None else crit.tau.grad.clone()
        # evaluation with a tau gradient: no state update, but a global gradient to agree on
        crit = make().eval()
        loss, stats = crit(x.clone().requires_grad_(True), y)
        loss.backward()
        out["eval_tau_grad"], out["eval_valid"] = crit.tau.grad.clone(), float(stats["valid"])
        # labels kept from an inference_mode pass
        with torch.inference_mode():
            y_inference = y.clone()
        crit = make()
        crit(x.clone().requires_grad_(True), y_inference)[0].backward()
        out["inference_state"] = {k: v.clone() for k, v in crit.state_dict().items()}
        out["inference_tau_grad"] = crit.tau.grad.clone()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_kernels
def test_gradients_over_ranks_against_one_process():
    """The distributed step's gradients against the reference on the global batch: tau's is the
    global batch's on every rank, the logits' the rank's own loss's (scaled by its own valid
    rows, so that DDP's average is the global one for equal batches). With frozen logits, in
    evaluation, and with labels from inference_mode too. Mutation testing found none of these
    checked: only the states after training were."""
    ranks = _spawn(_gradient_worker)
    logits, targets = _batches()[0]
    ref = mitkernels.MiTLoss(NUM_CLASSES, backend="reference").double()
    x = logits.clone().requires_grad_(True)
    ref(x, targets)[0].backward()
    ref_eval = mitkernels.MiTLoss(NUM_CLASSES, backend="reference").double().eval()
    loss, _ = ref_eval(logits.clone().requires_grad_(True), targets)
    loss.backward()
    valid = targets != -100
    tol = dict(atol=1e-12, rtol=1e-10)
    for rank, got in enumerate(ranks):
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        scale = float(valid.sum()) / float(valid[rows].sum())
        torch.testing.assert_close(got["x_grad"], scale * x.grad[rows], **tol)
        for key in ("tau_grad", "frozen_tau_grad", "inference_tau_grad"):
            assert got[key] is not None, key
            torch.testing.assert_close(got[key], ref.tau.grad, **tol)
        torch.testing.assert_close(got["eval_tau_grad"], ref_eval.tau.grad, **tol)
        assert got["eval_valid"] == float(valid.sum())
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got["inference_state"][k], v, **tol)
