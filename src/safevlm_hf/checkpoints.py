# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Checks on a local checkpoint folder before a command loads it.

`from_pretrained` on a corrupted or truncated safetensors file raises the library's `SafetensorError` without saying
which file it was reading (a sharded checkpoint has many); :func:`check_safetensors_files` opens each file's header
first (memory-mapped, nothing is read into memory) so that the error names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read; the message names it and says what to do."""


def check_safetensors_files(model: str | os.PathLike) -> list[Path]:
    """Open the header of every ``*.safetensors`` file of a local checkpoint folder; returns the files checked.

    A Hub id (no such local folder) is left to `from_pretrained`, which reports its own errors.

    Raises:
        CheckpointFileError: a file is not a readable safetensors file (corrupted, truncated, not safetensors).
    """
    folder = Path(model)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass  # opening parses and validates the header and that the data covers the whole file
        except (SafetensorError, OSError) as err:
            raise CheckpointFileError(
                f"{path}: not a readable safetensors file ({err}); it is corrupted or truncated. Save or download "
                "the checkpoint again."
            ) from None
    return files


__all__ = ["CheckpointFileError", "check_safetensors_files"]
