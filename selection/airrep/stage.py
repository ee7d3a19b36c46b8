"""``iaif airrep``: train AirRep on subset tables and save it; loading it and scoring with it.

The frozen representations are the base model's RDS+ embeddings (``iaif.selection.baselines.rds``) of the
rendered pool and target examples. Output: ``OUTPUT_DIR/airrep.pt`` (weights, sizes and ``meta``: base
model, template, max_length, the (table, subset) keys trained on, the split settings, the loss curve),
``config.yaml``, ``run_info.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from iaif.common.atomic import atomic_path
from iaif.common.provenance import write_run_info
from iaif.selection.airrep.model import AirRep, AirRepShape
from iaif.selection.airrep.train import AirRepTraining, train_airrep, training_tables
from iaif.selection.baselines.rds import rds_embeddings
from iaif.training.data import DataConfig, Example, Template, TextFormat, load_examples

logger = logging.getLogger(__name__)
MODEL_FILE = "airrep.pt"


@dataclass
class AirRepConfig:
    """Settings of `iaif airrep`."""

    tables: list[str] = field(default_factory=list)
    """subsets.jsonl files of `iaif subsets` (one per subset size)."""
    pool: str = ""
    """The pool the subsets were drawn from."""
    targets: list[str] = field(default_factory=list)
    """The target files the subsets' losses were measured on."""
    model: str = ""
    """Base model (Hub id or local folder) whose hidden states are the frozen representations."""
    text: TextFormat = field(default_factory=TextFormat)
    """Rendering and token limit of the examples."""
    batch_size: int = 16
    """Examples per forward pass of the base model."""
    device: str = "cpu"
    """cpu or cuda[:i]."""
    holdout_fraction: float = 0.5
    """Share of each table's subsets kept out of training (the LDS evaluation split, `iaif lds`)."""
    split_seed: int = 0
    """Seed of the split (the same value in `iaif lds` keeps its evaluation subsets out of training)."""
    training: AirRepTraining = field(default_factory=AirRepTraining)
    """Head size and optimisation."""
    output_dir: str = "runs/airrep"
    """Folder of airrep.pt, config.yaml, run_info.json."""


def embed(examples: Sequence[Example], model: str, template: Template, max_length: int, batch_size: int,
          device: str) -> torch.Tensor:
    """The frozen representations: RDS+ embeddings of the base model."""
    return rds_embeddings(examples, model, template, max_length, batch_size, device)


def save_airrep(path: str | Path, model: AirRep, meta: dict[str, Any]) -> Path:
    """Weights, sizes and meta in one file, written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "shape": asdict(model.shape), "meta": meta}, tmp)
    return Path(path)


def load_airrep(path: str | Path) -> tuple[AirRep, dict[str, Any]]:
    """A saved AirRep model (eval mode) and its meta; a missing or foreign file is an error naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no AirRep model (train one with iaif airrep)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"state_dict", "shape", "meta"} <= set(blob):
        raise ValueError(f"{path}: not an AirRep model file (expected state_dict, shape, meta)")
    model = AirRep(AirRepShape(**blob["shape"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["meta"]


def run_airrep(cfg: AirRepConfig) -> Path:
    """Train AirRep on the training split of ``cfg.tables`` and write ``airrep.pt``."""
    from iaif.selection.select import load_targets

    if not cfg.tables:
        raise ValueError("tables: give at least one subsets.jsonl of iaif subsets")
    if not cfg.pool:
        raise ValueError("pool: give the pool file the subsets were drawn from")
    pool = load_examples(DataConfig(path=cfg.pool))
    targets = load_targets(cfg.targets)
    tables, keys = training_tables(cfg.tables, [e.id for e in pool], cfg.holdout_fraction, cfg.split_seed)
    pool_x = embed(pool, cfg.model, cfg.text.template, cfg.text.max_length, cfg.batch_size, cfg.device)
    target_x = embed(targets, cfg.model, cfg.text.template, cfg.text.max_length, cfg.batch_size, cfg.device)
    model, curve = train_airrep(pool_x, target_x, tables, cfg.training)
    meta = {"model": cfg.model, "template": cfg.text.template, "max_length": cfg.text.max_length,
            "trained_on": [list(k) for k in keys], "holdout_fraction": cfg.holdout_fraction,
            "split_seed": cfg.split_seed, "loss_curve": [curve[0], curve[-1]]}
    out = Path(cfg.output_dir)
    write_run_info(out, cfg, "airrep")
    save_airrep(out / MODEL_FILE, model, meta)
    logger.info("AirRep trained on %d subsets of %d table(s) -> %s", len(keys), len(tables), out / MODEL_FILE)
    return out
