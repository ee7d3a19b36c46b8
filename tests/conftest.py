"""Shared fixtures. The tiny model is built once per test session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(os.environ.get("IAIF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (the small-model benchmarks are bit-for-bit repeatable on one
    thread), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $IAIF_SHARED_DATA); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (set IAIF_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small Llama-style model + tokenizer (HF folder), built by iaif.demo.tiny_model."""
    from iaif.demo.tiny_model import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    return build_tiny_model(TinyModelConfig.for_tests(output_dir=str(out)))
