"""LoRA warm-up on a seeded random fraction of the pool (``iaif warmup``), saving one checkpoint
per epoch (adapter, Adam state by parameter name, mean learning rate) for the feature extractor.

Each epoch's mean learning rate is the mean of the rates the optimizer used at that epoch's
steps, from the same scheduler the Trainer builds, so it is known before the run ends and
survives a resume; ``lr_weight`` normalises it to sum 1 over the run's epochs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from iaif.common.dist import is_main_process
from iaif.training.checkpoint import checkpoint_dir, save_checkpoint
from iaif.training.data import Example, load_examples
from iaif.training.finetune import TrainConfig, train_adapter, write_summary

logger = logging.getLogger(__name__)

SAMPLE_FILE = "warmup_examples.json"


@dataclass
class WarmupConfig(TrainConfig):
    """`iaif warmup`: LoRA warm-up on a random fraction of the pool, one checkpoint per epoch."""

    output_dir: str = "runs/warmup"
    """Output folder: checkpoint-epoch{E}/, trainer/ (resumable), warmup_examples.json, config.yaml, run_info.json."""
    fraction: float = 0.05
    """Fraction of the pool to train on (LESS: 5%)."""
    sample_seed: int = 0
    """Seed of the random choice of the warm-up examples."""


def sample_fraction(examples: Sequence[Example], fraction: float, seed: int) -> list[Example]:
    """A seeded random ``fraction`` of ``examples`` (at least one), kept in pool order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * len(examples)))
    chosen = sorted(random.Random(seed).sample(range(len(examples)), k))
    return [examples[i] for i in chosen]


def scheduled_learning_rates(args: Any, max_steps: int) -> list[float]:
    """The learning rate of each optimizer step 0..max_steps-1 under ``args``' scheduler."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=probe, num_warmup_steps=args.get_warmup_steps(max_steps),
        num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    rates = []
    for _ in range(max_steps):
        rates.append(float(scheduler.get_last_lr()[0]))
        probe.step()
        scheduler.step()
    return rates


def epoch_mean_learning_rates(rates: Sequence[float], num_epochs: int) -> list[float]:
    """Mean learning rate of each epoch, the steps split evenly over epochs as the Trainer does."""
    if len(rates) % num_epochs:
        raise ValueError(f"{len(rates)} optimizer steps do not split into {num_epochs} equal epochs")
    per_epoch = len(rates) // num_epochs
    return [sum(rates[e * per_epoch:(e + 1) * per_epoch]) / per_epoch for e in range(num_epochs)]


def learning_rate_weights(means: Sequence[float]) -> list[float]:
    """Mean learning rates normalised to sum 1 (uniform if they are all 0)."""
    total = sum(means)
    return [m / total for m in means] if total > 0 else [1.0 / len(means)] * len(means)


class EpochCheckpointCallback(TrainerCallback):
    """Saves ``checkpoint-epoch{E}`` (adapter, named Adam state, mean lr) at the end of each epoch."""

    def __init__(self, warmup_dir: str | Path, base_model: str):
        self.warmup_dir = Path(warmup_dir)
        self.base_model = base_model
        self.epoch_means: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        num_epochs = int(args.num_train_epochs)
        self.epoch_means = epoch_mean_learning_rates(scheduled_learning_rates(args, state.max_steps), num_epochs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        num_epochs = len(self.epoch_means)
        epoch = round(state.epoch)
        expected_step = epoch * state.max_steps // num_epochs
        if state.global_step != expected_step:
            raise RuntimeError(f"epoch {epoch} ended at optimizer step {state.global_step}, expected {expected_step}")
        if not state.is_world_process_zero:
            return
        mean_lr = self.epoch_means[epoch - 1]
        path = save_checkpoint(
            checkpoint_dir(self.warmup_dir, epoch), model, optimizer,
            epoch=epoch, num_epochs=num_epochs, global_step=state.global_step,
            mean_lr=mean_lr, lr_weight=learning_rate_weights(self.epoch_means)[epoch - 1], base_model=self.base_model,
        )
        logger.info("warm-up checkpoint %s (mean lr %.3g)", path, mean_lr)


def run_warmup(cfg: WarmupConfig) -> Path:
    """Train a LoRA adapter on a random fraction of the pool; write one checkpoint per epoch."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("iaif warmup does not run under FSDP (its checkpoints need the whole optimizer state "
                         "by parameter name); use single_gpu.yaml or multi_gpu.yaml (DDP)")
    if cfg.training.max_steps:
        raise ValueError("training.max_steps: the warm-up runs whole epochs (one checkpoint each); leave it 0")
    out = Path(cfg.output_dir)
    pool = load_examples(cfg.data)
    chosen = sample_fraction(pool, cfg.fraction, cfg.sample_seed)
    logger.info("warm-up on %d of %d pool examples (fraction %.3g, seed %d)", len(chosen), len(pool), cfg.fraction, cfg.sample_seed)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / SAMPLE_FILE).write_text(json.dumps([e.id for e in chosen], indent=1), encoding="utf-8")
    callback = EpochCheckpointCallback(out, cfg.model.name_or_path)
    trainer, excluded = train_adapter(cfg, chosen, "warmup", callbacks=[callback])
    if is_main_process():
        write_summary(trainer, out, len(chosen), excluded, pool_examples=len(pool), epoch_mean_lrs=callback.epoch_means)
    return out
