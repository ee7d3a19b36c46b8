"""Config loading: a dataclass config, defaults overridden by a YAML file, then by command-line
flags (tyro), e.g. ``iaif select --config configs/demo_select.yaml --k 100 --method less``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value that does not fit the stage's config."""


def config_from_yaml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Build ``cls`` from a YAML file, type-checked; unknown keys are an error naming the file.

    With ``section``, read that top-level key (pipeline YAMLs hold one section per stage)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path)
    if section is not None:
        data = data.get(section, {}) or {}
    return config_from_dict(cls, data, origin=str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping (empty: {}); a syntax error names the file, line and column."""
    from iaif.training.data import DataError, read_text

    try:
        text = read_text(path)
    except DataError as err:
        raise ConfigError(str(err)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        column = f" at column {mark.column + 1}" if mark is not None else ""
        started = f"{err.context} started at line {context.line + 1}: " if context is not None and err.context else ""
        raise ConfigError(f"{where}: malformed YAML ({started}{problem}{column})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value), got a YAML {type(data).__name__}")
    return data


def config_from_dict(cls: type[T], data: dict[str, Any], origin: str = "<dict>") -> T:
    """Build ``cls`` from nested plain data, with OmegaConf's type checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{origin}: {omegaconf_error_text(err)}") from None
    except Exception as err:  # a config's own check (__post_init__) or another bad value
        raise ConfigError(f"{origin}: {err}") from None


def omegaconf_error_text(err: OmegaConfBaseException, section: str | None = None) -> str:
    """One line for an OmegaConf type error: ``key.path: message``, the key under ``section`` if given."""
    key = getattr(err, "full_key", None)
    where = ".".join(str(part) for part in (section, key) if part)
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"{where}: {message}" if where else message


def parse_stage_config(cls: type[T], argv: Sequence[str], prog: str, description: str) -> T:
    """Parse ``[--config FILE] [--field value ...]`` into ``cls``: defaults < YAML < flags."""
    argv = list(argv)
    default = cls()
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file")
        default = config_from_yaml(cls, argv[i + 1])
        del argv[i : i + 2]
    return tyro.cli(
        cls,
        args=argv,
        default=default,
        prog=prog,
        description=description + "\n\nAll flags may also come from --config FILE.yaml (flags win).",
        config=(tyro.conf.FlagConversionOff,),
    )
