"""Shared fixtures: golden data and the backends this machine can run."""
import json
import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def load_json(name):
    with open(DATA / name) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def golden_trajectory():
    return load_json("mit_published_trajectory.json")


@pytest.fixture(scope="session")
def golden_calibration():
    return load_json("calibration.json")


def cpu_backends():
    """Every backend that runs on CPU tensors here: the reference, the C++ kernels when built,
    Triton only under TRITON_INTERPRET=1."""
    from mitkernels import _backends

    return ["reference"] + [b for b in ("cpu", "triton")
                            if _backends.unavailable_reason(b, torch.device("cpu")) is None]


def cuda_backends():
    from mitkernels import _backends

    if not torch.cuda.is_available():
        return []
    return [b for b in ("triton", "cuda")
            if _backends.unavailable_reason(b, torch.device("cuda")) is None]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
