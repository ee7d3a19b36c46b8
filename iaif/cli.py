"""The ``iaif`` command: one subcommand per stage.

Each stage is a dataclass config plus a function taking it (``iaif.stages``). They are imported only
when the stage runs, so ``iaif --help`` stays fast. ``python -m iaif STAGE`` and
``accelerate launch -m iaif STAGE`` go through the same ``main``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from iaif.stages import STAGES, Loaded, Stage

if TYPE_CHECKING:
    from iaif.pipeline import PipelineConfig


def _run() -> Loaded[PipelineConfig]:
    from iaif.pipeline import PipelineConfig, run_pipeline

    return PipelineConfig, run_pipeline


def _demo() -> Loaded[PipelineConfig]:
    from iaif.pipeline import PipelineConfig, run_demo

    return PipelineConfig, run_demo


COMMANDS: dict[str, Stage[Any]] = {
    **STAGES,
    "run": Stage("the whole pipeline from a config: warm-up, extract, select, train, eval, report", _run),
    "demo": Stage("the whole pipeline on the embedded default (tiny model, generated data)", _demo),
}
"""Every subcommand: the stages (``iaif.stages``) and the pipeline over them."""

POSITIONAL_CONFIG_STAGES = {"run"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: iaif STAGE [--config FILE.yaml] [--field value ...]", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {stage.help}" for name, stage in COMMANDS.items()]
    lines += ["", "`iaif STAGE --help` lists a stage's settings."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] in ("-V", "--version"):
        from iaif import __version__

        print(__version__)
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"iaif: unknown stage '{name}'\n\n{_usage()}")
    if name in POSITIONAL_CONFIG_STAGES and rest and not rest[0].startswith("-"):
        rest = ["--config", rest[0], *rest[1:]]
    from iaif.common.progress import log_to_stderr, on_terminal

    log_to_stderr()

    if not on_terminal():  # redirected log: no Hugging Face progress bars (ours write one line every 30 s)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from iaif.config import ConfigError, parse_stage_config
    from iaif.training.lora import hide_bitsandbytes

    hide_bitsandbytes()  # imported only when a 4-bit model is asked for

    stage = COMMANDS[name]
    config_class, run = stage.load()
    try:
        config = parse_stage_config(config_class, rest, prog=f"iaif {name}", description=stage.help)
    except ConfigError as err:
        sys.exit(f"iaif {name}: {err}")
    try:
        run(config)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: a clear message, no traceback
        logging.getLogger("iaif").debug("stage %s failed", name, exc_info=True)
        sys.exit(f"iaif {name}: {err}")
    from iaif.common.dist import leave_launch

    leave_launch()
