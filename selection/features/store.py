"""Feature store: ``features.npy`` ([N, d], opened memory-mapped), ``ids.json`` (row order) and
``meta.json`` (what made it). While a job runs, each process writes finished shards to
``.shards/shard-XXXXX.npz`` (atomic rename); a killed job resumes from them and the finished store
is assembled from the shards in dataset order. ``meta.json`` is written last: a folder without it
is not a store. Its schema is :class:`StoreMeta`, written and read here only. Rows are named by
example id; a sampled-label store (``sampled_labels`` R > 0) has R rows ``<id>#<r>`` per example
(``sampled_row_id`` writes them, ``sampled_row_example`` reads them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from iaif.common.atomic import atomic_path, remove_stale_temps, write_json
from iaif.common.contracts import STORE_META_FILE as META_FILE
from iaif.training.data import Template

FEATURES_FILE = "features.npy"
IDS_FILE = "ids.json"
SHARD_DIR = ".shards"
JOB_FILE = "job.json"

MODEL_KEYS = ("model", "model_revision", "template_hash")
PROJECTION_KEYS = ("projection", "projection_seed", "dim", "projection_version")
DATASET_KEYS = ("dataset_fingerprint",)


def sampled_row_id(example_id: str, draw: int) -> str:
    """Id of draw ``draw`` of example ``example_id`` in a sampled-label store: ``<id>#<draw>``."""
    return f"{example_id}#{draw}"


def sampled_row_example(row_id: str) -> str:
    """The example id of a sampled-label store row (the inverse of ``sampled_row_id``)."""
    return row_id.rsplit("#", 1)[0]


class StoreMismatchError(ValueError):
    """Stores (or a store and a job) made with another model, projection or dataset."""


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def require_match(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    """Raise ``StoreMismatchError`` naming every key of ``keys`` where ``a`` and ``b`` differ."""
    diffs = _differences(a, b, keys)
    if diffs:
        raise StoreMismatchError(f"{what}: " + "; ".join(diffs))


@dataclass(frozen=True)
class StoreMeta:
    """What made a store (``meta.json``): model, checkpoint, feature kind, projection, dataset, template."""

    model: str
    model_revision: str
    precision: str
    checkpoint: str | None
    """The warm-up checkpoint or adapter folder; None for a fresh (untrained) LoRA."""
    adapter_hash: str
    lr_weight: float | None
    """The checkpoint's learning-rate weight (None without a warm-up checkpoint)."""
    feature: str
    projection: str
    projection_seed: int
    dim: int
    projection_version: int
    dtype: str
    dataset: str
    dataset_fingerprint: str
    num_examples: int
    num_excluded: int
    template: Template
    template_hash: str
    max_length: int
    lora_parameters: int
    normalised: bool
    sampled_labels: int
    sample_seed: int | None
    tool_version: str
    epoch: int | None = None
    """Warm-up epoch of the checkpoint; like ``mean_lr``, only in stores of warm-up checkpoints."""
    mean_lr: float | None = None
    token_budget: int | None = None
    """Padded tokens per batch the extraction used (given, or found by ``token_budget: auto``); None in
    stores written before it was recorded. It does not change the features."""

    def to_dict(self) -> dict[str, Any]:
        """The ``meta.json`` content (the optional ``epoch``/``mean_lr``/``token_budget`` left out when None)."""
        data = asdict(self)
        return {k: v for k, v in data.items() if not (k in _OPTIONAL and v is None)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str) -> StoreMeta:
        """From ``meta.json`` content; unknown or missing keys are an error naming ``origin``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - _OPTIONAL)
        if unknown or missing:
            raise StoreMismatchError(f"{origin}: not a store of this version: "
                                     + "; ".join(([f"unknown keys {unknown}"] if unknown else [])
                                                 + ([f"missing keys {missing}"] if missing else [])))
        return cls(**data)

    @classmethod
    def read(cls, path: str | Path) -> StoreMeta:
        """Read a ``meta.json`` file."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), str(path))


_OPTIONAL = frozenset({"epoch", "mean_lr", "token_budget"})
"""Keys a ``meta.json`` may lack (read as None): the checkpoint-only ones, and those newer than some stores."""


@dataclass
class FeatureStore:
    """An opened store: ``features`` is a read-only memory map [N, d]."""

    path: Path
    features: np.ndarray
    ids: list[str]
    meta: StoreMeta

    @staticmethod
    def read_meta(path: str | Path) -> StoreMeta:
        """The metadata of a finished store (folder ``path``), without opening its features."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            partial = (path / SHARD_DIR).is_dir()
            raise FileNotFoundError(
                f"{path}: not a finished feature store ({META_FILE} missing"
                + ("; an unfinished extract job is there, rerun it to resume" if partial else "") + ")"
            )
        return StoreMeta.read(path / META_FILE)

    @classmethod
    def open(cls, path: str | Path, expect: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open a finished store; with ``expect``, every given meta key must have that value."""
        path = Path(path)
        meta = cls.read_meta(path)
        ids = json.loads((path / IDS_FILE).read_text(encoding="utf-8"))
        features = np.load(path / FEATURES_FILE, mmap_mode="r")
        if features.shape != (len(ids), meta.dim) or str(features.dtype) != meta.dtype:
            raise StoreMismatchError(
                f"{path}: {FEATURES_FILE} is {features.dtype}{list(features.shape)}, "
                f"meta says {meta.dtype}[{len(ids)}, {meta.dim}]"
            )
        if expect:
            require_match(meta.to_dict(), expect, list(expect), f"{path}")
        return cls(path, features, ids, meta)

    def check_compatible(self, other: FeatureStore, same_dataset: bool) -> None:
        """Refuse to combine with a store of another model, template or projection (and, with
        ``same_dataset``, of another dataset: e.g. one pool at several checkpoints)."""
        keys = MODEL_KEYS + PROJECTION_KEYS + (DATASET_KEYS if same_dataset else ())
        require_match(self.meta.to_dict(), other.meta.to_dict(), keys, f"{self.path} and {other.path} cannot be combined")


class ShardWriter:
    """Shards of one extract job in ``out_dir/.shards``, shared by all processes of the job."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.shard_dir = self.out_dir / SHARD_DIR

    def claim(self, job: Mapping[str, Any]) -> None:
        """Start or resume ``job`` (one process only): an unfinished job of another configuration
        in the folder is an error, never mixed in. Removes what killed writers left half-written."""
        remove_stale_temps(self.out_dir)
        remove_stale_temps(self.shard_dir)
        job_file = self.shard_dir / JOB_FILE
        if job_file.is_file():
            previous = json.loads(job_file.read_text(encoding="utf-8"))
            require_match(previous, job, sorted(set(previous) | set(job)),
                          f"{self.out_dir} holds an unfinished extract job with other settings")
            return
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        write_json(job_file, dict(job), indent=2, sort_keys=True)

    def job(self) -> dict[str, Any] | None:
        """The settings of the unfinished job in the folder (``claim``), or None."""
        job_file = self.shard_dir / JOB_FILE
        return json.loads(job_file.read_text(encoding="utf-8")) if job_file.is_file() else None

    def _path(self, shard: int) -> Path:
        return self.shard_dir / f"shard-{shard:05d}.npz"

    def is_done(self, shard: int) -> bool:
        return self._path(shard).is_file()

    def write(self, shard: int, rows: np.ndarray, values: np.ndarray) -> None:
        """Save one finished shard (row indices into the dataset and their features) atomically."""
        with atomic_path(self._path(shard)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, rows=rows, values=values)

    def assemble(self, num_shards: int, ids: Sequence[str], dim: int, dtype: str, meta: StoreMeta) -> Path:
        """Write the finished store from all shards, in dataset order; check no row is missing or doubled."""
        with atomic_path(self.out_dir / FEATURES_FILE) as tmp_features:
            array = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=np.dtype(dtype), shape=(len(ids), dim))
            seen = np.zeros(len(ids), dtype=np.int64)
            for shard in range(num_shards):
                if not self.is_done(shard):
                    raise RuntimeError(f"{self._path(shard)} missing: the job did not finish every shard")
                with np.load(self._path(shard)) as data:
                    rows, values = data["rows"], data["values"]
                array[rows] = values
                np.add.at(seen, rows, 1)
            if not (seen == 1).all():
                bad = np.nonzero(seen != 1)[0][:5].tolist()
                raise RuntimeError(f"rows {bad} were written {seen[bad].tolist()} times; store not assembled")
            array.flush()
            del array
        write_json(self.out_dir / IDS_FILE, list(ids))
        write_json(self.out_dir / META_FILE, meta.to_dict(), indent=2, sort_keys=True)
        shutil.rmtree(self.shard_dir)
        return self.out_dir
