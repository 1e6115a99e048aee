"""MiTLoss / TETLoss / CCTEALLoss: the published state-dict format, training vs eval, resumption."""

import pytest
import torch

import mitkernels
from mitkernels import reference

from conftest import check_golden_step, cpu_backends

BACKENDS = cpu_backends()


def _criterion(case, backend):
    crit = mitkernels.MiTLoss(case["num_classes"], backend=backend).double()
    with torch.no_grad():
        crit.tau.fill_(case["tau0"])
    return crit


def _check_step(crit, step):
    logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
    crit.tau.grad = None
    loss, stats = crit(logits, torch.tensor(step["targets"]))
    loss.backward()
    check_golden_step(step, loss, stats, logits.grad, crit.tau.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_index", range(4))
def test_module_replays_golden_trajectory(golden_trajectory, backend, case_index):
    case = golden_trajectory["cases"][case_index]
    crit = _criterion(case, backend)
    for step in case["steps"]:
        _check_step(crit, step)


def _published_state_dict(crit, dtype=torch.float64):
    """What the published criterion's state_dict() holds: its buffers (in ``dtype``), its scalar
    tau, and the model it wrongly embedded under ``model.*``."""
    return {
        "tau": crit.tau.detach().clone().to(dtype),
        "class_counts": crit.class_counts.clone().to(dtype),
        "total_seen": crit.total_seen.clone().to(dtype),
        "lambda_entropy": crit.lambda_entropy.clone().to(dtype),
        "dual_updates": crit.dual_updates.clone(),
        "model.0.weight": torch.randn(4, 4),
        "model.0.bias": torch.randn(4),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_state_dict_resumes_exactly(golden_trajectory, backend):
    case = golden_trajectory["cases"][1]
    first = _criterion(case, backend)
    half = len(case["steps"]) // 2
    for step in case["steps"][:half]:
        _check_step(first, step)
    saved = _published_state_dict(first)
    resumed = mitkernels.MiTLoss(case["num_classes"], backend=backend).double()
    with pytest.warns(UserWarning, match="model"):
        result = resumed.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    for step in case["steps"][half:]:
        _check_step(resumed, step)


def test_published_float32_buffers_load_into_float64():
    crit = mitkernels.MiTLoss(3)
    saved = {"tau": torch.tensor(0.25), "class_counts": torch.tensor([16777217.0, 2.0, 3.0]),
             "total_seen": torch.tensor(20.0), "lambda_entropy": torch.tensor(0.125),
             "dual_updates": torch.tensor(7)}
    crit.load_state_dict(saved)
    assert crit.class_counts.dtype == torch.float64 and crit.dual_updates.dtype == torch.int64
    assert crit.class_counts.tolist() == [16777216.0, 2.0, 3.0]  # float32 had already rounded
    assert int(crit.dual_updates) == 7 and float(crit.tau.detach()) == 0.25


def test_wrong_class_count_in_state_dict_is_a_clear_error():
    crit = mitkernels.MiTLoss(3)
    saved = mitkernels.MiTLoss(4).state_dict()
    with pytest.raises(ValueError, match="4 entries"):
        crit.load_state_dict(saved)


def test_round_trip_state_dict():
    crit = mitkernels.MiTLoss(5, temperature=2.0)
    crit(torch.randn(8, 5), torch.randint(0, 5, (8,)))
    other = mitkernels.MiTLoss(5)
    other.load_state_dict(crit.state_dict())
    for (k1, v1), (k2, v2) in zip(crit.state_dict().items(), other.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_does_not_update_state(backend):
    crit = mitkernels.MiTLoss(3, backend=backend)
    crit(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    crit.eval()
    crit(torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 0, 0]))
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k
    crit.train()
    crit(torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 0, 0]))
    assert int(crit.dual_updates) == 2


def test_module_holds_no_model_and_keeps_exact_buffers():
    crit = mitkernels.MiTLoss(4, temperature=1.7)
    tau = float(crit.tau.detach())
    crit.half()
    assert [n for n, _ in crit.named_parameters()] == ["tau"]
    assert sorted(n for n, _ in crit.named_buffers()) == [
        "class_counts", "dual_updates", "lambda_entropy", "total_seen"]
    # A wrapper cast to 16 bits as a whole: tau keeps its dtype and its exact value (not its
    # float16 rounding), and the loss still runs on float16 logits.
    assert crit.class_counts.dtype == torch.float64 and crit.tau.dtype == torch.float32
    assert float(crit.tau.detach()) == tau
    loss, _ = crit(torch.randn(6, 4).half(), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert loss.dtype == torch.float16 and torch.isfinite(loss)
    assert crit.double().tau.dtype == torch.float64  # a 32/64-bit cast is honoured
    cct = mitkernels.CCTEALLoss(4).bfloat16()
    assert cct.tau_c.dtype == torch.float32 and cct.label_freq_ema.dtype == torch.float64


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float"])
def test_a_cast_keeps_the_statistics_values_not_only_their_dtype(cast):
    # The buffers went through the cast and back to float64: float16 made total_seen inf (and
    # the module's own state dict unloadable), bfloat16 rounded the counts.
    crit = mitkernels.MiTLoss(3)
    with torch.no_grad():
        crit.class_counts.copy_(torch.tensor([40001.0, 30001.0, 1001.0]))
        crit.total_seen.fill_(71000.0)
        crit.lambda_entropy.fill_(0.123456789)
    crit.tau.grad = torch.tensor(0.123456789)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    wrapper = torch.nn.ModuleDict({"model": torch.nn.Linear(2, 3), "crit": crit})
    getattr(wrapper, cast)()
    for k, v in crit.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert float(crit.tau.grad) == float(torch.tensor(0.123456789))
    mitkernels.MiTLoss(3).load_state_dict(crit.state_dict())
    cct = mitkernels.CCTEALLoss(3, alpha_max=8.3)
    ema = torch.tensor([0.123456789, 0.3, 0.576543211], dtype=torch.float64)
    with torch.no_grad():
        cct.label_freq_ema.copy_(ema)
    getattr(cct, cast)()
    assert torch.equal(cct.label_freq_ema, ema) and float(cct.alpha_t) == 8.3


def test_initial_temperature_is_exact():
    for t in (0.5, 1.0, 7.0, 42.0):
        # tau is a float32 parameter by default: T is exact to float32 rounding of tau.
        assert float(mitkernels.MiTLoss(3, temperature=t).temperature) == pytest.approx(
            t, rel=1e-6)
        assert float(mitkernels.MiTState(3, temperature=t, dtype=torch.float64).temperature) == \
            pytest.approx(t, rel=1e-12)


def test_counts_exact_past_two_to_the_53():
    crit = mitkernels.MiTLoss(2)
    with torch.no_grad():
        crit.class_counts.copy_(torch.tensor([2.0 ** 52, 1.0], dtype=torch.float64))
    for _ in range(3):
        crit(torch.randn(2, 2), torch.tensor([0, 1]))
    assert crit.class_counts[0].item() == 2.0 ** 52 + 3
    assert crit.class_counts[1].item() == 4.0


def test_billion_samples_state_dict_reloads_and_continues(tmp_path):
    crit = mitkernels.MiTLoss(3)
    with torch.no_grad():
        crit.class_counts.copy_(torch.tensor([4e8 + 1, 3.5e8 + 1, 2.5e8 + 1], dtype=torch.float64))
        crit.total_seen.fill_(1e9)
        crit.dual_updates.fill_(10 ** 7)
    torch.save(crit.state_dict(), tmp_path / "loss.pt")
    other = mitkernels.MiTLoss(3)
    other.load_state_dict(torch.load(tmp_path / "loss.pt"))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 2])
    crit(x, y)
    other(x, y)
    for k, v in crit.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert float(other.total_seen) == 1e9 + 4
    assert other.class_counts.tolist() == [4e8 + 2, 3.5e8 + 2, 2.5e8 + 3]


# ------------------------------------------------------------------------------------------
def test_tet_module_matches_functional():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    l1, _ = mitkernels.TETLoss(0.6, 0.2)(x, y)
    l2, _ = mitkernels.tet_loss(x, y, 0.6, 0.2)
    assert torch.equal(l1, l2)


def test_cct_eal_module_published_names_and_progress():
    crit = mitkernels.CCTEALLoss(4, alpha_max=8.0)
    assert sorted(crit.state_dict()) == ["alpha_t", "label_freq_ema", "tau_c"]
    torch.testing.assert_close(crit.class_temperatures(), torch.ones(4))
    crit.set_progress(0.15, warmup_ratio=0.3)
    assert float(crit.alpha_t) == pytest.approx(4.0)
    crit.set_progress(0.9)
    assert float(crit.alpha_t) == 8.0
    crit.set_progress(0.0, warmup_ratio=0.0)  # no warm-up: the full weight from the start
    assert float(crit.alpha_t) == 8.0
    loss, stats = crit(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 0]))
    assert set(stats) >= {"loss", "ce", "H", "H_star", "alpha_t", "T_mean"}
    assert float(crit.label_freq_ema.sum()) == pytest.approx(1.0)


def test_cct_eal_published_state_dict_loads():
    crit = mitkernels.CCTEALLoss(3)
    published = {"tau_c": torch.tensor([0.1, 0.2, 0.3]),
                 "label_freq_ema": torch.tensor([0.5, 0.3, 0.2])}
    result = crit.load_state_dict(published, strict=False)
    assert result.missing_keys == ["alpha_t"]
    assert crit.label_freq_ema.dtype == torch.float64
    torch.testing.assert_close(crit.label_freq_ema, torch.tensor([0.5, 0.3, 0.2],
                                                                 dtype=torch.float64))


@pytest.mark.parametrize("key,value,message", [
    ("label_freq_ema", [float("nan"), 0.5, 0.5], "label_freq_ema must be finite"),
    ("label_freq_ema", [-1.0, 1.0, 1.0], "label_freq_ema must be finite and non-negative"),
    ("alpha_t", float("nan"), "alpha_t must be one finite value"),
    ("alpha_t", -3.0, "alpha_t must be one finite value >= 0"),
])
def test_cct_eal_refuses_a_state_no_step_can_reach(key, value, message):
    crit = mitkernels.CCTEALLoss(3)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    bad = {**crit.state_dict(), key: torch.tensor(value, dtype=torch.float64)}
    with pytest.raises(ValueError, match=message):
        crit.load_state_dict(bad)
    with pytest.raises(ValueError, match=message):  # a published dict (no alpha_t) too
        crit.load_state_dict({k: v for k, v in bad.items() if k != "alpha_t" or
                              key == "alpha_t"}, strict=False)
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cct_eal_scale_logits_does_not_use_labels():
    crit = mitkernels.CCTEALLoss(3)
    with torch.no_grad():
        crit.tau_c.copy_(torch.tensor([0.0, 1.0, 2.0]))
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    scaled = crit.scale_logits(x, torch.tensor([2, 0]))
    t = crit.class_temperatures()
    torch.testing.assert_close(scaled, torch.stack([x[0] / t[0], x[1] / t[2]]))
    torch.testing.assert_close(crit.scale_logits(x), scaled)


def test_cct_eal_scale_logits_of_segmentation_logits():
    # [N, C, H, W]: each pixel by the temperature of its predicted class (argmax over dim 1)
    crit = mitkernels.CCTEALLoss(3)
    with torch.no_grad():
        crit.tau_c.copy_(torch.tensor([0.0, 1.0, 2.0]))
    x = torch.randn(2, 3, 5, 5)
    t = crit.class_temperatures()
    torch.testing.assert_close(crit.scale_logits(x), x / t[x.argmax(1)].unsqueeze(1))


def test_cct_eal_class_temperatures_are_clamped_as_the_reference_clamps():
    # tau_c on both sides of [T_min, T_max]: the bounds, as reference.temperature gives them
    crit = mitkernels.CCTEALLoss(3, T_min=0.75, T_max=1.5)
    with torch.no_grad():
        crit.tau_c.copy_(torch.tensor([-3.0, 0.5, 5.0]))
    want = reference.temperature(crit.tau_c.detach(), 0.0, 0.75, 1.5)
    assert torch.equal(crit.class_temperatures(), want)
    assert want[0] == 0.75 and want[2] == 1.5
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    torch.testing.assert_close(crit.scale_logits(x), torch.stack([x[0] / 0.75, x[1] / 1.5]))


def test_cct_eal_takes_the_ends_of_the_momentum_range():
    # ema_momentum lies in [0, 1]: both ends are valid (1 keeps the frequencies as they are)
    for momentum in (0.0, 1.0):
        crit = mitkernels.CCTEALLoss(3, ema_momentum=momentum)
        before = crit.label_freq_ema.clone()
        crit(torch.randn(4, 3), torch.tensor([0, 0, 0, 1]))
        if momentum == 1.0:
            assert torch.equal(crit.label_freq_ema, before)
        else:
            torch.testing.assert_close(crit.label_freq_ema,
                                       torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))


def test_modules_check_their_options_when_built():
    with pytest.raises(ValueError, match="reduction"):
        mitkernels.MiTLoss(3, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        mitkernels.MiTLoss(3, ignore_index=None)
    with pytest.raises(ValueError, match="lambda_entropy"):
        mitkernels.TETLoss(lambda_entropy=float("nan"))
    with pytest.raises(ValueError, match="ema_momentum"):
        mitkernels.CCTEALLoss(3, ema_momentum=1.5)
    with pytest.raises(ValueError, match="alpha_max"):
        mitkernels.CCTEALLoss(3, alpha_max=-1.0)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        mitkernels.CCTEALLoss(3, reduction="none")
    with pytest.raises(ValueError, match="temperature must lie"):
        mitkernels.TETLoss(temperature=1e39)
    with pytest.raises(ValueError, match="T_min must lie"):
        mitkernels.CCTEALLoss(3, T_min=0.0)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        mitkernels.MiTLoss(3, ignore_index=2**63)
    for build in (lambda b: mitkernels.MiTLoss(3, backend=b), lambda b: mitkernels.TETLoss(backend=b),
                  lambda b: mitkernels.CCTEALLoss(3, backend=b)):
        for name in ("bogus", ""):  # misspelt: refused here, not at the first step
            with pytest.raises(mitkernels.BackendUnavailableError, match="unknown backend"):
                build(name)
            with pytest.raises(ValueError):  # as every other option of a constructor
                build(name)
        assert build("reference").backend == "reference"


def test_loading_a_non_finite_tau_warns():
    # The published calibration stored tau = inf for a model with no skill: T then sits at its
    # clamp with no gradient for good, which a user should hear about.
    crit = mitkernels.MiTLoss(3)
    sd = crit.state_dict()
    sd["tau"] = torch.tensor(float("inf"))
    with pytest.warns(UserWarning, match="tau = inf") as record:
        crit.load_state_dict(sd)
    state = mitkernels.MiTState(3)
    with pytest.warns(UserWarning, match="tau = inf") as record_state:
        state.load_state_dict(sd)
    # Both name the caller's line, not torch's load_state_dict or mitkernels' own frames.
    assert record[0].filename == __file__ and record_state[0].filename == __file__


def test_reprs_name_the_options_that_are_not_defaults():
    assert repr(mitkernels.MiTLoss(3)) == "MiTLoss(num_classes=3)"
    assert repr(mitkernels.MiTLoss(3, reduction="sum", backend="cpu", ignore_index=255)) == \
        "MiTLoss(num_classes=3, ignore_index=255, reduction='sum', backend='cpu')"
    assert repr(mitkernels.TETLoss(0.5, 0.1, reduction="none")) == \
        "TETLoss(temperature=0.5, lambda_entropy=0.1, reduction='none')"
    assert repr(mitkernels.CCTEALLoss(4, backend="reference")).endswith(
        "T_max=1.5, backend='reference')")


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_a_compiled_mit_step_never_recompiles_as_its_state_trains(backend):
    # The temperature, lambda and the class counts change every step; they are tensors the
    # kernels read, so one graph serves every step (a Python number there would be a guard on
    # its value, and each new value a new graph: TET's fixed T and lambda are such numbers).
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(3)
    crit = mitkernels.MiTLoss(5, backend=backend)
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(lambda x, y: crit(x, y)[0], backend=counter, fullgraph=True)
    temperatures, lambdas, graphs = set(), set(), []
    for _ in range(4):
        x = torch.randn(16, 5, requires_grad=True)
        opt.zero_grad()
        step(x, torch.randint(0, 5, (16,))).backward()
        opt.step()
        temperatures.add(float(crit.temperature))
        lambdas.add(float(crit.lambda_entropy))
        graphs.append(counter.frame_count)
    assert len(temperatures) == 4 and len(lambdas) == 4  # the state did train
    # (the first step may count two: Dynamo restarts its analysis once for Python scalars)
    assert graphs[1:] == graphs[:1] * 3, graphs
