"""What exactly was evaluated: SHA-256 of weight files and of in-memory state dicts, and the Hub revision.

A report that names a model by its path and config cannot tell a model from its fine-tuned copy (same config);
these hashes can. :func:`weights_fingerprint` hashes the ``*.safetensors`` files a model was loaded from, or - for a
model that lives only in memory, or on request - its state dict tensor by tensor.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: Any) -> str:
    """SHA-256 over a module's state dict: for each entry in name order, its name, dtype, shape and raw bytes.

    Equal for two models with bit-identical tensors under the same names, whatever device or file they come from.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        flat = tensor.reshape(-1).contiguous().cpu()
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _hub_snapshot(model_id: str, revision: str | None) -> Path | None:
    """The local Hub-cache folder of ``model_id`` at ``revision`` (no download), or ``None``."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            model_id, revision=revision, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]
        )
    except Exception:  # not a Hub id, not cached, or offline without the files: the caller falls back
        return None
    return Path(folder)


def weights_fingerprint(model: Any, source: str = "auto") -> dict[str, Any]:
    """Identify a model's weights.

    Args:
        model: a ``PreTrainedModel`` (or any ``torch.nn.Module``).
        source: ``"files"`` - SHA-256 of each ``*.safetensors`` file in the folder (or Hub cache snapshot) the model
            was loaded from; ``"state_dict"`` - :func:`state_dict_sha256` of the weights as they are in memory;
            ``"auto"`` - files when there are any, else the state dict.

    Returns ``{"method": "safetensors_files", "files": {name: sha256}, "revision": ...}`` or
    ``{"method": "state_dict", "sha256": ..., "revision": ...}``. File hashes identify what was loaded; a model
    edited in memory after loading is identified only by ``source="state_dict"``.
    """
    if source not in ("auto", "files", "state_dict"):
        raise ValueError(f"source must be 'auto', 'files' or 'state_dict', got {source!r}.")
    config = getattr(model, "config", None)
    name = str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    revision = getattr(config, "_commit_hash", None)
    if source != "state_dict" and name:
        folder = Path(name) if Path(name).is_dir() else _hub_snapshot(name, revision)
        files = _weight_files(folder) if folder is not None else []
        if files:
            return {
                "method": "safetensors_files",
                "files": {file.name: file_sha256(file) for file in files},
                "revision": revision,
            }
    if source == "files":
        raise FileNotFoundError(
            f"No *.safetensors files found for model {name or type(model).__name__!r}; use source='state_dict'."
        )
    return {"method": "state_dict", "sha256": state_dict_sha256(model), "revision": revision}


__all__ = ["file_sha256", "state_dict_sha256", "weights_fingerprint"]
