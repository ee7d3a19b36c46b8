"""Atomic writes: a file (or folder) is written under a temporary name beside its target and then
renamed onto it, so a reader or a resumed job sees the old content or the whole new one, never a
torn file.

One temporary-name scheme for the whole package: ``.<name>.tmp-<pid>`` in the target's folder
(hidden, so globs over outputs skip it; the pid keeps concurrent writers apart).
:func:`remove_stale_temps`, called by the next run of a stage, deletes what killed writers left behind:
only temporaries whose process is gone, so a concurrent writer's work is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
TEMP_MARK = ".tmp-"
_TEMP = re.compile(r"^\.(.+)\.tmp-(\d+)$")


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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier call are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        return True
    return True


def remove_stale_temps(folder: str | Path, names: str | Iterable[str] | None = None) -> list[Path]:
    """Delete ``folder/.NAME.tmp-<pid>`` files or folders (of the given target name(s); None: any)
    whose process is gone; returns what was removed (each is logged)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else {names} if isinstance(names, str) else set(names)
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMP.match(entry.name)
        if not match or (wanted is not None and match.group(1) not in wanted) or _alive(int(match.group(2))):
            continue
        _remove(entry)
        logger.info("removed %s, left by an interrupted run", entry)
        removed.append(entry)
    return removed


def append_line(path: str | Path, line: str) -> Path:
    """Append one line (no newline inside) to ``path`` as one locked write, so concurrent writers never
    interleave; a torn last line that a killed writer left (no final newline) is cut off first."""
    import fcntl

    if "\n" in line:
        raise ValueError("append_line: the line must not contain a newline")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            fh.seek(0)
            content = fh.read()
            if content and not content.endswith(b"\n"):
                fh.truncate(content.rfind(b"\n") + 1)
                logger.info("%s: cut off a torn last line left by an interrupted writer", path)
            fh.seek(0, os.SEEK_END)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return path
