"""Config loading: a dataclass config, defaults overridden by a YAML file, then by command-line
flags (tyro), e.g. ``iaif select --config configs/demo_select.yaml --k 100 --method less``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml
from omegaconf import OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value that does not fit the stage's config."""


def config_from_yaml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Build ``cls`` from a YAML file, type-checked; unknown keys are an error naming the file.

    With ``section``, read that top-level key (pipeline YAMLs hold one section per stage)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if section is not None:
        data = data.get(section, {}) or {}
    return config_from_dict(cls, data, origin=str(path))


def config_from_dict(cls: type[T], data: dict[str, Any], origin: str = "<dict>") -> T:
    """Build ``cls`` from nested plain data, with OmegaConf's type checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except Exception as err:  # omegaconf raises several error types; all mean a bad config
        raise ConfigError(f"{origin}: {err}") from None


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
