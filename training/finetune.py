"""LoRA / QLoRA fine-tuning with the transformers ``Trainer`` (``iaif train``).

Single process (``iaif train``) or several (``accelerate launch -m iaif train``: DDP, or FSDP with
``configs/accelerate/fsdp.yaml``). Defaults follow the LESS recipe (METHOD.md §3): LoRA r=128,
alpha=512, dropout 0.1 on q/k/v/o; AdamW, lr 2e-5, linear decay with 3% warm-up; 4 epochs;
bf16 on a GPU; max length 2048; effective batch 128 through gradient accumulation. The loss is
the mean over answer (assistant) tokens of each effective batch; prompt tokens are masked.

``build_trainer`` is the one place a ``Trainer`` is configured; the tiny model's pre-training and
the warm-up stage reuse it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from iaif.common.contracts import ADAPTER_DIR
from iaif.common.dist import is_main_process, min_across_processes, process_state
from iaif.common.oom import largest_fitting
from iaif.common.progress import on_terminal
from iaif.common.provenance import CONFIG_FILE, config_to_dict, write_run_info
from iaif.training.collate import PaddingCollator, TokenizedDataset
from iaif.training.data import DataConfig, Example, Exclusion, TextFormat, TokenizedExample, load_examples, tokenize_examples
from iaif.training.lora import (
    LoraSettings,
    ModelConfig,
    add_lora,
    load_base_model,
    load_tokenizer,
    quiet_peft_calls,
    resolve_precision,
)

logger = logging.getLogger(__name__)

TRAINER_DIR = "trainer"
SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainingSettings:
    """Optimisation settings (defaults: the LESS recipe)."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler name (linear, cosine, constant_with_warmup, ...)."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    num_epochs: int = 4
    """Passes over the training set."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run num_epochs whole epochs)."""
    effective_batch_size: int = 128
    """Examples per optimizer step over all processes: per_device_batch_size x processes x accumulation."""
    per_device_batch_size: int | Literal["auto"] = 1
    """Examples per forward pass on each process; auto: the largest divisor of effective_batch_size / processes
    at which a training step on the longest examples fits in memory (halved on out-of-memory; logged and
    written to train_summary.json)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    seed: int = 0
    """Seed of the LoRA initialisation, data order and dropout."""
    logging_steps: int = 1
    """Log loss and learning rate every N optimizer steps."""
    save_steps: int = 0
    """Save a resumable Trainer checkpoint every N optimizer steps (0: at each epoch end; -1: never)."""
    keep_checkpoints: int = 1
    """Resumable Trainer checkpoints kept (the oldest are deleted)."""


@dataclass
class TrainConfig:
    """`iaif train`: LoRA / QLoRA fine-tuning on a pool or on a `selected.jsonl` from `iaif select`."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data: a pool or the selected subset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and precision (precision 4bit = QLoRA)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter."""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    """Optimisation."""
    text: TextFormat = field(default_factory=TextFormat)
    """Prompt template and token limit (the block every text stage shares)."""
    output_dir: str = "runs/train"
    """Output folder: adapter/, trainer/ (resumable checkpoints), train_summary.json, config.yaml, run_info.json."""
    resume: bool = True
    """Continue from the last checkpoint in output_dir/trainer if there is one."""


def world_size() -> int:
    """Number of training processes (``WORLD_SIZE`` set by accelerate/torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch_size(settings: TrainingSettings) -> int:
    """The per-device batch size (an error while it is still auto: ``resolve_batch_size`` resolves it)."""
    if settings.per_device_batch_size == "auto":
        raise ValueError("training.per_device_batch_size: auto is resolved by train_adapter (resolve_batch_size)")
    return settings.per_device_batch_size


def gradient_accumulation_steps(settings: TrainingSettings, processes: int) -> int:
    """Accumulation steps giving ``effective_batch_size``; it must divide exactly."""
    per_step = per_device_batch_size(settings) * processes
    if settings.effective_batch_size % per_step:
        raise ValueError(
            f"training.effective_batch_size={settings.effective_batch_size} is not a multiple of "
            f"per_device_batch_size={settings.per_device_batch_size} x {processes} processes"
        )
    return settings.effective_batch_size // per_step


def training_arguments(settings: TrainingSettings, output_dir: str | Path, precision: str = "fp32") -> Any:
    """``TrainingArguments`` for these settings (AdamW, per-epoch or per-N-steps resumable checkpoints)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # a value below 1 is a ratio of the optimizer steps
        num_train_epochs=settings.num_epochs,
        max_steps=settings.max_steps if settings.max_steps > 0 else -1,
        per_device_train_batch_size=per_device_batch_size(settings),
        gradient_accumulation_steps=gradient_accumulation_steps(settings, world_size()),
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_epsilon=settings.adam_epsilon,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        seed=settings.seed,
        bf16=precision in ("bf16", "4bit"),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if settings.save_steps > 0 else "epoch" if settings.save_steps == 0 else "no",
        save_steps=settings.save_steps if settings.save_steps > 0 else 500,
        save_total_limit=settings.keep_checkpoints,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=not on_terminal(),  # redirected logs get the one-line loss logs instead of a bar
    )


def resolve_batch_size(settings: TrainingSettings, model: Any, examples: Sequence[TokenizedExample], pad_token_id: int,
                       precision: str, resume_from: str | None = None) -> TrainingSettings:
    """``settings`` with ``per_device_batch_size: auto`` replaced by the size found: the one a resumed
    run (``resume_from``) started with, else the largest divisor of the per-process share of the
    effective batch at which a forward and backward pass on the longest examples fits in memory
    (``largest_fitting``; over several processes the smallest of theirs). The probe leaves the
    random state and the gradients as they were."""
    if settings.per_device_batch_size != "auto":
        return settings
    processes = world_size()
    if settings.effective_batch_size % processes:
        raise ValueError(f"training.effective_batch_size={settings.effective_batch_size} is not a multiple of "
                         f"{processes} processes")
    share = settings.effective_batch_size // processes
    if resume_from is not None:
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text(encoding="utf-8"))
        logger.info("per_device_batch_size auto: resuming with %d", state["train_batch_size"])
        return replace(settings, per_device_batch_size=int(state["train_batch_size"]))
    device = process_state().device
    if not getattr(model, "hf_device_map", None):  # 4-bit models are placed when loaded
        model.to(device)
    longest = sorted(examples, key=lambda ex: (-len(ex), ex.id))
    collate = PaddingCollator(pad_token_id)

    def probe(size: int) -> None:
        batch = collate([{"input_ids": ex.input_ids, "labels": ex.labels} for ex in longest[:size]])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision in ("bf16", "4bit")):
                    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
            finally:
                model.zero_grad(set_to_none=True)

    start = max(d for d in range(1, min(share, len(examples)) + 1) if share % d == 0)
    found = largest_fitting(probe, start, allowed=lambda d: share % d == 0, what="training.per_device_batch_size")
    size = min_across_processes(found)
    logger.info("per_device_batch_size auto: %d examples per forward pass", size)
    return replace(settings, per_device_batch_size=size)


def build_trainer(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TokenizedExample],
    settings: TrainingSettings,
    output_dir: str | Path,
    precision: str = "fp32",
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``Trainer`` for ``model`` on tokenised examples (labels IGNORE_INDEX where no loss)."""
    from transformers import Trainer

    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token id (load it with iaif.training.lora.load_tokenizer)")
    return Trainer(
        model=model,
        args=training_arguments(settings, output_dir, precision),
        train_dataset=TokenizedDataset(examples),
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def last_trainer_checkpoint(trainer_dir: str | Path) -> str | None:
    """The newest resumable Trainer checkpoint under ``trainer_dir``, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(trainer_dir)) if Path(trainer_dir).is_dir() else None


def prepare_output(output_dir: str | Path, config: Any, stage: str, resume: bool) -> str | None:
    """Check the output folder against the config and return the checkpoint to resume from.

    Resuming needs the same settings as the interrupted run (``resume`` and ``output_dir`` aside); starting
    fresh needs a folder without checkpoints. Writes config.yaml/run_info.json (main process)."""
    out = Path(output_dir)
    state = process_state()
    with state.main_process_first():  # the main process writes config.yaml before the others read it
        checkpoint = last_trainer_checkpoint(out / TRAINER_DIR)
        if checkpoint is not None:
            _check_resumable(out, config, resume)
            logger.info("resuming from %s", checkpoint)
        if state.is_main_process:
            write_run_info(out, config, stage)
    return checkpoint


def _check_resumable(out: Path, config: Any, resume: bool) -> None:
    if not resume:
        raise ValueError(f"{out}: holds checkpoints of an earlier run; set resume=true or use another output_dir")
    if not (out / CONFIG_FILE).is_file():
        return
    saved = yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8"))
    current = config_to_dict(config)
    for key in ("resume", "output_dir"):  # a moved folder may resume
        saved.pop(key, None)
        current.pop(key, None)
    changed = _changed_settings(saved, current)
    if changed:
        raise ValueError(f"{out / CONFIG_FILE}: cannot resume with changed settings: {'; '.join(changed)} "
                         "(set them back, or use another output_dir)")


def _changed_settings(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """'field.sub: saved value (earlier run) -> new value' for every leaf setting that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in _changed_settings(saved.get(key), current.get(key), f"{prefix}{key}.")]
    if saved == current:
        return []
    return [f"{prefix.rstrip('.')}: {saved!r} (earlier run) -> {current!r}"]


def train_adapter(
    cfg: TrainConfig, examples: Sequence[Example], stage: str, callbacks: Sequence[Any] = ()
) -> tuple[Any, list[Exclusion]]:
    """Tokenise, load base model + fresh LoRA adapter, train (resuming if possible).
    Returns the finished ``Trainer`` and the excluded examples."""
    from transformers import set_seed

    out = Path(cfg.output_dir)
    checkpoint = prepare_output(out, cfg, stage, cfg.resume)
    precision = resolve_precision(cfg.model.precision)
    tokenizer = load_tokenizer(cfg.model)
    kept, excluded = tokenize_examples(examples, tokenizer, cfg.text.template, cfg.text.max_length)
    set_seed(cfg.training.seed)
    model = add_lora(load_base_model(cfg.model), cfg.lora)
    settings = resolve_batch_size(cfg.training, model, kept, tokenizer.pad_token_id, precision, checkpoint)
    trainer = build_trainer(model, tokenizer, kept, settings, out / TRAINER_DIR, precision, callbacks)
    logger.info(
        "%s: %d examples (%d excluded), %d processes, per-device batch %d, accumulation %d, %s",
        stage, len(kept), len(excluded), world_size(), trainer.args.per_device_train_batch_size,
        trainer.args.gradient_accumulation_steps, precision,
    )
    if len(kept) < cfg.training.effective_batch_size:
        logger.warning("only %d examples for an effective batch of %d: one optimizer step per epoch",
                       len(kept), cfg.training.effective_batch_size)
    with quiet_peft_calls():  # the Trainer saves the adapter at every checkpoint
        trainer.train(resume_from_checkpoint=checkpoint)
    return trainer, excluded


def write_summary(trainer: Any, out: Path, n_examples: int, excluded: Sequence[Exclusion], **extra: Any) -> None:
    """``train_summary.json``: example counts, exclusions, steps, batch size used, final loss, the Trainer's log history."""
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "examples": n_examples,
        "trained_examples": n_examples - len(excluded),
        "excluded": [vars(e) for e in excluded],
        "global_step": trainer.state.global_step,
        "per_device_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        **extra,
        "log_history": trainer.state.log_history,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")


def run_train(cfg: TrainConfig) -> Path:
    """Fine-tune a LoRA adapter on ``cfg.data``; write ``OUTPUT_DIR/adapter`` and a summary."""
    out = Path(cfg.output_dir)
    examples = load_examples(cfg.data)
    trainer, excluded = train_adapter(cfg, examples, "train")
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file for save_pretrained
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    with quiet_peft_calls():
        trainer.save_model(str(out / ADAPTER_DIR))
    if is_main_process():
        write_summary(trainer, out, len(examples), excluded)
        logger.info("adapter written to %s", out / ADAPTER_DIR)
    return out
