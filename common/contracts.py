"""What crosses a stage boundary on disk: the names of the files a stage leaves for the next one,
and the file whose presence marks a stage's output folder as finished (written after the rest
of the stage's output). Stages write these names and the pipeline reads
them to chain stages and to skip finished steps; no other module spells them.

The content of each file has one owner: ``meta.json`` is ``iaif.selection.features.store.StoreMeta``,
``selected.jsonl``/``summary.json`` are written by ``iaif.selection.select.write_selection``,
``scores.json`` by ``iaif.evaluation.lm_eval_runner``.
"""

from __future__ import annotations

from pathlib import Path

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
