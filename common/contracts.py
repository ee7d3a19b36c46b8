"""What crosses a stage boundary on disk: the names of the files a stage leaves for the next one,
and the file whose presence marks a stage's output folder as finished (written after the rest
of the stage's output). Stages write these names and the pipeline reads
them to chain stages and to skip finished steps; no other module spells them.

The content of each file has one owner: ``meta.json`` is ``iaif.selection.features.store.StoreMeta``,
``selected.jsonl``/``summary.json`` are written by ``iaif.selection.select.write_selection``,
``scores.json`` by ``iaif.evaluation.lm_eval_runner``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STORE_META_FILE = "meta.json"
"""Feature store (``iaif extract``): what made it; written last, so it marks a finished store."""
SELECTED_FILE = "selected.jsonl"
"""Selection (``iaif select``): the chosen records in rank order, the training data of ``iaif train``."""
SELECTION_SUMMARY_FILE = "summary.json"
"""Selection: counts, objective and settings; written last."""
ADAPTER_DIR = "adapter"
"""Fine-tuning (``iaif train``) and warm-up checkpoints: the saved peft adapter folder."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""Inside an adapter folder: the peft config (with ``adapter_model.safetensors``)."""
SCORES_FILE = "scores.json"
"""Evaluation (``iaif eval``): one score per task; written last."""
EVAL_RESULTS_FILE = "lm_eval_results.json"
"""Evaluation: lm-eval's full results."""
DEMO_MANIFEST_FILE = "manifest.json"
"""Demo data (``iaif make-demo-data``): what was generated; a folder with it is complete."""
SUBSETS_FILE = "subsets.jsonl"
"""Subset retraining (``iaif subsets``): one ``SubsetRow`` per line, appended as subsets finish."""

DONE_MARKERS: dict[str, str] = {
    "make-demo-data": DEMO_MANIFEST_FILE,
    "extract": STORE_META_FILE,
    "select": SELECTION_SUMMARY_FILE,
    "train": f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}",
    "eval": SCORES_FILE,
}
"""Stage -> the file (relative to its output folder) whose presence means the stage is done there."""


def done_marker(stage: str, folder: str | Path) -> Path:
    """The file that marks ``stage``'s output in ``folder`` as finished."""
    return Path(folder) / DONE_MARKERS[stage]


@dataclass
class CheckpointStores:
    """One warm-up checkpoint and the feature stores extracted from it, combined per checkpoint by
    ``iaif select``, ``attribute`` and ``lds`` (their YAML's ``checkpoints:`` list, one entry per checkpoint;
    ``iaif.selection.influence.open_checkpoints`` reads them). Every store must record the same adapter hash."""

    pool: str = ""
    """The pool feature store (Adam update directions or gradients)."""
    targets: list[str] = field(default_factory=list)
    """Target feature stores (true-label gradients), e.g. one per target file; their rows are stacked."""
    sampled_targets: list[str] = field(default_factory=list)
    """Sampled-label target stores (curvature=gn)."""
    checkpoint: str = ""
    """The checkpoint folder the stores were extracted from (for messages; empty: unknown)."""
    adapter_hash: str = ""
    """The adapter hash the checkpoint records; empty: the pool store's."""


@dataclass(frozen=True)
class SubsetRow:
    """One row of ``subsets.jsonl``: a subset of the pool fine-tuned on, and the mean target loss after
    training. The row with ``subset == -1`` holds the base model's loss (no training, ``ids`` empty)."""

    subset: int
    ids: list[str]
    target_loss: float
    task_losses: dict[str, float]
    recipe_hash: str
    seconds: float

    @property
    def is_base(self) -> bool:
        return self.subset < 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def read_subset_rows(path: str | Path) -> list[SubsetRow]:
    """Rows of a ``subsets.jsonl`` (a torn last line without newline is ignored); a bad row is an error
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such subset table (run iaif subsets)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the part after the last newline is unfinished
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line)
            rows.append(SubsetRow(int(rec["subset"]), [str(i) for i in rec["ids"]], float(rec["target_loss"]),
                                  {str(k): float(v) for k, v in rec["task_losses"].items()},
                                  str(rec["recipe_hash"]), float(rec["seconds"])))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{lineno}: not a subset row ({type(err).__name__}: {err})") from None
    return rows
