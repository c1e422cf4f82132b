# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""TRANSITION BRIDGE: delete this file together with the `from .modelcard_safevlm import write_model_card` line of
`modeling_safevlm.py`, once `save_pretrained` reaches the card writer through its own hook.

The model-card generator no longer travels in checkpoints: it lives in `safevlm_hf.hub.model_card`. Until the modeling
file stops importing it from here, this bridge forwards the call to the writer that `safevlm_hf` installs when it is
imported; code loaded with `trust_remote_code=True` in a process without safevlm-hf writes no card.
"""

from __future__ import annotations

from typing import Any


_installed_writer: Any = None


def install_model_card_writer(writer: Any) -> None:
    """Called by `safevlm_hf/__init__.py` with `safevlm_hf.hub.model_card.write_model_card`."""
    global _installed_writer
    _installed_writer = writer


def write_model_card(save_directory: Any, config: Any, overwrite: bool = False, repo_id: Any = None) -> bool:
    """Write the card through the installed writer; `False` (nothing written) when none is installed."""
    if _installed_writer is None:
        return False
    return _installed_writer(save_directory, config, overwrite=overwrite, repo_id=repo_id)
