"""Training on a subset of the training split with the one recipe of the benchmark, cached on disk.

Every model (the base model on the seed set, every retraining on seed set ∪ picks, the all-pool
reference) is trained from the same initialisation θ₀ (PyTorch's default under the run's seed) by
full-batch L-BFGS on (1/|S|) Σ_{i∈S} ℓ_i(θ) + (l2/2)‖θ‖² (``iaif.evaluation.fidelity.retrain.fit``).
The cache key is everything that determines θ: dataset spec, seed, model spec, fit settings,
torch version and the sorted training indices.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from iaif.evaluation.fidelity.datasets import Split
from iaif.evaluation.fidelity.models import FlatModel, ModelKind
from iaif.evaluation.fidelity.objective import Problem, example_losses
from iaif.evaluation.fidelity.retrain import FitSettings, fit, group_key


@dataclass(frozen=True)
class ModelSpec:
    kind: ModelKind
    hidden: tuple[int, ...] = ()
    activation: str = "tanh"
    l2: float = 1e-3


def subset_problem(model: FlatModel, split: Split, index: np.ndarray, l2: float,
                   x_target: torch.Tensor, y_target: torch.Tensor) -> Problem:
    """The training problem on the rows ``index`` of ``split``'s training part, with the given target."""
    idx = torch.as_tensor(np.sort(index))
    part = Split(split.name, split.task, split.x_train[idx], split.y_train[idx], x_target, y_target,
                 split.num_outputs, split.image_shape)
    return Problem(model, part, l2)


class SubsetTrainer:
    """θ of the recipe on any subset of one split's training part, cached under ``folder``."""

    def __init__(self, model: FlatModel, split: Split, spec: ModelSpec, theta0: torch.Tensor, settings: FitSettings,
                 folder: Path | None, fingerprint: object):
        self.model, self.split, self.spec, self.theta0, self.settings = model, split, spec, theta0, settings
        self.folder = folder
        key = json.dumps([fingerprint, asdict(spec), asdict(settings), torch.__version__], sort_keys=True, default=str)
        self.prefix = hashlib.sha1(key.encode()).hexdigest()[:12]
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.trained = 0

    def problem(self, index: np.ndarray, x_target: torch.Tensor, y_target: torch.Tensor) -> Problem:
        return subset_problem(self.model, self.split, index, self.spec.l2, x_target, y_target)

    def fit(self, index: np.ndarray) -> torch.Tensor:
        """θ trained on the rows ``index`` (order and repeats ignored)."""
        index = np.unique(np.asarray(index, dtype=np.int64))
        path = None if self.folder is None else self.folder / f"{self.prefix}-{len(index)}-{group_key(index)}.pt"
        if path is not None and path.is_file():
            return torch.load(path)
        problem = self.problem(index, self.split.x_target[:1], self.split.y_target[:1])
        theta = fit(problem, self.theta0, self.settings)
        self.trained += 1
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save(theta, tmp)
            tmp.replace(path)
        return theta

    def metrics(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) of θ on (x, y)."""
        with torch.no_grad():
            out = self.model(theta, x)
            loss = float(example_losses(self.split.task, out, y).mean())
            acc = float((out.argmax(dim=1) == y.long()).double().mean())
        return loss, acc
