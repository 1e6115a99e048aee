"""MiTState and the published state-dict conversion."""
import math

import pytest
import torch

import mitkernels
from mitkernels.state import convert_published_state_dict, inverse_softplus, tau_for_temperature


def test_initial_state_is_the_published_one():
    s = mitkernels.MiTState(4)
    assert s.class_counts.tolist() == [1.0] * 4 and s.class_counts.dtype == torch.float64
    assert float(s.total_seen) == 0.0 and float(s.lambda_entropy) == 0.1
    assert int(s.dual_updates) == 0 and s.dual_updates.dtype == torch.int64
    assert s.tau.is_leaf and s.tau.requires_grad


@pytest.mark.parametrize("t", [1e-3, 0.05, 1.0, 19.0, 21.0, 499.0, 500.0])
def test_tau_for_temperature_inverts_the_clamped_softplus(t):
    tau = torch.tensor(tau_for_temperature(t), dtype=torch.float64)
    assert float(mitkernels.reference.temperature(tau)) == pytest.approx(t, rel=1e-12)


def test_inverse_softplus_follows_torch_threshold():
    for t in (0.3, 5.0, 20.0, 20.5, 100.0):  # 20: torch's threshold is tau > 20, not >=
        x = torch.tensor(inverse_softplus(t), dtype=torch.float64)
        assert float(torch.nn.functional.softplus(x)) == pytest.approx(t, rel=1e-14)


@pytest.mark.parametrize("bad", [0.0, -1.0, 1e-4, 501.0, math.inf, math.nan])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        mitkernels.MiTState(3, temperature=bad)


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, "3"])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        mitkernels.MiTState(bad)


def test_state_dict_round_trip_and_published_dicts():
    s = mitkernels.MiTState(3)
    mitkernels.mit_loss(torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1]), s)
    other = mitkernels.MiTState(3)
    other.load_state_dict(s.state_dict())
    for k, v in s.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.warns(UserWarning, match="model"):
        other.load_state_dict({**s.state_dict(), "model.fc.weight": torch.zeros(2)})


def test_conversion_errors_name_the_problem():
    good = mitkernels.MiTState(3).state_dict()
    with pytest.raises(KeyError, match="lambda_entropy"):
        convert_published_state_dict({k: v for k, v in good.items() if k != "lambda_entropy"}, 3)
    with pytest.raises(ValueError, match="total_seen must hold one value"):
        convert_published_state_dict({**good, "total_seen": torch.zeros(2)}, 3)


@pytest.mark.parametrize("key,value,message", [
    ("class_counts", [1.0, -3.0, 2.0], "class_counts must be finite and non-negative"),
    ("class_counts", [1.0, float("nan"), 2.0], "class_counts must be finite"),
    ("class_counts", [0.0, 0.0, 0.0], "positive sum"),
    ("total_seen", -1.0, "total_seen must be finite and non-negative"),
    ("total_seen", float("inf"), "total_seen must be finite"),
    ("lambda_entropy", float("nan"), r"lambda_entropy must lie in \[0, 0.5\]"),
    ("lambda_entropy", -0.1, "lambda_entropy must lie in"),
    ("lambda_entropy", 0.7, "lambda_entropy must lie in"),
    ("dual_updates", -2, "dual_updates must be a non-negative whole number"),
    ("dual_updates", 2.5, "dual_updates must be a non-negative whole number"),
    # 1e30 passed (finite, whole) and wrapped to int64's minimum on the copy
    ("dual_updates", 1e30, "below 2"),
    # a NaN tau was loaded with a warning about T at its clamp; T and every loss are NaN
    ("tau", float("nan"), "tau is NaN"),
])
def test_a_state_no_step_can_reach_is_refused_and_nothing_loaded(key, value, message):
    # A NaN lambda or a negative count would be carried into every later step: refused when
    # loaded, through MiTState and through MiTLoss alike, before anything is copied.
    s = mitkernels.MiTState(3)
    mitkernels.mit_loss(torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1]), s)
    bad = {**s.state_dict(), key: torch.tensor(value, dtype=torch.float64)}
    target = mitkernels.MiTState(3)
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(bad)
    module = mitkernels.MiTLoss(3)
    module_before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        module.load_state_dict(bad)
    # a partial dict (strict=False) skipped every check: its entries are checked one by one
    with pytest.raises(ValueError, match=message):
        module.load_state_dict({key: bad[key]}, strict=False)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in module.state_dict().items():
        assert torch.equal(v, module_before[k]), k


def test_to_keeps_tau_a_leaf():
    s = mitkernels.MiTState(3).to("cpu")
    assert s.tau.is_leaf and s.tau.requires_grad


def test_to_keeps_the_tau_an_optimizer_holds():
    # to() made a new tau: an optimizer built before it stepped a tensor the loss no longer read,
    # and the temperature never trained, without an error.
    s = mitkernels.MiTState(3)
    opt = torch.optim.SGD(s.parameters(), lr=1.0)
    tau = s.tau
    s.tau.grad = torch.ones_like(s.tau)
    assert s.to("cpu") is s and s.tau is tau and s.tau.grad is not None
    loss, _ = mitkernels.mit_loss(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), s,
                                  backend="reference")
    opt.zero_grad()
    loss.backward()
    before = float(s.tau.detach())
    opt.step()
    assert float(s.tau.detach()) != before
    # a device whose tensors cannot take another's data (meta here; XLA alike): a new leaf
    meta = s.to("meta")
    assert meta.tau.device.type == "meta" and meta.tau.is_leaf and meta.tau.requires_grad
    assert meta.tau.grad.device.type == "meta" and meta.class_counts.device.type == "meta"


def test_to_refuses_a_dtype_and_keeps_the_state():
    # It used to cast every tensor, dual_updates included, and the next step then refused them.
    s = mitkernels.MiTState(3)
    before = s.state_dict()
    with pytest.raises(TypeError, match="takes a device"):
        s.to(torch.float32)
    for k, v in s.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


@pytest.mark.parametrize("make", [mitkernels.MiTState, mitkernels.MiTLoss, mitkernels.CCTEALLoss])
def test_num_classes_takes_any_integer_and_refuses_the_rest(make):
    # labels.max() + 1 is a tensor; numpy's integers come from datasets: both were refused
    np = pytest.importorskip("numpy")
    for n in (3, np.int64(3), torch.tensor(3)):
        built = make(n)
        assert built.num_classes == 3 and type(built.num_classes) is int
    for bad in (True, 1, 2.5, "3", torch.tensor(3.0), torch.tensor([3, 4]), torch.tensor(True)):
        with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
            make(bad)
