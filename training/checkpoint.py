"""Warm-up checkpoints: the LoRA adapter, the Adam state keyed by parameter name, and the
checkpoint's mean learning rate, everything the feature extractor needs, checked on load.

Layout of ``WARMUP_DIR/checkpoint-epoch{E}/``:

- ``adapter/``: peft ``save_pretrained`` output;
- ``optimizer_state.pt``: ``{"state": {param_name: {"exp_avg", "exp_avg_sq", "step"}}, "betas": [b1, b2],
  "eps": float}``, keyed by the PeftModel's ``named_parameters()`` names of the trainable parameters;
- ``checkpoint.json``: ``epoch, num_epochs, global_step, mean_lr, lr_weight, base_model, adapter_hash``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iaif.common.atomic import remove_stale_temps, temp_path
from iaif.common.contracts import ADAPTER_DIR
from iaif.training.lora import adapter_hash, quiet_peft_calls

OPTIMIZER_FILE = "optimizer_state.pt"
META_FILE = "checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint-epoch"
ADAPTER_NAME = "default"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A warm-up checkpoint that is missing, incomplete or inconsistent; the message names the file."""


@dataclass(frozen=True)
class WarmupCheckpoint:
    """A loaded and checked warm-up checkpoint."""

    path: Path
    epoch: int
    num_epochs: int
    global_step: int
    mean_lr: float
    lr_weight: float
    base_model: str
    adapter_hash: str
    betas: tuple[float, float]
    eps: float
    state: dict[str, dict[str, Any]]
    """``{param_name: {"exp_avg", "exp_avg_sq", "step"}}``, keyed by the PeftModel's
    ``named_parameters()`` names of the trainable LoRA parameters."""

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR


def checkpoint_dir(warmup_dir: str | Path, epoch: int) -> Path:
    """``WARMUP_DIR/checkpoint-epoch{epoch}``."""
    return Path(warmup_dir) / f"{CHECKPOINT_PREFIX}{epoch}"


def adapter_key(param_name: str) -> str:
    """Key of a PeftModel parameter in the saved adapter weights (peft drops the adapter name)."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The Adam(W) state of every trainable parameter of ``model``, keyed by its name.

    The torch optimizer keys its state by parameter object; each is mapped to its name in
    ``model.named_parameters()``. Every trainable parameter must have state and every optimised
    parameter must be a trainable parameter of ``model``."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    groups = optimizer.param_groups
    betas = {tuple(float(b) for b in g["betas"]) for g in groups if "betas" in g}
    eps = {float(g["eps"]) for g in groups if "eps" in g}
    if len(betas) != 1 or len(eps) != 1:
        raise CheckpointError(f"optimizer {type(optimizer).__name__}: expected one Adam betas/eps setting, got betas={betas} eps={eps}")
    state: dict[str, dict[str, Any]] = {}
    for group in groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise CheckpointError("optimizer holds a parameter that is not a trainable parameter of the model")
            s = optimizer.state.get(p, {})
            if "exp_avg" not in s or "exp_avg_sq" not in s:
                raise CheckpointError(f"optimizer has no Adam state for '{name}' (no optimizer step taken yet?)")
            if s["exp_avg"].shape != p.shape or s["exp_avg_sq"].shape != p.shape:
                raise CheckpointError(f"optimizer state of '{name}' has shape {tuple(s['exp_avg'].shape)}, parameter {tuple(p.shape)}")
            state[name] = {
                "exp_avg": s["exp_avg"].detach().float().cpu().clone(),
                "exp_avg_sq": s["exp_avg_sq"].detach().float().cpu().clone(),
                "step": int(s["step"]),
            }
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise CheckpointError(f"{len(missing)} trainable parameters are not in the optimizer, e.g. {missing[:3]}")
    (b1, b2), = betas
    return {"state": state, "betas": [b1, b2], "eps": eps.pop()}


def save_checkpoint(
    directory: str | Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    num_epochs: int,
    global_step: int,
    mean_lr: float,
    lr_weight: float,
    base_model: str,
) -> Path:
    """Write a warm-up checkpoint of a PeftModel and its optimizer; atomic (temp folder, rename)."""
    directory = Path(directory)
    remove_stale_temps(directory.parent, directory.name)
    tmp = temp_path(directory)
    tmp.mkdir(parents=True)
    opt_state = optimizer_state_by_name(model, optimizer)
    with quiet_peft_calls():
        model.save_pretrained(str(tmp / ADAPTER_DIR))
    torch.save(opt_state, tmp / OPTIMIZER_FILE)
    meta = {
        "epoch": epoch,
        "num_epochs": num_epochs,
        "global_step": global_step,
        "mean_lr": mean_lr,
        "lr_weight": lr_weight,
        "base_model": base_model,
        "adapter_hash": adapter_hash(tmp / ADAPTER_DIR),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    _check(tmp, meta, opt_state)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load_checkpoint(directory: str | Path) -> WarmupCheckpoint:
    """Load a warm-up checkpoint and check it: files present, metadata well-typed, adapter hash,
    and optimizer state naming exactly the adapter's parameters with their shapes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    for name in (META_FILE, OPTIMIZER_FILE, ADAPTER_DIR):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory}: {name} missing")
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory / META_FILE}: malformed JSON ({err.msg})") from None
    try:
        opt_state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many error types for a damaged file
        raise CheckpointError(f"{directory / OPTIMIZER_FILE}: cannot be read ({err})") from None
    _check(directory, meta, opt_state)
    return WarmupCheckpoint(
        path=directory,
        epoch=meta["epoch"],
        num_epochs=meta["num_epochs"],
        global_step=meta["global_step"],
        mean_lr=float(meta["mean_lr"]),
        lr_weight=float(meta["lr_weight"]),
        base_model=meta["base_model"],
        adapter_hash=meta["adapter_hash"],
        betas=(float(opt_state["betas"][0]), float(opt_state["betas"][1])),
        eps=float(opt_state["eps"]),
        state=opt_state["state"],
    )


def recorded_adapter_hash(directory: str | Path) -> str:
    """The adapter hash a checkpoint records in ``checkpoint.json`` (the key its feature stores carry),
    read without loading the checkpoint; a missing or malformed file is an error naming it."""
    meta_file = Path(directory) / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing (not a warm-up checkpoint?)")
    try:
        value = json.loads(meta_file.read_text(encoding="utf-8")).get("adapter_hash")
    except (json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{meta_file}: not a JSON object of checkpoint settings ({err})") from None
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{meta_file}: field 'adapter_hash' missing or not a string")
    return value


def list_checkpoints(warmup_dir: str | Path, require_complete: bool = True) -> list[Path]:
    """The run's ``checkpoint-epoch{E}`` folders in epoch order. With ``require_complete``, every
    epoch 1..num_epochs must be there (an interrupted warm-up must be resumed first)."""
    warmup_dir = Path(warmup_dir)
    found = sorted(
        (int(m.group(1)), p) for p in warmup_dir.glob(f"{CHECKPOINT_PREFIX}*") if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()
    )
    if not found:
        raise CheckpointError(f"{warmup_dir}: no {CHECKPOINT_PREFIX}N folders (run `iaif warmup` first)")
    if require_complete:
        meta_file = found[-1][1] / META_FILE
        if not meta_file.is_file():
            raise CheckpointError(f"{found[-1][1]}: {META_FILE} missing")
        num_epochs = json.loads(meta_file.read_text(encoding="utf-8")).get("num_epochs")
        epochs = [e for e, _ in found]
        if epochs != list(range(1, (num_epochs or 0) + 1)):
            raise CheckpointError(
                f"{warmup_dir}: the warm-up has {num_epochs} epochs but checkpoints for epochs {epochs}; "
                "resume it with `iaif warmup` (same output_dir)"
            )
    return [p for _, p in found]


def _check(directory: Path, meta: Any, opt_state: Any) -> None:
    meta_file, opt_file = directory / META_FILE, directory / OPTIMIZER_FILE
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object")
    fields: dict[str, type | tuple[type, ...]] = {"epoch": int, "num_epochs": int, "global_step": int, "mean_lr": (int, float),
              "lr_weight": (int, float), "base_model": str, "adapter_hash": str}
    for key, kind in fields.items():
        if key not in meta:
            raise CheckpointError(f"{meta_file}: field '{key}' missing")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{meta_file}: field '{key}' has the wrong type ({type(meta[key]).__name__})")
    if not 1 <= meta["epoch"] <= meta["num_epochs"]:
        raise CheckpointError(f"{meta_file}: field 'epoch' = {meta['epoch']} outside 1..{meta['num_epochs']}")
    if not (math.isfinite(meta["mean_lr"]) and meta["mean_lr"] >= 0 and 0 <= meta["lr_weight"] <= 1):
        raise CheckpointError(f"{meta_file}: mean_lr={meta['mean_lr']} / lr_weight={meta['lr_weight']} out of range")
    actual_hash = adapter_hash(directory / ADAPTER_DIR)
    if actual_hash != meta["adapter_hash"]:
        raise CheckpointError(f"{meta_file}: field 'adapter_hash' {meta['adapter_hash']} does not match the adapter ({actual_hash})")

    if not isinstance(opt_state, dict) or not {"state", "betas", "eps"} <= set(opt_state):
        raise CheckpointError(f"{opt_file}: expected a dict with 'state', 'betas', 'eps'")
    betas, eps = opt_state["betas"], opt_state["eps"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in betas)):
        raise CheckpointError(f"{opt_file}: 'betas' must be two floats in [0, 1), got {betas!r}")
    if not (isinstance(eps, float) and eps > 0):
        raise CheckpointError(f"{opt_file}: 'eps' must be a positive float, got {eps!r}")
    state = opt_state["state"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{opt_file}: 'state' is empty")

    from safetensors import safe_open

    with safe_open(str(directory / ADAPTER_DIR / "adapter_model.safetensors"), framework="pt") as fh:
        adapter_shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    problem = adam_state_mismatch(state, adapter_shapes, key=adapter_key)
    if problem:
        raise CheckpointError(f"{opt_file}: {problem}")


def adam_state_mismatch(state: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                        key: Callable[[str], str] = str) -> str | None:
    """Why an Adam state ``{param name: {"exp_avg", "exp_avg_sq", "step"}}`` does not fit the adapter
    weights ``shapes`` (keyed by ``key(param name)``), or None: the same parameters, a positive int
    step and both moments of the weight's shape."""
    by_key = {key(name): name for name in state}
    missing = sorted(set(shapes) - set(by_key))
    unexpected = sorted(set(by_key) - set(shapes))
    if missing or unexpected:
        return (f"optimizer state does not match the adapter: {len(missing)} adapter parameters without state "
                f"(e.g. {missing[:2]}), {len(unexpected)} state entries not in the adapter "
                f"(e.g. {[by_key[k] for k in unexpected[:2]]})")
    for k, name in by_key.items():
        entry = state[name]
        if not isinstance(entry, Mapping) or not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            return f"optimizer state of '{name}' needs exp_avg, exp_avg_sq and step"
        if not isinstance(entry["step"], int) or entry["step"] < 1:
            return f"optimizer state of '{name}': step must be a positive int, got {entry['step']!r}"
        for moment in ("exp_avg", "exp_avg_sq"):
            tensor = entry[moment]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shapes[k]):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                return f"optimizer state of '{name}': {moment} has shape {shape}, adapter weight {tuple(shapes[k])}"
    return None
