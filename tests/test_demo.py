"""Smoke test of ``python -m mitkernels.demo``: a tiny configuration, end to end."""
import json
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

from mitkernels import demo  # noqa: E402
from mitkernels.demo import METHODS  # noqa: E402

from conftest import cpu_backends  # noqa: E402

TINY = ["--seeds", "1", "--epochs", "6", "--datasets", "breast_cancer", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        result = demo.main(TINY + ["--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return out, result


def _run(tmp_path, extra):
    threads = torch.get_num_threads()
    try:
        return demo.main(TINY + ["--out", str(tmp_path)] + extra)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def test_outputs_written(tiny_run):
    out, result = tiny_run
    png = (out / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    on_disk = json.loads((out / "results.json").read_text())
    assert [e["method"] for e in on_disk["summary"]] == list(METHODS)
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(METHODS)
    table = (out / "table.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(METHODS)
    for method in METHODS:
        assert any(f"| {method} |" in line for line in table)
    # one seed: no spread to show (it printed "± 0.000", a spread of none)
    assert result["summary"][0]["accuracy"][1] is None
    assert not any("±" in line for line in table)


def test_every_method_beats_majority_class(tiny_run):
    _, result = tiny_run
    majority = result["majority_rate"]["breast_cancer"]
    assert 0.6 < majority < 0.65  # 357 benign of 569, stratified
    for row in result["runs"]:
        assert row["accuracy"] > majority + 0.1, row
        assert 0.5 < row["auc"] <= 1.0, row
        assert 0.0 <= row["ece"] <= 1.0 and math.isfinite(row["nll"]), row


def test_loss_state_is_reported_and_sane(tiny_run):
    _, result = tiny_run
    by_method = {row["method"]: row for row in result["runs"]}
    mit = by_method["MiT"]
    assert 1e-3 <= mit["T_calibrated"] <= 500 and 1e-3 <= mit["T"] <= 500
    assert 0.0 <= mit["lambda"] <= 0.5
    cct = by_method["CCT-EAL"]
    assert 0.75 <= cct["T_min"] <= cct["T_max"] <= 1.5
    assert cct["alpha_t"] == pytest.approx(8.0)  # warm-up over 30% of 6 epochs is done
    assert by_method["TET"]["T"] == 0.5
    assert by_method["CE+TS"]["T"] > 0


def test_reproducible(tiny_run, tmp_path):
    _, first = tiny_run
    again = _run(tmp_path, [])
    for a, b in zip(first["runs"], again["runs"]):
        assert a == b


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ CPU kernels are not built")
def test_kernels_match_reference(tiny_run, tmp_path):
    """The default backend (C++ kernels once built) and the eager reference train alike."""
    ref = _run(tmp_path, ["--backend", "reference"])
    cpu = _run(tmp_path / "cpu", ["--backend", "cpu"])
    for a, b in zip(ref["runs"], cpu["runs"]):
        for key in ("accuracy", "auc", "nll", "ece", "T", "lambda", "T_min", "T_max"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (a["method"], key)


def test_metrics_match_definitions():
    """Top-label ECE and NLL of a hand-made prediction, through the demo's metric code."""
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    m = demo.metrics(p.log(), y, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(float(-(p[torch.arange(4), y]).log().mean()))
    # bins (15): 0.9 -> correct; 0.8 -> wrong; 0.7 -> correct; 0.6 -> correct
    ece = (abs(0.9 - 1) + abs(0.8 - 0) + abs(0.7 - 1) + abs(0.6 - 1)) / 4
    assert m["ece"] == pytest.approx(ece, abs=1e-6)
    # positive-class scores: positives 0.2, 0.7 against negatives 0.1, 0.4: 3 of 4 pairs ordered
    assert m["auc"] == pytest.approx(0.75)
