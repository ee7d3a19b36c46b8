"""Adam-preconditioned update directions (LESS): Γ = m' / (√v' + ε) with
m' = β1·m + (1−β1)·g and v' = β2·v + (1−β2)·g², from a checkpoint's saved optimizer state
looked up by parameter name (no bias correction, as in LESS)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from iaif.training.checkpoint import adam_state_mismatch


class OptimizerStateError(ValueError):
    """The optimizer state does not match the adapter's LoRA parameters."""


def adam_direction(
    grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """Γ for a batch of per-example gradients ``[B, *shape]`` against moments of ``shape``."""
    v = torch.addcmul(beta2 * exp_avg_sq, grads, grads, value=1.0 - beta2)
    m = torch.add(beta1 * exp_avg, grads, alpha=1.0 - beta1)
    return m.div_(v.sqrt_().add_(eps))


class AdamPreconditioner:
    """Adam moments for every LoRA parameter, checked against the adapter's names and shapes."""

    def __init__(
        self,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        betas: Sequence[float],
        eps: float,
        shapes: Mapping[str, tuple[int, ...]],
    ):
        """``state``: ``{param_name: {"exp_avg", "exp_avg_sq", "step"}}``; ``shapes``: the adapter's
        LoRA parameter names and shapes, which must be exactly the state's."""
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise OptimizerStateError(f"betas must be two numbers in [0, 1), got {list(betas)}")
        if not eps > 0:
            raise OptimizerStateError(f"eps must be positive, got {eps}")
        problem = adam_state_mismatch(state, shapes)
        if problem:
            raise OptimizerStateError(problem)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in shapes:
            entry = state[name]
            if bool((entry["exp_avg_sq"] < 0).any()):
                raise OptimizerStateError(f"optimizer state of {name}: exp_avg_sq has negative entries")
            self._moments[name] = (entry["exp_avg"].float(), entry["exp_avg_sq"].float())

    def direction(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Γ for ``[B, *shape]`` per-example gradients of parameter ``name``."""
        exp_avg, exp_avg_sq = self._moments[name]
        if exp_avg.device != grads.device:
            exp_avg, exp_avg_sq = exp_avg.to(grads.device), exp_avg_sq.to(grads.device)
            self._moments[name] = (exp_avg, exp_avg_sq)
        return adam_direction(grads, exp_avg, exp_avg_sq, self.beta1, self.beta2, self.eps)
