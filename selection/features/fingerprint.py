"""What a feature store was computed from, on the data side, and the check that data read later is
the same: one definition for extract (which records it) and select / attribute (which check it).

A store's features are determined, on the data side, by each example's id, token ids and loss mask
(these cover the records' content, the tokenizer, the template and max_length). Extract records

* ``meta.json`` ``dataset_fingerprint``: a hash over every stored example, in order;
* ``digests.json``: ``[[id, digest], ...]``, one digest per stored example (same serialisation).

``check_stores`` tokenises the examples a stage reads with the store's own tokenizer, template
and max_length and refuses any whose digest differs from the one recorded for its id, naming the
store, the data file and the first differing id. Stores written before ``digests.json`` existed are
checked against the whole ``dataset_fingerprint`` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from iaif.selection.features.store import FeatureStore, StoreMismatchError, sampled_row_example
from iaif.training.data import Example, TokenizedExample, tokenize_example

logger = logging.getLogger(__name__)

DIGESTS_FILE = "digests.json"
EXCLUDED_FILE = "excluded.json"


def _serialised(ex: TokenizedExample) -> bytes:
    return json.dumps([ex.id, ex.input_ids, ex.labels], separators=(",", ":")).encode()


def example_digest(ex: TokenizedExample) -> str:
    """Hash (16 hex digits) of one example's id, token ids and loss mask."""
    return hashlib.sha256(_serialised(ex)).hexdigest()[:16]


def dataset_fingerprint(examples: Iterable[TokenizedExample]) -> str:
    """Hash of the ids, token ids and loss masks in order (so it covers data, tokenizer, template and max_length)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(_serialised(ex))
    return digest.hexdigest()[:16]


def write_digests(out_dir: str | Path, examples: Sequence[TokenizedExample]) -> None:
    """``digests.json`` of a store being written (extract)."""
    from iaif.common.atomic import write_text

    write_text(Path(out_dir) / DIGESTS_FILE, json.dumps([[ex.id, example_digest(ex)] for ex in examples]))


def store_example_ids(store: FeatureStore) -> list[str]:
    """Ids of the examples a store was made from (rows ``<id>#<r>`` of sampled-label stores folded)."""
    if store.meta.sampled_labels:
        return list(dict.fromkeys(map(sampled_row_example, store.ids)))
    return list(store.ids)


def excluded_ids(store: FeatureStore) -> set[str]:
    """Ids extract left out of the store (no answer tokens within max_length), from ``excluded.json``."""
    path = store.path / EXCLUDED_FILE
    if not path.is_file():
        return set()
    return {str(e["id"]) for e in json.loads(path.read_text(encoding="utf-8"))}


@lru_cache(maxsize=4)
def _load_tokenizer(model: str, revision: str | None) -> Any:
    from iaif.training.lora import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=model, revision=revision or "main"))


def check_stores(paths: Sequence[str | Path], examples: Sequence[Example]) -> list[FeatureStore]:
    """Open the stores of ``paths`` and refuse ``examples`` unless each one a store lists is exactly
    what its features were computed from (module docstring); the error names the store, the
    example's file and line, and its id. Examples a store does not list are not checked here (the
    caller decides whether they may be missing). Returns the opened stores."""
    stores = [FeatureStore.open(p) for p in paths]
    tokenised: dict[tuple[Any, ...], dict[str, TokenizedExample]] = {}
    for store in stores:
        meta = store.meta
        listed = set(store_example_ids(store))
        read = [ex for ex in examples if ex.id in listed]
        if not read:
            continue
        files = ", ".join(dict.fromkeys(ex.source for ex in read))
        key = (meta.model, meta.model_revision, meta.template, meta.max_length)
        cache = tokenised.setdefault(key, {})
        todo = [ex for ex in read if ex.id not in cache]
        if todo:
            tokenizer = _tokenizer(store, files)
            cache.update((ex.id, tokenize_example(ex, tokenizer, key[2], key[3])) for ex in todo)
        _compare(store, read, [cache[ex.id] for ex in read], files)
        logger.info("%s: %d example(s) of %s match the store", store.path, len(read), files)
    return stores


def _tokenizer(store: FeatureStore, files: str) -> Any:
    try:
        return _load_tokenizer(store.meta.model, store.meta.model_revision)
    except OSError as err:
        raise StoreMismatchError(f"{store.path}: cannot load its tokenizer {store.meta.model!r} to check it against "
                                 f"{files} ({str(err).splitlines()[0]})") from None


def _compare(store: FeatureStore, read: Sequence[Example], tokens: Sequence[TokenizedExample], files: str) -> None:
    meta = store.meta
    how = f"under the store's tokenizer {meta.model}, template {meta.template}, max_length {meta.max_length}"
    digests_file = store.path / DIGESTS_FILE
    if digests_file.is_file():
        recorded = dict(json.loads(digests_file.read_text(encoding="utf-8")))
        for ex, tok in zip(read, tokens):
            if recorded.get(tok.id) != example_digest(tok):
                raise StoreMismatchError(
                    f"{store.path} does not match {ex.source}: example '{ex.id}' (line {ex.line}) differs from the one its "
                    f"features were computed from ({how}); re-run extract on {ex.source}")
        return
    if dataset_fingerprint(tokens) != meta.dataset_fingerprint:
        first = next((a for a, b in zip([t.id for t in tokens], store_example_ids(store)) if a != b), None)
        which = f"first differing id '{first}'" if first else "an example's content differs (store without digests.json)"
        raise StoreMismatchError(f"{store.path} does not match {files}: dataset fingerprint differs, {which} ({how}); "
                                 f"re-run extract on {files}")
