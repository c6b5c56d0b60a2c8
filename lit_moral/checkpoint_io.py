"""Checkpoint files that are never half-written, and unreadable ones reported by name.

Lightning writes checkpoints through a ``CheckpointIO`` plugin; ``AtomicCheckpointIO`` (the CLI's
default) serialises into a temporary file in the target folder, flushes it to disk and renames it over
the target, so a crash or a full disk mid-write leaves the previous checkpoint untouched. Reading a
truncated or corrupt file raises a ConfigError naming ``ckpt_path`` instead of a pickle/zip traceback.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_moral.errors import ConfigError


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and an atomic rename."""
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def replace_dir(build, target: str | os.PathLike) -> None:
    """Write a folder atomically: ``build(tmp_dir)`` fills a sibling temporary folder that then replaces ``target``.

    Args:
        build: called with the temporary folder's path; writes the folder's contents.
        target: the folder to replace; it is left as it was if ``build`` raises.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        build(str(tmp))
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic local writes and a clear error for unreadable checkpoints."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path``; remote paths (``s3://``...) use Lightning's own writer."""
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict:
        """Read ``path``; a truncated, corrupt or non-checkpoint file raises a ConfigError naming it."""
        if _is_local(path) and not Path(str(path).removeprefix("file://")).is_file():
            raise ConfigError(f"ckpt_path: {str(path)!r} does not exist or is not a file")
        try:
            state = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, ImportError,
                pickle.UnpicklingError) as e:
            # torch.load's errors on damaged files (zip or pickle) are long and technical; keep their first line.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"ckpt_path: {str(path)!r} is not a readable checkpoint (truncated or corrupt?): "
                              f"{first}") from None
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ConfigError(f"ckpt_path: {str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
        return state
