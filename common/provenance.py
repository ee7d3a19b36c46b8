"""Record what produced an output folder: resolved config, package version, git commit."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

RUN_INFO_FILE = "run_info.json"
CONFIG_FILE = "config.yaml"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iaif")
    except PackageNotFoundError:
        return "0+unknown"


def git_commit(cwd: Path | None = None) -> str | None:
    """Commit of the checkout this package runs from (with '-dirty' when it has changes), or None."""
    here = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config (nested allowed) as plain YAML-safe data."""
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    data = dataclasses.asdict(config) if is_instance else dict(config)
    return json.loads(json.dumps(data, default=str))


def write_run_info(output_dir: str | Path, config: Any, stage: str) -> Path:
    """Write ``config.yaml`` (the resolved config, replayable with --config) and ``run_info.json``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CONFIG_FILE, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(config), fh, sort_keys=False)
    info = {
        "stage": stage,
        "iaif_version": package_version(),
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": _library_versions(),
    }
    with open(out / RUN_INFO_FILE, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
    return out


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
