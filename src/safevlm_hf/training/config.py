# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Configuration of :class:`SafeVLMTrainer` (a `TrainingArguments` subclass, like TRL's ``<algo>_config.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments


@dataclass
class SafeVLMTrainingConfig(TrainingArguments):
    r"""
    Configuration class for [`SafeVLMTrainer`]: every [`~transformers.TrainingArguments`] field (checkpoints,
    `resume_from_checkpoint`, logging, distributed launch, ...) plus the SafeVLM training recipe.

    Parameters:
        > Parameters that pick the stage

        stage (`int`, *optional*, defaults to `1`):
            `1`: train the safety modules (safety projector, both safety-token sets, safety head) with the vision
            tower, the original projector and the LLM (with `lm_head`) frozen. `2`: train the LLM with the safety
            modules frozen.
        safety_loss_weight (`float`, *optional*):
            Weight `w` in `loss = lm_loss + w * (CE(type) + CE(level))`. When given, Stage I sets the model's
            `config.safety_loss_weight` to it (the model computes the loss; the saved config records the weight that
            trained it); `None` keeps the model's value (10 in the published recipe). Stage II trains on `lm_loss`
            alone (the safety modules are frozen, so no safety label reaches the model).

        > Parameters of Stage II

        stage2_mode (`str`, *optional*, defaults to `"lora"`):
            `"lora"`: PEFT LoRA adapters on the LLM's linear layers (never on the vision tower, the projectors or
            the safety modules); `"full"`: every LLM weight except the input embeddings, which the safety head reads.
        lora_r (`int`, *optional*, defaults to `16`):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `32`):
            LoRA scaling numerator (`alpha / r` scales the update).
        lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout on the LoRA input.
        lora_target_modules (`list[str]`, *optional*):
            Names of the LLM's linear layers to adapt (e.g. `["q_proj", "v_proj"]`). Defaults to every linear layer
            of the LLM. Matched inside the LLM only.
        stage2_conditioning (`bool`, *optional*, defaults to `True`):
            Rewrite the assistant turns of a [`SafetyDataset`] to follow the model's safety policy before Stage II
            (refusal with its reason at refuse levels, caution prefix + the row's answer at caution levels).
        safety_profile (`str`, *optional*):
            Policy profile used for that conditioning (default: the policy's default profile).
        stage2_response (`str`, *optional*):
            Response mode the conditioning trains for: `"template"` (the gate forces the policy's text) or
            `"guided"` (the policy's hint in context, the gate's lead, then the model's own reason or careful answer).
            Defaults to the policy's `response`.

        > Parameters of the data

        num_safe_samples (`int`, *optional*):
            Stage I balancing as published: keep every risky row and this many randomly drawn safe rows (seeded by
            `seed`). `None` keeps every row.
        max_length (`int`, *optional*):
            Longest allowed row in tokens (image and safety tokens included); longer rows raise an error naming the
            row. `None`: no limit.

        > Parameters whose defaults differ from [`~transformers.TrainingArguments`]

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Must stay `False`: the collator needs the conversation and image fields.
        logging_steps (`float`, *optional*, defaults to `10`):
            Log every 10 optimizer steps.
    """

    stage: Literal[1, 2] = field(default=1, metadata={"help": "1: train the safety modules; 2: train the LLM."})
    safety_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "Stage I: weight of CE(type) + CE(level) in the loss; sets the model's config.safety_loss_weight "
            "(default: keep the model's value)."
        },
    )
    stage2_mode: Literal["lora", "full"] = field(
        default="lora",
        metadata={"help": "Stage II: 'lora' adapters on the LLM's linear layers, or 'full' LLM training."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the LLM's linear layers to adapt (default: all of them, inside the LLM only)."},
    )
    stage2_conditioning: bool = field(
        default=True,
        metadata={
            "help": "Stage II: rewrite assistant turns to follow the safety policy (refusals, caution prefixes)."
        },
    )
    safety_profile: str | None = field(
        default=None, metadata={"help": "Policy profile for Stage II conditioning (default: the policy's default)."}
    )
    stage2_response: Literal["template", "guided"] | None = field(
        default=None,
        metadata={"help": "Stage II conditioning for 'template' or 'guided' responses (default: the policy's)."},
    )
    num_safe_samples: int | None = field(
        default=None,
        metadata={
            "help": "Stage I balancing: all risky rows plus this many sampled safe rows (seeded). None: all rows."
        },
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest allowed row in tokens; longer rows raise an error. None: no limit."}
    )

    # Parameters whose default values are overridden from TrainingArguments
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep False: the SafeVLM collator reads the conversation and image fields."},
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X update steps (an int), or every X fraction of the total steps (a float < 1)."},
    )

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}.")
        if self.stage2_mode not in ("lora", "full"):
            raise ValueError(f"stage2_mode must be 'lora' or 'full', got {self.stage2_mode!r}.")
        if self.safety_loss_weight is not None and self.safety_loss_weight < 0:
            raise ValueError(f"safety_loss_weight must be >= 0, got {self.safety_loss_weight}.")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1; got r={self.lora_r}, "
                f"alpha={self.lora_alpha}, dropout={self.lora_dropout}."
            )
        if self.num_safe_samples is not None and self.num_safe_samples < 0:
            raise ValueError(f"num_safe_samples must be >= 0, got {self.num_safe_samples}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}.")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would strip the conversation and image fields the SafeVLM collator needs; "
                "leave it False."
            )
        super().__post_init__()

    @classmethod
    def from_recipe(
        cls, recipe: str | os.PathLike, stage: int, output_dir: str | os.PathLike, **overrides: Any
    ) -> "SafeVLMTrainingConfig":
        """The config of ``stage`` from a recipe (a shipped name such as ``"psa-vlm"`` or a YAML/JSON file), with
        ``overrides`` (any field) on top; see :mod:`safevlm_hf.training.recipes`."""
        from .recipes import load_recipe

        return load_recipe(recipe).training_config(stage, output_dir, **overrides)


__all__ = ["SafeVLMTrainingConfig"]
