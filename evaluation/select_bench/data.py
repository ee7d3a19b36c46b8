"""Data of the selection benchmark: seed set, pool and the two targets, each with a validation and a
test part.

The dataset (``iaif.evaluation.fidelity.datasets``) is split into a training part and a held-out part.
The training part is shuffled into a small random *seed set* (the warm-up data of the base model)
and the *pool* the methods pick from. The held-out part is split in two halves, validation and test.

* ``plain`` target: the validation half (used for selection) and the test half (reported).
* ``shifted`` target: a class-imbalanced subsample of each half: all examples of ``heavy_classes``
  classes drawn with the seed, and a ``light_keep`` share of every other class. The validation and
  test parts stay disjoint; only the validation part is ever used by a selection method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iaif.evaluation.fidelity.datasets import Split, load_split

TARGETS = ("plain", "shifted")


@dataclass(frozen=True)
class DataSpec:
    """One dataset of the benchmark, sized for a CPU."""

    dataset: str
    n_train: int
    """training examples (seed set + pool); 0 = all but the held-out part"""
    n_heldout: int
    """held-out examples, split into validation and test halves"""
    downsample: int = 1
    """k×k pixel averaging of images"""
    n_seed: int = 100
    """seed set of the base model (the warm-up)"""


@dataclass(frozen=True)
class TargetSet:
    """A target: its validation part (selection) and its disjoint test part (metric)."""

    name: str
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    heavy_classes: tuple[int, ...] = ()


@dataclass
class BenchData:
    """Everything one (dataset, seed) run selects from and is measured on."""

    split: Split
    """the fidelity split; its training part is seed set + pool, its target part is unused here"""
    seed_index: np.ndarray
    pool_index: np.ndarray
    targets: dict[str, TargetSet]

    def x(self, index: np.ndarray) -> torch.Tensor:
        return self.split.x_train[torch.as_tensor(index)]

    def y(self, index: np.ndarray) -> torch.Tensor:
        return self.split.y_train[torch.as_tensor(index)]


def shifted_index(y: np.ndarray, heavy: tuple[int, ...], light_keep: float, rng: np.random.Generator) -> np.ndarray:
    """All rows of the heavy classes plus a ``light_keep`` share (at least one) of every other class, sorted."""
    keep = [np.flatnonzero(np.isin(y, heavy))]
    for c in sorted(set(y.tolist()) - set(heavy)):
        rows = np.flatnonzero(y == c)
        keep.append(rng.choice(rows, max(1, round(light_keep * len(rows))), replace=False))
    return np.sort(np.concatenate(keep))


def load_bench_data(spec: DataSpec, data_dir: str | Path | None, seed: int, heavy_classes: int, light_keep: float) -> BenchData:
    """Load and split one dataset for one seed (module docstring)."""
    split = load_split(spec.dataset, data_dir, spec.n_train, spec.n_heldout, seed, spec.downsample)
    if split.task != "multiclass":
        raise ValueError(f"{spec.dataset}: the selection benchmark needs a classification set")
    if not 0 < spec.n_seed < split.n:
        raise ValueError(f"{spec.dataset}: n_seed={spec.n_seed} must be in [1, {split.n - 1}]")
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(split.n)
    seed_index, pool_index = np.sort(order[: spec.n_seed]), np.sort(order[spec.n_seed :])
    held = rng.permutation(len(split.y_target))
    val, test = np.sort(held[: len(held) // 2]), np.sort(held[len(held) // 2 :])
    xt, yt = split.x_target, split.y_target
    targets = {"plain": TargetSet("plain", xt[val], yt[val], xt[test], yt[test])}
    if not 0 < heavy_classes < split.num_outputs:
        raise ValueError(f"heavy_classes={heavy_classes} must be in [1, {split.num_outputs - 1}]")
    if not 0 < light_keep <= 1:
        raise ValueError(f"light_keep={light_keep} must be in (0, 1]")
    heavy = tuple(sorted(rng.choice(split.num_outputs, heavy_classes, replace=False).tolist()))
    sv = val[shifted_index(yt[val].numpy(), heavy, light_keep, rng)]
    st = test[shifted_index(yt[test].numpy(), heavy, light_keep, rng)]
    targets["shifted"] = TargetSet("shifted", xt[sv], yt[sv], xt[st], yt[st], heavy)
    return BenchData(split, seed_index, pool_index, targets)
