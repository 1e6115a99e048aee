"""Demo: CE, TET, MiT and CCT-EAL on two small real data sets that ship with scikit-learn.

Run ``python -m mitkernels.demo`` (one to two minutes on two CPU cores). For each data set
(``load_breast_cancer``, the Wisconsin diagnostic set: 569 tumours, 30 features, malignant or
benign; ``load_digits``: 1797 8x8 images of handwritten digits) and each seed, it trains the same
small network from the same initialisation, on the same batch order, once per loss:

* ``CE``       plain ``F.cross_entropy``; test probabilities ``softmax(logits)``.
* ``CE+TS``    the CE network with post-hoc temperature scaling: ``T`` fitted on the validation
  logits with :func:`mitkernels.calibrate_temperature` (no extra training; a reference point).
* ``TET``      :class:`mitkernels.TETLoss` (fixed ``T = 0.5``, ``lambda = 0.1``);
  test probabilities ``softmax(logits / T)``.
* ``MiT``      :class:`mitkernels.MiTLoss`: the first ``--mit-pretrain-epochs`` epochs are plain CE,
  then ``T`` is calibrated on the training logits (``collect_logits`` + ``calibrate_``, the
  published recipe) and MiT trains for the remaining epochs, ``tau`` learned with the model;
  test probabilities ``softmax(logits / T)``.
* ``CCT-EAL``  :class:`mitkernels.CCTEALLoss`, ``set_progress(epoch / epochs)`` each epoch,
  ``tau_c`` learned with the model; test probabilities ``softmax(scale_logits(logits))`` (no
  labels used).

Splits are stratified 60/20/20 train/validation/test, fixed (``--split-seed``) across seeds and
methods. Every loss gets the same budget and the network of the last epoch is evaluated; the
validation split fits CE+TS's temperature (``--select best-val`` keeps instead the epoch whose
validation NLL, under the method's own test-time probabilities, is lowest). Reported on the test
split, mean +- sample std over seeds: accuracy, AUC (binary; macro one-vs-rest for digits), NLL
and top-label expected calibration error (15 equal-width bins), all through torchmetrics, plus the
final temperatures. Writes ``results.json``, ``results.csv`` (one row per run), ``table.md`` and
``reliability.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backends
from .calibration import calibrate_temperature, collect_logits
from .modules import CCTEALLoss, MiTLoss, TETLoss

DATASETS = ("breast_cancer", "digits")
METHODS = ("CE", "CE+TS", "TET", "MiT", "CCT-EAL")
TRAINED = ("CE", "TET", "MiT", "CCT-EAL")  # CE+TS reuses the CE network
DATASET_TITLES = {"breast_cancer": "breast cancer (Wisconsin)", "digits": "digits 8x8"}
ECE_BINS = 15


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------
@dataclass
class Data:
    name: str
    num_classes: int
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def majority_rate(self) -> float:
        """Test accuracy of always predicting the most frequent training class."""
        majority = int(torch.bincount(self.y_train, minlength=self.num_classes).argmax())
        return float((self.y_test == majority).double().mean())


def load_data(name: str, split_seed: int = 0) -> Data:
    """A stratified 60/20/20 split; features standardised with the training split's statistics."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if name == "breast_cancer":
        x, y = load_breast_cancer(return_X_y=True)
    elif name == "digits":
        x, y = load_digits(return_X_y=True)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=split_seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=split_seed)
    x = x.astype(np.float32)
    if name == "breast_cancer":
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
    else:
        # Pixels are 0..16: one mean and std for the whole image keeps the spatial structure.
        x = ((x - x[train].mean()) / x[train].std()).reshape(-1, 1, 8, 8)

    def split(rows):
        return torch.from_numpy(np.ascontiguousarray(x[rows])), torch.from_numpy(y[rows]).long()

    return Data(name, int(y.max()) + 1, *split(train), *split(val), *split(test))


class SmallCNN(nn.Module):
    """conv 3x3 (8) - pool - conv 3x3 (16) - linear 64 - linear: about 18k parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_model(data: Data) -> nn.Module:
    if data.name == "breast_cancer":
        features = data.x_train.shape[1]
        return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, data.num_classes))
    return SmallCNN(data.num_classes)


# ------------------------------------------------------------------------------------------------
# Losses and test-time probabilities
# ------------------------------------------------------------------------------------------------
def make_criterion(method: str, num_classes: int, backend: Optional[str]) -> Optional[nn.Module]:
    if method == "CE":
        return None
    if method == "TET":
        return TETLoss(backend=backend)
    if method == "MiT":
        return MiTLoss(num_classes, backend=backend)
    if method == "CCT-EAL":
        return CCTEALLoss(num_classes, backend=backend)
    raise ValueError(f"unknown method {method!r}")


def test_time_logits(method: str, logits: Tensor, criterion: Optional[nn.Module]) -> Tensor:
    """The logits whose softmax the method would predict with (no labels involved)."""
    if criterion is None:
        return logits
    if isinstance(criterion, CCTEALLoss):
        return criterion.scale_logits(logits)
    t = criterion.temperature
    return logits / (t.to(logits.dtype) if isinstance(t, Tensor) else t)


def metrics(z: Tensor, y: Tensor, num_classes: int) -> Dict[str, float]:
    """Accuracy, AUC, NLL, top-label ECE of ``softmax(z)`` (torchmetrics; NLL: F.cross_entropy)."""
    from torchmetrics.classification import AUROC, Accuracy, CalibrationError

    z = z.double()
    p = z.softmax(dim=1)
    acc = Accuracy(task="multiclass", num_classes=num_classes, average="micro")(p, y)
    if num_classes == 2:
        auc = AUROC(task="binary")(p[:, 1], y)
    else:
        auc = AUROC(task="multiclass", num_classes=num_classes, average="macro")(p, y)
    ece = CalibrationError(task="multiclass", num_classes=num_classes, n_bins=ECE_BINS,
                           norm="l1")(p, y)
    nll = F.cross_entropy(z, y)
    return {"accuracy": float(acc), "auc": float(auc), "nll": float(nll), "ece": float(ece)}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_seed(data: Data, seed: int) -> int:
    """The seed of one (data set, seed) pair: every method starts from the same network."""
    return 1000 * seed + DATASETS.index(data.name) + 1


def batches(x: Tensor, y: Tensor, batch_size: int, generator: Optional[torch.Generator] = None):
    order = (torch.randperm(len(y), generator=generator) if generator is not None
             else torch.arange(len(y)))
    return [(x[i], y[i]) for i in order.split(batch_size)]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def train_one(data: Data, method: str, seed: int, args) -> Dict:
    """Train one network with one loss; return its test-time logits and final loss state."""
    backend = None if args.backend == "auto" else args.backend
    rs = run_seed(data, seed)
    seed_everything(rs)
    model = make_model(data)
    criterion = make_criterion(method, data.num_classes, backend)
    loss_params = list(criterion.parameters()) if criterion is not None else []
    # Weight decay on the network only: decaying tau would pull T towards softplus(0).
    optimizer = torch.optim.AdamW(
        [{"params": model.parameters(), "weight_decay": args.weight_decay},
         {"params": loss_params, "weight_decay": 0.0}], lr=args.lr)
    order_gen = torch.Generator().manual_seed(rs)  # the same batch order for every method
    pretrain = min(args.mit_pretrain_epochs, args.epochs - 1) if method == "MiT" else 0
    best = {"nll": math.inf}
    info: Dict = {}

    for epoch in range(args.epochs):
        train_batches = batches(data.x_train, data.y_train, args.batch_size, order_gen)
        if method == "MiT" and epoch == pretrain:
            # The published recipe: T starts at the NLL-optimal temperature of the training logits.
            logits, labels = collect_logits(
                model, batches(data.x_train, data.y_train, 4 * args.batch_size))
            info["T_calibrated"] = float(criterion.calibrate_(logits, labels))
        if method == "CCT-EAL":
            criterion.set_progress(epoch / args.epochs)
        use_ce = criterion is None or epoch < pretrain
        model.train()
        if criterion is not None:
            criterion.train()
        for xb, yb in train_batches:
            logits = model(xb)
            if use_ce:
                loss = F.cross_entropy(logits, yb)
            else:
                loss, _ = criterion(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if criterion is not None:
            criterion.eval()
        if epoch < pretrain:
            continue
        if args.select == "best-val" or epoch == args.epochs - 1:
            z_val = test_time_logits(method, predict(model, data.x_val), criterion)
            val_nll = float(F.cross_entropy(z_val.double(), data.y_val))
            if args.select == "last" or val_nll < best["nll"]:
                best = {"nll": val_nll, "epoch": epoch + 1,
                        "model": copy.deepcopy(model.state_dict()),
                        "criterion": (copy.deepcopy(criterion.state_dict())
                                      if criterion is not None else None)}

    model.load_state_dict(best["model"])
    if criterion is not None:
        criterion.load_state_dict(best["criterion"])
        criterion.eval()
    info.update(best_epoch=best["epoch"], val_nll=best["nll"])
    if method == "MiT":
        info.update(T=float(criterion.temperature), **{"lambda": float(criterion.lambda_entropy)})
    elif method == "TET":
        info.update(T=criterion.temperature, **{"lambda": criterion.lambda_entropy})
    elif method == "CCT-EAL":
        t_c = criterion.class_temperatures()
        info.update(T_min=float(t_c.min()), T_max=float(t_c.max()),
                    alpha_t=float(criterion.alpha_t))
    out = {"test_logits": test_time_logits(method, predict(model, data.x_test), criterion),
           "info": info}
    if method == "CE":
        # Post-hoc temperature scaling of the same network on the validation split.
        t_val = calibrate_temperature(predict(model, data.x_val), data.y_val, backend=backend)
        out["ts"] = {"test_logits": out["test_logits"] / float(t_val),
                     "info": {"T": float(t_val), "best_epoch": best["epoch"]}}
    return out


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample std; no std (None) for one run, where 0 would claim a spread of none."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def summarise(rows: List[Dict]) -> List[Dict]:
    summary = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in METHODS:
            runs = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            entry = {"dataset": dataset, "method": method, "seeds": len(runs)}
            for key in ("accuracy", "auc", "nll", "ece", "T", "lambda", "T_min", "T_max",
                        "T_calibrated"):
                if key in runs[0] and runs[0][key] is not None:
                    entry[key] = mean_std([r[key] for r in runs])
            summary.append(entry)
    return summary


def _fmt(ms, digits=3) -> str:
    m, s = ms
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(summary: List[Dict], majority: Dict[str, float]) -> str:
    lines = ["| data set | method | accuracy | AUC | NLL | ECE | T | λ |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        if e["method"] == "CCT-EAL":
            temp = f"{e['T_min'][0]:.3f} – {e['T_max'][0]:.3f}"
        elif e["method"] == "TET":
            temp = f"{e['T'][0]:g} (fixed)"
        elif "T" in e:
            temp = _fmt(e["T"])
        else:
            temp = "1"
        lam = _fmt(e["lambda"], 4) if e["method"] == "MiT" else (
            f"{e['lambda'][0]:g} (fixed)" if "lambda" in e else "–")
        name = f"{DATASET_TITLES[e['dataset']]} (majority {majority[e['dataset']]:.3f})"
        lines.append(f"| {name} | {e['method']} | {_fmt(e['accuracy'])} | {_fmt(e['auc'], 4)} | "
                     f"{_fmt(e['nll'])} | {_fmt(e['ece'])} | {temp} | {lam} |")
    return "\n".join(lines)


def reliability_bins(z: Tensor, y: Tensor, n_bins: int = 10):
    """Mean confidence, accuracy and count of the top-label predictions in equal-width bins."""
    p = z.double().softmax(dim=1)
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    idx = (conf * n_bins).long().clamp(max=n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    keep = count > 0
    mean_conf = torch.bincount(idx, conf, minlength=n_bins)[keep] / count[keep]
    acc = torch.bincount(idx, correct, minlength=n_bins)[keep] / count[keep]
    return mean_conf.numpy(), acc.numpy(), count[keep].numpy()


def plot_reliability(pooled: Dict[str, Dict[str, Tuple[Tensor, Tensor]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pooled)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 5), squeeze=False)
    for ax, dataset in zip(axes[0], names):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
        for method, (z, y) in pooled[dataset].items():
            conf, acc, count = reliability_bins(z, y)
            line, = ax.plot(conf, acc, marker="o", markersize=3, label=method)
            ax.scatter(conf, acc, s=8 + 120 * count / count.sum(), color=line.get_color(),
                       alpha=0.35)
        ax.set_title(f"{DATASET_TITLES[dataset]}: test, all seeds pooled")
        ax.set_xlabel("confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Reliability diagram (10 bins; marker area ~ share of test points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mitkernels.demo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--backend", default="auto",
                   choices=("auto",) + _backends.BACKENDS,
                   help="loss backend; auto = the C++ CPU kernels when built, else the reference")
    p.add_argument("--out", type=Path, default=Path("examples/results"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--mit-pretrain-epochs", type=int, default=2,
                   help="CE epochs before MiT's temperature is calibrated (0: the initial model)")
    p.add_argument("--select", choices=("last", "best-val"), default="last",
                   help="evaluate the last epoch, or the epoch with the lowest validation NLL")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the networks are tiny: one thread is fastest)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        p.error("--seeds and --epochs must be positive")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    torch.use_deterministic_algorithms(True)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    backend_used = _backends.choose(None if args.backend == "auto" else args.backend,
                                    torch.device("cpu"))
    log(f"backend: {backend_used} (requested {args.backend}); {machine()}")

    rows: List[Dict] = []
    pooled: Dict[str, Dict[str, List]] = {}
    majority: Dict[str, float] = {}
    for name in args.datasets:
        data = load_data(name, args.split_seed)
        majority[name] = data.majority_rate
        pooled[name] = {m: ([], []) for m in METHODS}
        log(f"{name}: train/val/test = {len(data.y_train)}/{len(data.y_val)}/{len(data.y_test)}, "
            f"{data.num_classes} classes, majority-class test accuracy {majority[name]:.3f}")
        for seed in range(args.seeds):
            for method in TRAINED:
                t0 = time.perf_counter()
                out = train_one(data, method, seed, args)
                runs = [(method, out)] + ([("CE+TS", out["ts"])] if "ts" in out else [])
                for m, res in runs:
                    row = {"dataset": name, "method": m, "seed": seed,
                           **metrics(res["test_logits"], data.y_test, data.num_classes),
                           **res["info"]}
                    rows.append(row)
                    pooled[name][m][0].append(res["test_logits"])
                    pooled[name][m][1].append(data.y_test)
                    log(f"  seed {seed} {m:8s} acc {row['accuracy']:.3f} auc {row['auc']:.4f} "
                        f"nll {row['nll']:.4f} ece {row['ece']:.4f} (epoch {row['best_epoch']}, "
                        f"{time.perf_counter() - t0:.1f}s)")

    summary = summarise(rows)
    table = markdown_table(summary, majority)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_reliability({d: {m: (torch.cat(z), torch.cat(y)) for m, (z, y) in per.items()}
                      for d, per in pooled.items()}, args.out / "reliability.png")
    wall = time.perf_counter() - start
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"command": "python -m mitkernels.demo " + " ".join(sys.argv[1:] if argv is None
                                                                   else list(argv)),
              "config": config, "backend": backend_used, "machine": machine(),
              "wall_time_s": wall, "majority_rate": majority, "summary": summary, "runs": rows,
              "table": table}
    with open(args.out / "results.json", "w") as f:
        json.dump(result, f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "table.md").write_text(table + "\n")
    log("")
    log(table)
    log(f"\n{len(rows)} runs in {wall:.1f}s; wrote {args.out}/results.json, results.csv, "
        f"table.md, reliability.png")
    return result


if __name__ == "__main__":
    main()
