"""The eager reference against the published code's golden outputs."""
import math

import pytest
import torch

from mitkernels import reference
from mitkernels.state import initial_buffers


def _replay(case, step_fn):
    num_classes = case["num_classes"]
    tau = torch.tensor(case["tau0"], dtype=torch.float64, requires_grad=True)
    buffers = initial_buffers(num_classes)
    for step in case["steps"]:
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        targets = torch.tensor(step["targets"])
        tau.grad = None
        loss, stats = step_fn(logits, targets, tau, buffers)
        loss.backward()
        yield step, loss.detach(), stats, logits.grad, tau.grad


@pytest.mark.parametrize("case_index", range(4))
def test_reference_matches_published_trajectory(golden_trajectory, case_index):
    case = golden_trajectory["cases"][case_index]

    def step_fn(logits, targets, tau, b):
        return reference.mit_step(logits, targets, tau, b["class_counts"], b["total_seen"],
                                  b["lambda_entropy"], b["dual_updates"])

    for step, loss, stats, grad_logits, grad_tau in _replay(case, step_fn):
        for key in ("ce", "H", "H_star", "lambda", "T"):
            assert float(stats[key]) == pytest.approx(step[key], abs=1e-10), key
        assert float(loss) == pytest.approx(step["loss"], abs=1e-10)
        assert float(grad_tau) == pytest.approx(step["grad_tau"], abs=1e-10)
        if "grad_logits" in step:
            expected = torch.tensor(step["grad_logits"], dtype=torch.float64)
            torch.testing.assert_close(grad_logits, expected, atol=1e-10, rtol=0)


def test_first_step_overwrites_lambda():
    # The published dual_updates buffer starts at 0: the first step's lambda ignores the initial 0.1.
    b = initial_buffers(3)
    logits = torch.zeros(4, 3, dtype=torch.float64)  # uniform predictions: H = log 3 = H_max
    reference.mit_step(logits, torch.tensor([0, 1, 2, 0]), torch.tensor(0.0), b["class_counts"],
                       b["total_seen"], b["lambda_entropy"], b["dual_updates"])
    assert float(b["lambda_entropy"]) == 0.0  # H >= H* so d = 0, and 0.1 is forgotten
    assert int(b["dual_updates"]) == 1
    assert b["class_counts"].tolist() == [3.0, 2.0, 2.0]
    assert float(b["total_seen"]) == 4.0


def test_ignore_index_rows_take_no_part():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)
    targets = torch.tensor([0, -100, 2, 3, -100, 1])
    keep = targets != -100
    b1, b2 = initial_buffers(4), initial_buffers(4)
    tau = torch.tensor(0.2, dtype=torch.float64)
    loss1, s1 = reference.mit_step(logits, targets, tau, *b1.values())
    loss2, s2 = reference.mit_step(logits[keep], targets[keep], tau, *b2.values())
    torch.testing.assert_close(loss1, loss2)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k])


def test_reductions_agree():
    torch.manual_seed(1)
    logits = torch.randn(5, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, -100, 1])
    tau = torch.tensor(0.0, dtype=torch.float64)
    out = {}
    for red in ("mean", "sum", "none"):
        b = initial_buffers(3)
        out[red], _ = reference.mit_step(logits, targets, tau, *b.values(), reduction=red)
    assert out["none"].shape == (5,) and float(out["none"][3]) == 0.0
    torch.testing.assert_close(out["none"].sum(), out["sum"])
    torch.testing.assert_close(out["sum"] / 4, out["mean"])


def test_spatial_logits_equal_flattened_rows():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (2, 4, 5))
    rows, flat = reference.flatten_rows(logits, targets)
    tau = torch.tensor(0.1, dtype=torch.float64)
    b1, b2 = initial_buffers(3), initial_buffers(3)
    l1, _ = reference.mit_step(logits, targets, tau, *b1.values())
    l2, _ = reference.mit_step(rows, flat, tau, *b2.values())
    torch.testing.assert_close(l1, l2)


def test_nonfinite_batch_leaves_state():
    b = initial_buffers(3)
    before = {k: v.clone() for k, v in b.items()}
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    loss, stats = reference.mit_step(logits, torch.tensor([0, 1]), torch.tensor(0.0), *b.values())
    assert math.isnan(float(loss)) and not bool(stats["updated"])
    for k in b:
        assert torch.equal(b[k], before[k])


def test_row_statistics_match_definitions():
    torch.manual_seed(3)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    rows = reference.row_statistics(x, y, 0.7)
    p = torch.softmax(x / 0.7, 1)
    z = x / 0.7
    var = (p * z * z).sum(1) - (p * z).sum(1) ** 2
    torch.testing.assert_close(rows["V"], var)
    torch.testing.assert_close(rows["CE"], torch.nn.functional.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(rows["CE_minus_H"], rows["CE"] - rows["H"])


def test_int32_targets_compare_with_ignore_index_in_64_bits():
    # 2**32 + 1 wraps to 1 in int32: class-1 rows must not be taken for ignored ones.
    torch.manual_seed(2)
    logits = torch.randn(6, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 1, 0, 2])
    results = []
    for y in (targets, targets.int()):
        b = initial_buffers(3)
        loss, stats = reference.mit_step(logits, y, torch.zeros(1), b["class_counts"],
                                         b["total_seen"], b["lambda_entropy"], b["dual_updates"],
                                         ignore_index=2 ** 32 + 1)
        results.append((loss, stats["valid"], b["class_counts"]))
    assert float(results[1][1]) == 6.0
    for x, y in zip(*results):
        assert torch.equal(x, y)
