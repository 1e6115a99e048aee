"""mitkernels: fused kernels for the MiT loss family (MiT, TET, CCT-EAL).

Public API::

    loss, stats = mitkernels.mit_loss(logits, targets, state)      # functional, state = MiTState
    criterion = mitkernels.MiTLoss(num_classes)                    # nn.Module
    T = mitkernels.calibrate_temperature(logits, labels)           # temperature initialisation
"""
from . import ops  # noqa: F401  (registers torch.ops.mitkernels.*)
from ._backends import BackendUnavailableError
from .calibration import calibrate_temperature, collect_logits
from .functional import cct_eal_loss, mit_loss, tet_loss
from .modules import CCTEALLoss, MiTLoss, TETLoss
from .state import MiTState

__version__ = "0.1.0"


def build_info() -> dict:
    """What was compiled: ``{'cpu': bool, 'cuda': bool, 'cuda_archs': [...], ...}``, and which
    kernel backends this process can run."""
    from ._backends import available, extension

    ext = extension()
    info = {"cpu": False, "cuda": False, "cuda_archs": []}
    if isinstance(ext, ImportError):
        info["error"] = str(ext)
    else:
        info.update(ext.build_info())
    info["backends"] = available()
    return info


__all__ = [
    "BackendUnavailableError", "CCTEALLoss", "MiTLoss", "MiTState", "TETLoss", "build_info",
    "calibrate_temperature", "cct_eal_loss", "collect_logits", "mit_loss", "tet_loss",
]
