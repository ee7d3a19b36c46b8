"""Batching of tokenised examples for training: a map-style dataset and a right-padding collator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from iaif.training.data import IGNORE_INDEX, TokenizedExample


class TokenizedDataset(Dataset):
    """Map-style dataset over ``TokenizedExample``s yielding ``{"input_ids", "labels"}`` lists."""

    def __init__(self, examples: Sequence[TokenizedExample]):
        if not examples:
            raise ValueError("no training examples (all were excluded, or the data is empty)")
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


@dataclass
class PaddingCollator:
    """Right-pads a batch: ``pad_token_id`` in input_ids, 0 in attention_mask, IGNORE_INDEX in labels."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            if len(f["labels"]) != n:
                raise ValueError(f"batch row {row}: {n} input_ids but {len(f['labels'])} labels")
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
