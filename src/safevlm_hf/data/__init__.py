# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""SafeVLM training data: the documented JSONL format, `datasets.Dataset` and VLGuard loaders, Stage I balancing
and the batch collator. See :mod:`safevlm_hf.data.loading` for the format."""

from .collator import SafeVLMDataCollator, chat_messages
from .examples import (
    BadRow,
    SafetyDataError,
    SafetyDataset,
    SafetyExample,
    balance_for_stage1,
    safe_type_index,
)
from .loading import VLGUARD_PREFIX, load_safety_dataset, load_safety_json, safety_dataset_from_hf
from .vlguard import VLGUARD_CATEGORY_FALLBACK, VLGUARD_CATEGORY_MAP, load_vlguard


__all__ = [
    "BadRow",
    "SafeVLMDataCollator",
    "SafetyDataError",
    "SafetyDataset",
    "SafetyExample",
    "VLGUARD_CATEGORY_FALLBACK",
    "VLGUARD_CATEGORY_MAP",
    "VLGUARD_PREFIX",
    "balance_for_stage1",
    "chat_messages",
    "load_safety_dataset",
    "load_safety_json",
    "load_vlguard",
    "safe_type_index",
    "safety_dataset_from_hf",
]
