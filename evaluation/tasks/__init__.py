"""Offline lm-eval tasks built from local files (the shared data folder, the demo targets)."""

from iaif.evaluation.tasks.build import BuiltTasks, TaskEntry, build_tasks, default_data_dir
from iaif.evaluation.tasks.sources import BENCHMARKS

__all__ = ["BENCHMARKS", "BuiltTasks", "TaskEntry", "build_tasks", "default_data_dir"]
