"""Atomic writes: a file (or folder) is written under a temporary name beside its target and then
renamed onto it, so a reader or a resumed job sees the old content or the whole new one, never a
torn file.

One temporary-name scheme for the whole package: ``.<name>.tmp-<pid>`` in the target's folder
(hidden, so globs over outputs skip it; the pid keeps concurrent writers apart).
:func:`remove_stale_temps` deletes what killed writers left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"


def temp_path(path: str | Path) -> Path:
    """The temporary name of ``path`` for this process: ``.<name>.tmp-<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temporary name of ``path`` (parent folders created) for the caller to write; on
    success rename it onto ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """Write ``json.dumps(data, **dumps)`` to ``path`` atomically."""
    return write_text(path, json.dumps(data, **dumps))


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSON lines (non-ASCII kept) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return Path(path)


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders of this scheme in ``folder`` (only those of target
    ``name`` when given); returns what was removed. Call it only while no other process writes there."""
    pattern = f".{name if name is not None else '*'}{TEMP_MARK}*"
    folder = Path(folder)
    stale = sorted(folder.glob(pattern)) if folder.is_dir() else []
    for path in stale:
        _remove(path)
    return stale
