"""Shared fixtures: a private model cache, the tiny locally-built model, and skip rules."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never write into the user's cache, except that the converted SmolLM2 cache is shared with
# the user's (converting takes ~20 s; reusing it keeps the slow tests short).
_USER_CACHE = Path(os.environ.get("LIT_MORAL_CACHE", Path.home() / ".cache" / "lit_moral"))
_TMP_CACHE = Path(tempfile.mkdtemp(prefix="lit_moral_test_cache_"))
os.environ["LIT_MORAL_CACHE"] = str(_TMP_CACHE)
if (_USER_CACHE / "smollm2-135m-instruct").is_dir():
    (_TMP_CACHE / "smollm2-135m-instruct").symlink_to(_USER_CACHE / "smollm2-135m-instruct")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """``(model, tokenizer)`` of the tiny 2-layer Llama built locally (the real loading code runs)."""
    from lit_moral import models

    return models.load("tiny")


@pytest.fixture(scope="session")
def tiny_dir():
    from lit_moral import models

    return models.resolve("tiny")


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model (slow tests only)."""
    from lit_moral import models

    return models.load(models.SMOLLM2)
