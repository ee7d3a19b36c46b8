"""Small models for the fidelity benchmark, used through a flat parameter vector θ.

``logreg`` (one linear layer), ``mlp`` (fully connected, smooth activation) and ``resnet`` (a
ResNet-9-style CNN shrunk for CPU: prep conv, conv+pool with a residual block, conv+pool,
conv+pool with a residual block, global pool, linear head). The CNN is changed where the original
would leave the objective without a smooth minimiser: no normalisation layer (batch norm couples
examples; a bias-free convolution followed by GroupNorm is scale-invariant, so with the L2 term
⟨∇L, W⟩ = λ‖W‖² > 0 and the gradient never vanishes), convolutions with biases and He
initialisation instead, and average instead of max pooling (max pooling makes the loss only
piecewise smooth; L-BFGS stalls far above the 1e-8 gradient tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

ModelKind = Literal["logreg", "mlp", "resnet"]
_ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus, "relu": nn.ReLU}


class _Conv(nn.Conv2d):
    """3×3 convolution with bias, He-initialised (signal keeps its scale through the un-normalised stack)."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _conv_block(c_in: int, c_out: int, activation: str, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [_Conv(c_in, c_out, 3, padding=1), _ACTIVATIONS[activation]()]
    if pool:
        layers.append(nn.AvgPool2d(2, ceil_mode=True))  # 7×7 inputs: 7 → 4 → 2 → 1
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.body = nn.Sequential(_conv_block(channels, channels, activation, False), _conv_block(channels, channels, activation, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 layout (Page, 2018) with ``widths`` = (prep, layer1, layer2, layer3) channels."""

    def __init__(self, in_channels: int, num_outputs: int, widths: Sequence[int], activation: str):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv_block(in_channels, w0, activation, False),
            _conv_block(w0, w1, activation, True), _Residual(w1, activation),
            _conv_block(w1, w2, activation, True),
            _conv_block(w2, w3, activation, True), _Residual(w3, activation),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(w3, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    kind: ModelKind,
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: Sequence[int] = (),
    activation: str = "tanh",
) -> nn.Module:
    """A float64 model. ``hidden``: MLP layer widths, or the four ResNet widths."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; known: {', '.join(_ACTIVATIONS)}")
    flat = math.prod(input_shape)
    if kind == "logreg":
        model: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_outputs))
    elif kind == "mlp":
        if not hidden:
            raise ValueError("mlp needs at least one hidden width")
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip((flat, *hidden[:-1]), hidden):
            layers += [nn.Linear(width_in, width_out), _ACTIVATIONS[activation]()]
        layers.append(nn.Linear(hidden[-1], num_outputs))
        model = nn.Sequential(*layers)
    elif kind == "resnet":
        if len(input_shape) != 3 or len(hidden) != 4:
            raise ValueError("resnet needs image inputs (C, H, W) and four widths in 'hidden'")
        model = ResNet9(input_shape[0], num_outputs, hidden, activation)
    else:
        raise ValueError(f"unknown model kind '{kind}'; known: logreg, mlp, resnet")
    return model.double()


class FlatModel:
    """A module evaluated at a flat parameter vector θ (so Hessians are plain matrices)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [name for name, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def init_params(self, seed: int) -> torch.Tensor:
        """θ₀: PyTorch's default initialisation of every layer under ``seed``."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for layer in self.module.modules():
                reset = getattr(layer, "reset_parameters", None)
                if layer is not self.module and callable(reset):
                    reset()
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}
        return functional_call(self.module, params, (x,))
