"""Store metadata: ``meta.json`` is exactly a ``StoreMeta``; unknown or missing keys name the file."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from iaif.selection.features.store import StoreMeta, StoreMismatchError

FRESH = {
    "model": "m", "model_revision": "main", "precision": "auto", "checkpoint": None, "adapter_hash": "fresh-0",
    "lr_weight": None, "feature": "grad", "projection": "factorised", "projection_seed": 0, "dim": 8,
    "projection_version": 1, "dtype": "float16", "dataset": "d.jsonl", "dataset_fingerprint": "f", "num_examples": 3,
    "num_excluded": 0, "template": "tulu", "template_hash": "t", "max_length": 64, "lora_parameters": 10,
    "normalised": False, "sampled_labels": 0, "sample_seed": None, "tool_version": "0.1.0",
}


def test_round_trip_keeps_the_json_keys(tmp_path: Path) -> None:
    fresh = StoreMeta.from_dict(FRESH, "x")
    assert fresh.to_dict() == FRESH and fresh.epoch is None  # checkpoint-only keys stay absent
    assert fresh.token_budget is None  # a store written before the budget was recorded still reads
    warm = {**FRESH, "checkpoint": "ckpt", "lr_weight": 0.5, "epoch": 2, "mean_lr": 1e-3, "token_budget": 4096}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(warm))
    assert StoreMeta.read(path).to_dict() == warm
    assert {f.name for f in fields(StoreMeta)} == set(warm)


@pytest.mark.parametrize(("change", "message"), [
    ({"dimm": 8}, r"unknown keys \['dimm'\]"),
    ({"dim": None}, r"missing keys \['dim'\]"),
])
def test_unknown_or_missing_keys_name_the_file(tmp_path: Path, change: dict, message: str) -> None:
    data = {k: v for k, v in {**FRESH, **change}.items() if v is not None or k not in change}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StoreMismatchError, match=f"^{path}: .*{message}"):
        StoreMeta.read(path)
