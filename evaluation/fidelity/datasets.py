"""Small classic datasets for the fidelity benchmark, read offline.

* ``mnist`` / ``fashion_mnist``: idx ``.gz`` files in ``DATA_DIR/mnist`` (``DATA_DIR/fashion_mnist``);
  the training images are used when present, else the 10,000 ``t10k`` images are split.
* ``cifar10``: the python pickle batches in ``DATA_DIR/cifar10`` (or ``cifar-10-batches-py``).
* ``concrete``: UCI Concrete, ``;``-separated CSV; ``parkinsons``: UCI Parkinson's telemonitoring
  CSV (target ``total_UPDRS``).
* ``digits``, ``breast_cancer``, ``diabetes``, ``wine``: bundled with scikit-learn (no data folder).

Every set is shuffled with a seed and split into a training part and a held-out target part.
Inputs are standardised with training statistics (images: scaled to [0, 1] then centred);
regression targets are standardised too.
"""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from iaif.training.data import DataError

Task = Literal["multiclass", "binary", "regression"]
DATASETS = ("mnist", "fashion_mnist", "cifar10", "concrete", "parkinsons", "digits", "breast_cancer", "diabetes", "wine")
SKLEARN_DATASETS = ("digits", "breast_cancer", "diabetes", "wine")
_PARKINSONS_DROP = ("subject#", "motor_UPDRS", "total_UPDRS")


@dataclass
class Split:
    """A dataset split into a training part and a held-out target part (float64 tensors)."""

    name: str
    task: Task
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_target: torch.Tensor
    y_target: torch.Tensor
    num_outputs: int
    """Model output size: number of classes (multiclass), 1 (binary, regression)."""
    image_shape: tuple[int, int, int] | None
    """(channels, height, width) for image sets, None for tabular ones."""

    @property
    def n(self) -> int:
        return len(self.y_train)

    def class_labels(self, bins: int = 10) -> np.ndarray:
        """Training labels; for regression, the quantile bin of the target (for same-class groups)."""
        y = self.y_train.numpy()
        if self.task != "regression":
            return y.astype(np.int64)
        edges = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
        return np.searchsorted(edges, y).astype(np.int64)


def default_data_dir() -> Path:
    """``$IAIF_SHARED_DATA``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("IAIF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def load_split(
    name: str,
    data_dir: str | Path | None,
    n_train: int,
    n_target: int,
    seed: int,
    downsample: int = 1,
) -> Split:
    """Load dataset ``name``, shuffle with ``seed`` and split it.

    ``n_target`` held-out examples form the target; ``n_train`` (0 = all the rest) are the training set.
    ``downsample`` averages k×k pixel blocks of image sets (k = 1 keeps them as they are).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    image_shape = None
    if name in SKLEARN_DATASETS:
        x, y, task = _sklearn(name)
    elif name in ("mnist", "fashion_mnist"):
        x, y = _idx_images(root / name)
        task = "multiclass"
    elif name == "cifar10":
        x, y = _cifar10(root)
        task = "multiclass"
    elif name == "concrete":
        x, y = _csv_table(root / "uci_concrete" / "Concrete_Data.csv", ";", target="Concrete compressive strength", drop=())
        task = "regression"
    else:
        table = root / "uci_parkinsons_telemonitoring" / "parkinsons_updrs.data"
        x, y = _csv_table(table, ",", target="total_UPDRS", drop=_PARKINSONS_DROP)
        task = "regression"
    if x.ndim == 4:
        x = _pool(x.astype(np.float64) / 255.0, downsample)
        image_shape = tuple(x.shape[1:])
    return _split(name, task, x.astype(np.float64), y, n_train, n_target, seed, image_shape)


def _split(name, task, x, y, n_train, n_target, seed, image_shape) -> Split:
    if n_target <= 0 or n_target >= len(y):
        raise ValueError(f"{name}: n_target={n_target} must be in [1, {len(y) - 1}]")
    order = np.random.default_rng(seed).permutation(len(y))
    tgt, rest = order[:n_target], order[n_target:]
    if n_train > 0:
        if n_train > len(rest):
            raise ValueError(f"{name}: n_train={n_train} but only {len(rest)} examples remain after the target split")
        rest = rest[:n_train]
    x_tr, x_tg = x[rest], x[tgt]
    if image_shape is None:
        mu, sd = x_tr.mean(0), x_tr.std(0)
        sd[sd == 0] = 1.0
    else:
        mu, sd = x_tr.mean(), 1.0
    x_tr, x_tg = (x_tr - mu) / sd, (x_tg - mu) / sd
    y_tr, y_tg = y[rest].astype(np.float64), y[tgt].astype(np.float64)
    if task == "regression":
        ym, ys = y_tr.mean(), y_tr.std() or 1.0
        y_tr, y_tg = (y_tr - ym) / ys, (y_tg - ym) / ys
    num_outputs = int(y.max()) + 1 if task == "multiclass" else 1
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    return Split(name, task, t(x_tr), t(y_tr), t(x_tg), t(y_tg), num_outputs, image_shape)


def _pool(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return x
    n, c, h, w = x.shape
    h2, w2 = h // k, w // k
    return x[:, :, : h2 * k, : w2 * k].reshape(n, c, h2, k, w2, k).mean(axis=(3, 5))


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray, Task]:
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "diabetes": datasets.load_diabetes, "wine": datasets.load_wine}[name]
    bunch = loader()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
    if name == "digits":
        return (x.reshape(-1, 1, 8, 8) * (255.0 / 16.0)), y, "multiclass"
    if name == "breast_cancer":
        return x, y, "binary"
    if name == "diabetes":
        return x, y, "regression"
    return x, y, "multiclass"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzip-compressed) as a uint8 array; the magic number is checked."""
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(str(path), None, "magic", "not an unsigned-byte idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(str(path), None, "dims", f"header says {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def _idx_images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Training images when present (full set), else the t10k images."""
    for prefix in ("train", "t10k"):
        images = folder / f"{prefix}-images-idx3-ubyte.gz"
        if images.is_file():
            x = read_idx(images)
            y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
            if len(x) != len(y):
                raise DataError(str(images), None, None, f"{len(x)} images but {len(y)} labels")
            return x[:, None, :, :], y.astype(np.int64)
    raise DataError(str(folder), None, None, "no train-/t10k-images-idx3-ubyte.gz found (set IAIF_SHARED_DATA or data_dir)")


def _cifar10(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = next((root / d for d in ("cifar10", "cifar-10-batches-py") if (root / d).is_dir()), None)
    if folder is None:
        raise DataError(str(root / "cifar10"), None, None, "CIFAR-10 python batches not found")
    xs, ys = [], []
    for path in sorted(folder.glob("data_batch_*")) or [folder / "test_batch"]:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        if b"data" not in batch or b"labels" not in batch:
            raise DataError(str(path), None, "data/labels", "not a CIFAR-10 python batch")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _csv_table(path: Path, delimiter: str, target: str, drop: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Numeric CSV with a header: features (all columns but ``drop`` and ``target``) and the target."""
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found (set IAIF_SHARED_DATA or data_dir)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = [h.strip() for h in next(reader)]
        if target not in header:
            raise DataError(str(path), 1, target, "target column missing from the header")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(str(path), line, None, f"{len(row)} fields, header has {len(header)}")
            values = []
            for name, cell in zip(header, row):
                try:
                    values.append(float(cell))
                except ValueError:
                    raise DataError(str(path), line, name, f"not a number: {cell!r}") from None
            rows.append(values)
    table = np.asarray(rows, dtype=np.float64)
    keep = [i for i, h in enumerate(header) if h not in drop and h != target]
    return table[:, keep], table[:, header.index(target)]
