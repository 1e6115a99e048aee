"""MiTState: the tensors one MiT step reads and updates, and their published-format loading."""
from __future__ import annotations

import math
import operator
import sys
import warnings
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .reference import MIT_LAMBDA_MAX, MIT_T_EPS, MIT_T_MAX, MIT_T_MIN, temperature

# The published criterion's names; the published code kept counts in float32, which stops counting
# at 2^24 samples: here counts are float64 (exact to 2^53) and dual_updates int64.
STATE_BUFFERS = {
    "class_counts": torch.float64,
    "total_seen": torch.float64,
    "lambda_entropy": torch.float64,
    "dual_updates": torch.int64,
}
INITIAL_LAMBDA = 0.1  # never used: dual_updates starts at 0, so the first step overwrites lambda


def inverse_softplus(t: float) -> float:
    """The ``tau`` whose torch softplus (threshold 20) is exactly ``t``."""
    if t <= 0:
        raise ValueError(f"a temperature must be positive, got {t}")
    return t if t > 20.0 else math.log(math.expm1(t))


def tau_for_temperature(t: float, t_eps: float = MIT_T_EPS) -> float:
    """The ``tau`` with ``clamp(softplus(tau) + t_eps, 1e-3, 500) == t`` for ``t`` in the bounds."""
    if not (MIT_T_MIN <= t <= MIT_T_MAX and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and in [{MIT_T_MIN}, {MIT_T_MAX}], got {t}")
    return inverse_softplus(max(t - t_eps, 1e-12))


def initial_buffers(num_classes: int, device=None) -> Dict[str, Tensor]:
    """The published initial buffers: counts at ones (Laplace smoothing), lambda 0.1, n = 0."""
    return {
        "class_counts": torch.ones(num_classes, dtype=torch.float64, device=device),
        "total_seen": torch.zeros((), dtype=torch.float64, device=device),
        "lambda_entropy": torch.full((), INITIAL_LAMBDA, dtype=torch.float64, device=device),
        "dual_updates": torch.zeros((), dtype=torch.int64, device=device),
    }


def check_num_classes(num_classes) -> int:
    """A plain int >= 2. Integers of other types (numpy's, a one-value integer tensor such as
    ``labels.max() + 1``) are taken as their value; bools and floats are refused."""
    value = None
    if not isinstance(num_classes, bool) and not (
            isinstance(num_classes, Tensor) and num_classes.dtype == torch.bool):
        try:
            value = operator.index(num_classes)
        except TypeError:
            pass
    if value is None or value < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return value


class MiTState:
    """The state of the MiT loss: ``tau`` (learnable) and the running statistics.

    Attributes:
        tau: ``[]`` leaf tensor with ``requires_grad``: ``T = clamp(softplus(tau) + 1e-6, 1e-3, 500)``.
        class_counts: ``[C]`` float64 class histogram of the labels seen (starts at ones).
        total_seen: ``[]`` float64 number of labelled samples seen.
        lambda_entropy: ``[]`` float64 dual-averaged entropy weight.
        dual_updates: ``[]`` int64 number of dual-averaging steps.

    Args:
        num_classes: ``C >= 2``.
        temperature: the initial ``T`` (``tau`` is set so that ``T`` is exactly this value).
        device: where the tensors live.
        dtype: dtype of ``tau`` (float32 by default, like a model parameter).
    """

    def __init__(self, num_classes: int, temperature: float = 1.0, device=None,
                 dtype: torch.dtype = torch.float32):
        self.num_classes = check_num_classes(num_classes)
        self.tau = torch.tensor(tau_for_temperature(float(temperature)), dtype=dtype,
                                device=device, requires_grad=True)
        for name, value in initial_buffers(self.num_classes, device).items():
            setattr(self, name, value)

    @property
    def temperature(self) -> Tensor:
        """The temperature ``T`` the next step uses (detached)."""
        return temperature(self.tau.detach())

    def parameters(self) -> List[Tensor]:
        """``[tau]``, for the optimizer: ``SGD([*model.parameters(), *state.parameters()])``."""
        return [self.tau]

    def buffers(self) -> Dict[str, Tensor]:
        """The running statistics by name (the tensors themselves, updated in place)."""
        return {name: getattr(self, name) for name in STATE_BUFFERS}

    def state_dict(self) -> Dict[str, Tensor]:
        """Copies of ``tau`` and the buffers, under the names ``MiTLoss`` uses."""
        return {"tau": self.tau.detach().clone(), **{k: v.clone() for k, v in self.buffers().items()}}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load our own or the published criterion's state dict (float32 counts included)."""
        converted = convert_published_state_dict(state_dict, self.num_classes)
        with torch.no_grad():
            self.tau.copy_(converted["tau"].reshape(self.tau.shape))
            for name, value in self.buffers().items():
                value.copy_(converted[name].reshape(value.shape))

    def to(self, device) -> "MiTState":
        """Move every tensor to ``device``; returns ``self``. ``tau`` stays the same tensor
        object (its data and gradient move, as ``Module.to`` moves a parameter's), so an
        optimizer built before the move still updates it. Dtypes never change: counts stay
        float64."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"MiTState.to takes a device, got the dtype {device}: the running "
                            f"statistics keep their dtypes (they are updated in place); make a "
                            f"MiTState(..., dtype=...) for another tau dtype")
        with torch.no_grad():
            # A new tensor here would leave an optimizer holding the old tau: its steps would
            # change a tensor the loss no longer reads, and the temperature would never train.
            # Where the data cannot be swapped in (meta, XLA and other devices whose tensors
            # are of another type), a new leaf, as Module.to makes a new parameter there.
            moved = self.tau.data.to(device)
            if torch._has_compatible_shallow_copy_type(self.tau, moved):
                self.tau.data = moved
                if self.tau.grad is not None:
                    self.tau.grad.data = self.tau.grad.data.to(device)
            else:
                grad = None if self.tau.grad is None else self.tau.grad.to(device)
                self.tau = moved.requires_grad_(True)
                self.tau.grad = grad
        for name, value in self.buffers().items():
            setattr(self, name, value.to(device))
        return self

    def __repr__(self) -> str:
        return (f"MiTState(num_classes={self.num_classes}, T={float(self.temperature):.6g}, "
                f"lambda={float(self.lambda_entropy):.6g}, steps={int(self.dual_updates)})")


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside mitkernels and torch, for a warning raised
    while loading: ``MiTState.load_state_dict`` calls in directly, ``Module.load_state_dict``
    through torch's frames, and the user's line is what the warning should name."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("mitkernels.") or name == "torch" or name.startswith("torch.")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _float64(t) -> Tensor:
    return torch.as_tensor(t).detach().double().cpu()


def _finite_non_negative(v: Tensor) -> bool:
    return bool(torch.isfinite(v).all() and (v >= 0).all())


def check_loaded_entry(name: str, value) -> None:
    """One entry of a MiT state dict (``tau`` or a running statistic) as a step can leave it,
    or a ValueError naming it: a NaN lambda or a negative count would be carried into every
    later step (the backends do not even agree on what to make of them), so a state dict holding
    one is refused when it is loaded. Each entry on its own, so that a partial dict
    (``strict=False``) is checked too."""
    v = _float64(value)
    if name == "tau":
        if bool(torch.isnan(v).any()):  # inf is the published code's own (a warning, later)
            raise ValueError("tau is NaN: T and every loss after it would be NaN")
    elif name == "class_counts":
        if not (_finite_non_negative(v) and v.sum() > 0):
            raise ValueError("class_counts must be finite and non-negative, with a positive "
                             f"sum, got {v.tolist()[:8]}")
    elif name == "total_seen":
        if not _finite_non_negative(v):
            raise ValueError(f"total_seen must be finite and non-negative, got {v.tolist()}")
    elif name == "lambda_entropy":
        if not bool(((v >= 0.0) & (v <= MIT_LAMBDA_MAX)).all()):  # False for NaN
            raise ValueError(f"lambda_entropy must lie in [0, {MIT_LAMBDA_MAX}] (the dual "
                             f"update's range), got {v.tolist()}")
    elif name == "dual_updates":
        # below 2^63: int64 holds it (a larger float wrapped to a negative count on copy)
        if not bool((torch.isfinite(v) & (v >= 0) & (v == v.floor()) & (v < 2.0**63)).all()):
            raise ValueError("dual_updates must be a non-negative whole number below 2^63, got "
                             f"{v.tolist()}")


def _check_running_statistics(sd: Mapping[str, Tensor]) -> None:
    for name in ("tau", *STATE_BUFFERS):
        check_loaded_entry(name, sd[name])


def check_cct_statistics(label_freq_ema: Optional[Tensor], alpha_t: Optional[Tensor]) -> None:
    """CCT-EAL's running statistics (each that is given) as a step can leave them, or a
    ValueError naming the entry that is not (checked when a state dict is loaded)."""
    if label_freq_ema is not None:
        ema = _float64(label_freq_ema)
        if not _finite_non_negative(ema):
            raise ValueError(f"label_freq_ema must be finite and non-negative, got "
                             f"{ema.tolist()[:8]}")
    if alpha_t is not None:
        alpha = _float64(alpha_t)
        if alpha.numel() != 1 or not _finite_non_negative(alpha):
            raise ValueError(f"alpha_t must be one finite value >= 0, got {alpha.tolist()}")


def convert_published_state_dict(state_dict: Mapping[str, Tensor], num_classes: int,
                                 prefix: str = "") -> Dict[str, Tensor]:
    """Our tensors from a state dict of ours or of the published ``MiTLoss_WithTrainCalibration``.

    The published criterion embedded the model it calibrated on (``model.*`` keys): those are
    dropped with a warning. Missing keys raise a KeyError naming them; a class histogram of the
    wrong length raises a ValueError.
    """
    stray = sorted(k for k in state_dict if k.startswith(prefix + "model."))
    if stray:
        warnings.warn(f"dropping {len(stray)} 'model.*' entries (the published criterion stored its "
                      f"model inside the loss; MiTLoss never holds a model): {stray[:3]}...",
                      stacklevel=_caller_stacklevel())
    missing = [k for k in ("tau", *STATE_BUFFERS) if prefix + k not in state_dict]
    if missing:
        raise KeyError(f"state dict lacks {', '.join(prefix + k for k in missing)}")
    out = {k: torch.as_tensor(state_dict[prefix + k]) for k in ("tau", *STATE_BUFFERS)}
    if out["class_counts"].numel() != num_classes:
        raise ValueError(f"class_counts has {out['class_counts'].numel()} entries, the loss has "
                         f"{num_classes} classes")
    for k in ("tau", "total_seen", "lambda_entropy", "dual_updates"):
        if out[k].numel() != 1:
            raise ValueError(f"{k} must hold one value, got shape {tuple(out[k].shape)}")
    _check_running_statistics(out)
    if not bool(torch.isfinite(out["tau"]).all()):
        # The published code stored tau = inf when its calibration found no skill.
        warnings.warn(f"loading tau = {float(out['tau'])}: T sits at its clamp "
                      f"({MIT_T_MAX:g} for inf) with no gradient, so it will never move; call "
                      "calibrate_ on a trained model's logits, or set tau",
                      stacklevel=_caller_stacklevel())
    return out
