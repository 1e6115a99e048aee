"""Temperature calibration against the golden optimum, bounds, and collect_logits."""
import math

import pytest
import torch

import mitkernels
from mitkernels import reference

from conftest import cpu_backends


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case_index", range(3))
def test_matches_golden_optimum(golden_calibration, backend, case_index):
    case = golden_calibration["cases"][case_index]
    logits = torch.tensor(case["logits"], dtype=torch.float64)
    labels = torch.tensor(case["labels"])
    t = mitkernels.calibrate_temperature(logits, labels, backend=backend)
    assert math.isfinite(float(t))
    assert float(t) == pytest.approx(case["optimum_T_in_bounds"], rel=1e-4)
    # It is a minimum: the NLL is no lower a little to either side.
    nll = lambda v: float(reference.nll_at_temperature(logits, labels, v))
    assert nll(float(t)) <= min(nll(float(t) * 1.001), nll(float(t) / 1.001))


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
@pytest.mark.parametrize("case_index", range(3))
def test_kernels_find_the_reference_backends_optimum_in_few_passes(golden_calibration, backend,
                                                                   case_index, monkeypatch):
    # The golden optimum is itself 6e-9 to 3e-7 off (an L-BFGS fit), so rel=1e-4 above cannot
    # tell a float32 tau in the kernels' pass (T 3e-8 off) or Newton dropped for bisection
    # (the same T after 3-5x the passes). Against the reference backend's own Newton: 1e-10.
    from mitkernels import calibration

    case = golden_calibration["cases"][case_index]
    logits = torch.tensor(case["logits"], dtype=torch.float64)
    labels = torch.tensor(case["labels"])
    want = mitkernels.calibrate_temperature(logits, labels, backend="reference")
    passes = []
    real = calibration._slope_and_curvature
    monkeypatch.setattr(calibration, "_slope_and_curvature",
                        lambda *a, **k: passes.append(1) or real(*a, **k))
    got = mitkernels.calibrate_temperature(logits, labels, backend=backend)
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    assert len(passes) <= 20


def test_float32_logits(golden_calibration):
    case = golden_calibration["cases"][0]
    t = mitkernels.calibrate_temperature(torch.tensor(case["logits"], dtype=torch.float32),
                                         torch.tensor(case["labels"]))
    assert float(t) == pytest.approx(case["optimum_T_in_bounds"], rel=1e-4)


def test_no_skill_stays_bounded():
    # Labels independent of the logits: the NLL falls as T grows; the published L-BFGS stored
    # tau = inf for such models. Here T stops at the bound.
    torch.manual_seed(0)
    logits = torch.randn(500, 4, dtype=torch.float64).sign() * 1e-3
    labels = torch.randint(0, 4, (500,))
    labels = torch.where(logits.argmax(1) == labels, (labels + 1) % 4, labels)
    t = mitkernels.calibrate_temperature(logits, labels, bounds=(1e-3, 500.0))
    assert math.isfinite(float(t)) and 1e-3 <= float(t) <= 500.0
    crit = mitkernels.MiTLoss(4)
    crit.calibrate_(logits, labels)
    assert math.isfinite(float(crit.tau.detach()))
    assert float(crit.temperature) == pytest.approx(float(t), rel=1e-5)


def test_bounds_are_respected():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])  # perfectly separable: NLL falls towards T -> 0
    assert float(mitkernels.calibrate_temperature(logits, labels, bounds=(0.5, 5.0))) == 0.5


def test_bad_input():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*found 2"):
        mitkernels.calibrate_temperature(torch.randn(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        mitkernels.calibrate_temperature(torch.randn(2, 2), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="not ignore_index"):
        mitkernels.calibrate_temperature(torch.randn(2, 2), torch.tensor([-100, -100]))
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pairs"):
        mitkernels.collect_logits(torch.nn.Linear(3, 2), [{"x": torch.randn(2, 3)}])
    with pytest.raises(ValueError, match="finite"):
        mitkernels.calibrate_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="bounds"):
        mitkernels.calibrate_temperature(torch.randn(3, 2), torch.tensor([0, 1, 0]),
                                         bounds=(2.0, 1.0))
    # each below was taken: integer logits by the reference (21.03 for one batch) where the
    # kernels raised from the op; max_iter=0 returned the upper bound as the optimum; a
    # 5-class batch calibrated a 3-class loss
    y = torch.tensor([0, 1, 0])
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64"):
        mitkernels.calibrate_temperature(torch.randint(-3, 3, (3, 2)), y, backend="reference")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
            mitkernels.calibrate_temperature(torch.randn(3, 2), y, max_iter=bad)
    with pytest.raises(ValueError, match="tol must be finite"):
        mitkernels.calibrate_temperature(torch.randn(3, 2), y, tol=float("nan"))
    crit = mitkernels.MiTLoss(3)
    with pytest.raises(ValueError, match="C = 5 classes"):
        crit.calibrate_(torch.randn(3, 5), y)
    assert float(crit.temperature) == pytest.approx(1.0)


def test_large_input_is_fast_enough_to_run_here():
    # A million rows take one pass per Newton step; this checks correctness at scale, cheaply.
    torch.manual_seed(1)
    labels = torch.randint(0, 10, (200_000,))
    logits = torch.randn(200_000, 10) + 3 * torch.nn.functional.one_hot(labels, 10)
    t = mitkernels.calibrate_temperature(logits, labels)
    nll = lambda v: float(reference.nll_at_temperature(logits, labels, v))
    assert nll(float(t)) <= min(nll(float(t) * 1.01), nll(float(t) / 1.01))


def test_collect_logits_restores_mode():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    model.train()
    loader = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    logits, labels = mitkernels.collect_logits(model, loader)
    assert logits.shape == (12, 2) and labels.shape == (12,)
    assert not logits.requires_grad and model.training
    again, _ = mitkernels.collect_logits(model, loader)
    assert torch.equal(logits, again)  # eval mode: dropout off, deterministic
    model.eval()
    mitkernels.collect_logits(model, loader)
    assert not model.training


def test_collect_logits_takes_tuple_and_dict_inputs_and_list_labels():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    model = TwoInputs()
    x, z = torch.randn(5, 3), torch.randn(5, 4)
    want = model(x, z).detach()
    for inputs in ((x, z), [x, z], {"x": x, "z": z}):
        logits, labels = mitkernels.collect_logits(model, [(inputs, [0, 1, 1, 0, 1])])
        assert torch.equal(logits, want) and labels.tolist() == [0, 1, 1, 0, 1]

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="returns the logits tensor"):
        mitkernels.collect_logits(Pair(), [(x, torch.zeros(5, dtype=torch.long))])


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_masked_classes_take_no_part(backend):
    # A -inf logit (a class ruled out for that sample) was refused ("logits must be finite").
    # -1e6 in its place is the oracle: exp(-1e6 / 500) is 0 in float64.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(60, 6, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 6, (60,), generator=gen)
    logits[torch.arange(60), labels] += 1.0
    mask = torch.rand(60, 6, generator=gen) < 0.3
    mask[torch.arange(60), labels] = False
    got = mitkernels.calibrate_temperature(logits.masked_fill(mask, -math.inf), labels,
                                           backend=backend)
    want = mitkernels.calibrate_temperature(logits.masked_fill(mask, -1e6), labels,
                                            backend=backend)
    assert 0.01 < float(want) < 100.0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0.0)
    at_label = logits.clone()
    at_label[0, labels[0]] = -math.inf
    with pytest.raises(ValueError, match="label's logit is -inf"):
        mitkernels.calibrate_temperature(at_label, labels, backend=backend)
    # rows equal but for their masked classes: no temperature is better (it fell to T_min)
    equal = torch.zeros(8, 3, dtype=torch.float64)
    equal[:, 2] = -math.inf
    with pytest.warns(UserWarning, match="does not depend on T"):
        assert float(mitkernels.calibrate_temperature(equal, torch.tensor([0, 1] * 4),
                                                      backend=backend)) == 1.0
    # ... and rows varied but masked, among equal ones, are calibrated (not taken for equal)
    mixed = equal.clone()
    mixed[0, 1] = 3.0
    assert float(mitkernels.calibrate_temperature(mixed, torch.tensor([0, 1] * 4),
                                                  backend=backend)) != 1.0
    with pytest.raises(ValueError, match="need a kernel backend"):
        mitkernels.calibrate_temperature(logits.masked_fill(mask, -math.inf), labels,
                                         backend="reference")


def test_calibrate_warns_on_bound_and_uses_the_module_backend(monkeypatch):
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    crit = mitkernels.MiTLoss(2, backend="reference")
    seen = {}
    real = mitkernels.modules.calibrate_temperature

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mitkernels.modules, "calibrate_temperature", spy)
    with pytest.warns(UserWarning, match="bound"):
        crit.calibrate_(logits, torch.tensor([0, 1]))
    assert seen["backend"] == "reference"


def test_ignored_rows_and_spatial_logits():
    """Rows labelled ignore_index are left out, and [N, C, d] logits calibrate as their rows."""
    torch.manual_seed(3)
    labels = torch.randint(0, 5, (4, 6))
    logits = torch.randn(4, 5, 6, dtype=torch.float64) + \
        2 * torch.nn.functional.one_hot(labels, 5).movedim(-1, 1)
    rows = logits.movedim(1, -1).reshape(-1, 5)
    t_rows = mitkernels.calibrate_temperature(rows, labels.reshape(-1))
    assert float(mitkernels.calibrate_temperature(logits, labels)) == float(t_rows)
    ignored = labels.clone()
    ignored[0] = -100
    t_kept = mitkernels.calibrate_temperature(rows[6:], labels.reshape(-1)[6:])
    assert float(mitkernels.calibrate_temperature(logits, ignored)) == float(t_kept)
    crit = mitkernels.MiTLoss(5, ignore_index=7)
    ignored[0] = 7
    assert float(crit.calibrate_(logits, ignored)) == float(t_kept)


def test_calibrate_warns_at_the_lower_bound_with_its_own_reason():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    with pytest.warns(UserWarning, match="lower bound.*separate") as record:
        mitkernels.MiTLoss(2).calibrate_(logits, torch.tensor([0, 1]))
    assert record[0].filename == __file__  # the warning points at the caller's line


@pytest.mark.parametrize("backend", [None, "reference"])
def test_equal_logits_keep_t_at_one_with_their_own_warning(backend):
    # A zero-initialised head: softmax(x / T) is uniform whatever T, so the NLL is flat. The
    # result is T = 1 (the logits left as they are), not a bound, whose warning would blame
    # perfectly separated labels.
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(0))
    for logits in (torch.zeros(64, 3), torch.full((64, 3), 2.5).add_(torch.arange(64.)[:, None])):
        with pytest.warns(UserWarning, match="logits are equal") as record:
            t = mitkernels.calibrate_temperature(logits, labels, backend=backend)
        assert float(t) == 1.0
        assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="logits are equal"):
        t = mitkernels.calibrate_temperature(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]),
                                             bounds=(2.0, 5.0))
    assert float(t) == 2.0
    crit = mitkernels.MiTLoss(3)
    with pytest.warns(UserWarning, match="logits are equal") as record:
        crit.calibrate_(torch.zeros(64, 3), labels)
    assert len(record) == 1 and record[0].filename == __file__  # and not the lower bound's
    assert float(crit.temperature) == pytest.approx(1.0, rel=1e-6)


def test_the_reference_backend_finds_the_optimum_under_wide_bounds():
    # From 1e-9 to 1e9 the search visits huge T, where CE and H both sit near log C: the
    # reference took CE - H as their difference in float32 and lost the slope's sign there,
    # returning the bound (1e9) where the optimum is 2.66. It now forms E_p[z] - z_y, as the
    # kernels do.
    torch.manual_seed(0)
    x = torch.randn(64, 5) * 2
    y = torch.randint(0, 5, (64,))
    x[torch.arange(64), y] += 1.5
    narrow = mitkernels.calibrate_temperature(x, y, backend="reference")
    assert 1.0 < float(narrow) < 10.0
    for backend in cpu_backends():
        wide = mitkernels.calibrate_temperature(x, y, bounds=(1e-9, 1e9), backend=backend)
        assert float(wide) == pytest.approx(float(narrow), rel=1e-6), backend
