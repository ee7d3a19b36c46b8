"""Progress of long loops: a tqdm bar on a terminal; in a redirected log, one line every so often.

``progress(total=..., desc=...)`` returns an object with ``update(n)``, ``set_postfix(**values)``
and ``close()`` (a context manager too); ``progress_iter(iterable, total, desc)`` wraps a loop.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger("iaif.progress")
T = TypeVar("T")
LOG_EVERY_S = 30.0
"""Seconds between two progress lines in a redirected log."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: int = logging.INFO) -> None:
    """The command's logging: timestamped lines on stderr (also for worker processes, which inherit none)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def on_terminal() -> bool:
    """Whether stderr (where bars and logs go) is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class LineProgress:
    """tqdm's small interface, writing a log line at most every ``every_s`` seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = LOG_EVERY_S, disable: bool = False):
        self.total, self.desc, self.unit, self.every_s, self.disable = total, desc, unit, every_s, disable
        self.n, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._log(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _log(self, now: float) -> None:
        if self.disable:
            return
        rate = self.n / max(now - self.start, 1e-9)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        logger.info("%s: %d/%d %s%s, %.3g %s/s%s", self.desc, self.n, self.total, self.unit, share, rate, self.unit, extra)

    def close(self) -> None:
        self._log(time.perf_counter())
        self.disable = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", disable: bool = False, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar on a terminal, else a ``LineProgress``."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, **tqdm_kwargs)
    return LineProgress(total, desc, unit, disable=disable)


def progress_iter(iterable: Iterable[T], total: int, desc: str, unit: str = "it", disable: bool = False) -> Iterator[T]:
    """``iterable`` with progress reported as ``progress`` does."""
    bar = progress(total, desc, unit, disable=disable)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
