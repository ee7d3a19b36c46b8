"""Per-example gradients of LoRA matrices from one batched forward/backward with module hooks.

For a linear map ``y = W x`` applied at every token, the gradient of example b's loss is
``G_b = Σ_t δ_{b,t} x_{b,t}ᵀ`` with ``δ = ∂loss_b/∂y``. The batch loss is ``Σ_b loss_b`` with
``loss_b`` the mean over example b's answer tokens, so ``δ_{b,t}`` is exactly example b's own
gradient (rows of a right-padded causal batch do not interact and padding gets δ = 0).

Forward hooks on every ``lora_A``/``lora_B`` linear layer keep the input x (or its projection) and
put a gradient hook on the output; the backward pass is run towards the input embeddings only, so
autograd computes the δ's and no weight gradient at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from iaif.selection.features.projection import KroneckerProjector
from iaif.training.data import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LoraMatrix:
    """One trainable LoRA matrix: its PeftModel parameter name and its ``nn.Linear``."""

    name: str
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:
        return (self.module.out_features, self.module.in_features)


def find_lora_matrices(model: nn.Module) -> list[LoraMatrix]:
    """Every ``lora_A``/``lora_B`` matrix of the active adapter, in module order.

    Parameter names are those of ``model.named_parameters()`` (the optimizer-state keys)."""
    from peft.tuners.lora import LoraLayer

    found: list[LoraMatrix] = []
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
                raise ValueError(f"{layer_name}: LoRA variants (DoRA etc.) are not supported; plain LoRA only")
            for side in ("lora_A", "lora_B"):
                module = getattr(layer, side)[adapter]
                if type(module) is not nn.Linear or module.bias is not None:
                    raise ValueError(f"{layer_name}.{side}.{adapter}: expected a bias-free nn.Linear, got {module}")
                found.append(LoraMatrix(f"{layer_name}.{side}.{adapter}.weight", module))
    if not found:
        raise ValueError("the model has no LoRA adapter (load a checkpoint or add a fresh LoRA)")
    return found


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean next-token loss over each example's answer tokens (labels ≠ IGNORE_INDEX)."""
    # the labels move one position left (the last position predicts nothing) instead of the logits
    # being sliced, and the classes stay on the contiguous last dimension: over a 128k vocabulary a
    # transposed log-softmax and a slice's backward cost 3x the loss itself (docs/BENCHMARKS.md)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    flat = logits.float().reshape(-1, logits.shape[-1])
    token_loss = F.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"batch rows {torch.nonzero(counts == 0).flatten().tolist()} have no answer token to predict")
    return token_loss.view(shift_labels.shape).sum(dim=1) / counts


GradSink = Callable[[LoraMatrix, torch.Tensor], None]


class LoraGradientHooks:
    """Hooks that turn one batched backward into per-example LoRA gradients.

    ``mode="factorised"``: with ``projectors`` (one ``KroneckerProjector`` per matrix name),
    accumulate ``Σ_m vec(Σ_t (P_out δ_t)(P_in x_t)ᵀ)`` into ``self.features`` ``[B, d]``.
    ``mode="full"``: call ``sink(matrix, G)`` with the exact ``[B, out, in]`` gradient of each matrix
    as soon as the backward pass reaches it. Computation is in fp32 whatever the model dtype.
    """

    def __init__(
        self,
        matrices: list[LoraMatrix],
        mode: Literal["factorised", "full"],
        projectors: dict[str, KroneckerProjector] | None = None,
        sink: GradSink | None = None,
    ):
        if mode == "factorised" and projectors is None:
            raise ValueError("factorised mode needs projectors")
        if mode == "full" and sink is None:
            raise ValueError("full mode needs a sink")
        self.matrices, self.mode, self.sink = matrices, mode, sink
        self.projectors: dict[str, KroneckerProjector] = projectors or {}
        self.features: torch.Tensor | None = None
        self.calls: dict[str, int] = {}
        """How many gradients each matrix received (exactly one per backward when all is well)."""
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LoraGradientHooks:
        for matrix in self.matrices:
            self._handles.append(matrix.module.register_forward_hook(self._forward_hook(matrix)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, matrix: LoraMatrix):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0]
            if self.mode == "factorised":
                _, p_in = self.projectors[matrix.name].matrices(x.device)
                x = x.float() @ p_in.T
            output.register_hook(lambda delta: self._on_delta(matrix, x, delta))

        return hook

    def _on_delta(self, matrix: LoraMatrix, x: torch.Tensor, delta: torch.Tensor) -> None:
        self.calls[matrix.name] = self.calls.get(matrix.name, 0) + 1
        delta = delta.float()
        if self.mode == "factorised":
            p_out, _ = self.projectors[matrix.name].matrices(delta.device)
            part = torch.einsum("bto,bti->boi", delta @ p_out.T, x).flatten(1)
            self.features = part if self.features is None else self.features + part
        elif self.sink is not None:
            self.sink(matrix, torch.einsum("bto,bti->boi", delta, x.float()))


Relabel = Callable[[torch.Tensor], torch.Tensor]
"""Maps the detached ``[B, T, V]`` logits of a batch to the ``[B, T]`` labels its loss uses."""


def backward_per_example(model: PreTrainedModel, batch: dict[str, torch.Tensor], relabel: Relabel | None = None) -> torch.Tensor:
    """Forward ``batch`` (input_ids, attention_mask, labels) and backpropagate ``Σ_b loss_b`` to the
    input embeddings, which fires the hooks of a ``LoraGradientHooks`` context. Returns the ``[B]`` losses.

    With ``relabel``, the loss uses ``relabel(logits)`` instead of ``batch["labels"]`` (the inputs are
    unchanged: e.g. labels sampled from the model's own predictions at each answer position).
    Weights (LoRA included) need not require grad: the graph is rooted at the embeddings."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"] if relabel is None else relabel(logits.detach())
    losses = per_example_loss(logits, labels)
    torch.autograd.grad(losses.sum(), embeds)
    return losses.detach()
