# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Publishing a SafeVLM checkpoint: its generated model card (:mod:`.model_card`), the checked one-commit upload to the
Hugging Face Hub (:mod:`.push`) and the ``safevlm push`` command (:mod:`.cli`)."""

from .model_card import (
    GENERATED_MARKER,
    MODEL_CARD_NAME,
    REPO_ID_PLACEHOLDER,
    fill_model_card_repo_id,
    model_card_origin,
    render_model_card,
    write_model_card,
)
from .push import (
    CheckpointFolderError,
    PushCall,
    build_push_call,
    check_upload_folder,
    push_to_hub,
    remote_code_files,
)


__all__ = [
    "CheckpointFolderError",
    "GENERATED_MARKER",
    "MODEL_CARD_NAME",
    "PushCall",
    "REPO_ID_PLACEHOLDER",
    "build_push_call",
    "check_upload_folder",
    "fill_model_card_repo_id",
    "model_card_origin",
    "push_to_hub",
    "remote_code_files",
    "render_model_card",
    "write_model_card",
]
