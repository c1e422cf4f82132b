# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Two-stage SafeVLM training on `transformers.Trainer`.

Example::

    from safevlm_hf.data import load_safety_dataset
    from safevlm_hf.training import SafeVLMTrainer, SafeVLMTrainingConfig, merge_stage2

    data = load_safety_dataset("data.jsonl")  # or "vlguard:train.json", or a datasets.Dataset
    stage1 = SafeVLMTrainingConfig(output_dir="out/stage1", stage=1, num_safe_samples=1000)
    SafeVLMTrainer(model, stage1, train_dataset=data, processing_class=processor).train()
    stage2 = SafeVLMTrainingConfig(output_dir="out/stage2", stage=2)  # LoRA on the LLM by default
    trainer = SafeVLMTrainer(model, stage2, train_dataset=data, processing_class=processor)
    trainer.train()
    merge_stage2(trainer.model).save_pretrained("out/safevlm")
"""

from .conditioning import condition_example, condition_on_policy, policy_action
from .config import SafeVLMTrainingConfig
from .stages import (
    SAFETY_PARAMETER_PREFIXES,
    apply_stage2_lora,
    freeze_for_full_stage2,
    freeze_for_stage1,
    is_safety_parameter,
    llm_linear_layer_names,
    merge_stage2,
    stage2_lora_config,
    unwrap_safevlm,
)
from .trainer import SafeVLMTrainer


__all__ = [
    "SAFETY_PARAMETER_PREFIXES",
    "SafeVLMTrainer",
    "SafeVLMTrainingConfig",
    "apply_stage2_lora",
    "condition_example",
    "condition_on_policy",
    "freeze_for_full_stage2",
    "freeze_for_stage1",
    "is_safety_parameter",
    "llm_linear_layer_names",
    "merge_stage2",
    "policy_action",
    "stage2_lora_config",
    "unwrap_safevlm",
]
