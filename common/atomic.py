"""Temporary files written beside their final name and renamed into place, and the clean-up of the
ones a killed run left behind.

A temporary file of ``DIR/NAME`` is ``DIR/.NAME.tmp-<pid>``: the pid keeps processes apart, and
``remove_stale_temps`` (called by the next run of the stage) deletes those whose process is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)
_TEMP = re.compile(r"^\.(.+)\.tmp-(\d+)$")


def temp_path(path: str | Path) -> Path:
    """``DIR/.NAME.tmp-<pid>`` for ``DIR/NAME``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary name, then rename it onto ``path``."""
    tmp = temp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def remove_stale_temps(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Delete ``folder/.NAME.tmp-<pid>`` files or folders (of the given names; None: any name) whose
    process is gone; returns what was removed (each is logged)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMP.match(entry.name)
        if not match or (wanted is not None and match.group(1) not in wanted) or _alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        logger.info("removed %s, left by an interrupted run", entry)
        removed.append(entry)
    return removed
