# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""What each SafeVLM training stage trains, and the LoRA merge that exports Stage II as a plain checkpoint.

* **Stage I** trains the safety modules (safety projector, both safety-token sets, safety head); the vision tower,
  the original projector and the LLM (with ``lm_head``) are frozen.
* **Stage II** trains the LLM, with LoRA adapters on its linear layers (default) or fully; the safety modules and the
  LLM's input embeddings are frozen.

LoRA targeting of the LLM (:func:`llm_lora_config`, :func:`apply_llm_lora`) and the record of a finished stage in the
model's config (:func:`record_training_stage`) live here once; L-PPO uses them too.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

from torch import nn

from ..modeling.modeling_safevlm import SafeVLMForConditionalGeneration
from ..prompting import is_safevlm


SAFETY_PARAMETER_PREFIXES: tuple[str, ...] = ("model.safety_projector.", "model.safety_tokens.", "model.safety_head.")
"""Parameter-name prefixes of the safety modules in a `SafeVLMForConditionalGeneration`."""

LLM_PREFIX = "model.language_model."
LLM_INPUT_EMBEDDINGS = "model.language_model.embed_tokens."


def unwrap_safevlm(model: nn.Module) -> SafeVLMForConditionalGeneration:
    """The SafeVLM (any family, also loaded as remote code) inside ``model``: itself, or a PEFT model's base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_safevlm(base):
        raise TypeError(
            f"SafeVLM training needs a SafeVLMForConditionalGeneration or SafeVLMNextForConditionalGeneration, got "
            f"{type(base).__name__}. Convert a LLaVA / LLaVA-NeXT model first (`from_llava` or `safevlm convert`)."
        )
    return base


def is_safety_parameter(name: str) -> bool:
    """True for a parameter of the safety projector, the safety tokens or the safety head."""
    return name.startswith(SAFETY_PARAMETER_PREFIXES)


def freeze_for_stage1(model: SafeVLMForConditionalGeneration) -> list[str]:
    """Make only the safety modules trainable; returns the trainable parameter names."""
    model = unwrap_safevlm(model)
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_safety_parameter(name))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def freeze_for_full_stage2(model: SafeVLMForConditionalGeneration) -> list[str]:
    """Make the LLM (decoder layers, final norm, ``lm_head``) trainable and everything else frozen.

    The input embeddings stay frozen: the safety head reads the prompt's token embeddings, so training them would
    change what the Stage I head sees. A ``lm_head`` tied to those embeddings stays frozen with them.
    """
    model = unwrap_safevlm(model)
    for name, parameter in model.named_parameters():
        train = (name.startswith(LLM_PREFIX) and not name.startswith(LLM_INPUT_EMBEDDINGS)) or name.startswith(
            "lm_head."
        )
        parameter.requires_grad_(train)
    # Tied weights are one Parameter reached under two names: freezing the embeddings must win.
    model.get_input_embeddings().weight.requires_grad_(False)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def _language_model(model: nn.Module) -> nn.Module:
    """The LLM (``model.language_model``) of a LLaVA-style model or of a PEFT model wrapping one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = getattr(getattr(base, "model", None), "language_model", None)
    if not isinstance(language_model, nn.Module):
        raise TypeError(
            f"{type(base).__name__} has no LLM at `model.language_model`; LoRA targeting needs a LLaVA-style "
            "model (LlavaForConditionalGeneration, SafeVLMForConditionalGeneration, ...)."
        )
    return language_model


def llm_linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct names (last path component) of the `nn.Linear` layers inside the LLM, e.g. ``["q_proj", ...]``."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in _language_model(model).named_modules()
        if isinstance(module, nn.Linear)
    }
    return sorted(names)


def llm_lora_config(
    model: nn.Module,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
):
    """A `peft.LoraConfig` that adapts the LLM's linear layers only (SafeVLM Stage II and L-PPO alike).

    ``model`` is any LLaVA-style model (its LLM at ``model.language_model``). ``target_modules`` names layers by
    their last path component (default: every linear layer of the LLM, as PSA-VLM's ``find_all_linear_names`` does;
    ``lm_head`` sits outside the LLM and is never adapted). They are matched by a regular expression anchored at
    ``model.language_model.``, so the vision tower, the projector(s) and the safety modules can never receive
    adapters, whatever their layers are called.
    """
    from peft import LoraConfig

    available = llm_linear_layer_names(model)
    wanted = list(target_modules) if target_modules else available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"lora_target_modules {unknown} are not linear layers of the LLM; choose from {available}.")
    pattern = re.escape(LLM_PREFIX) + r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in sorted(set(wanted))) + r")"
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern, bias="none")


def apply_llm_lora(model: nn.Module, lora_config=None, **lora_kwargs):
    """Wrap ``model`` in a `peft.PeftModel` with LoRA on the LLM's linear layers (everything else frozen).

    ``lora_config`` may replace the default :func:`llm_lora_config` (built from ``lora_kwargs``); it is checked so that
    no adapter lands outside the LLM.
    """
    from peft import get_peft_model

    config = lora_config if lora_config is not None else llm_lora_config(model, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    # PEFT names a LoRA weight "base_model.model.<layer path>.lora_A.<adapter>.weight".
    adapted = {
        name.split(".lora_")[0].removeprefix("base_model.model.")
        for name, _ in peft_model.named_parameters()
        if ".lora_" in name
    }
    outside = sorted(name for name in adapted if not name.startswith(LLM_PREFIX))
    if outside:
        raise ValueError(f"LoRA must adapt the LLM only, but the config also targets {outside[:5]}.")
    if not adapted:
        raise ValueError("The LoRA config matches no layer of the LLM; check target_modules.")
    return peft_model


def apply_stage2_lora(model: SafeVLMForConditionalGeneration, lora_config=None, **lora_kwargs):
    """Stage II: :func:`apply_llm_lora` on a SafeVLM model (the safety modules are never adapted)."""
    return apply_llm_lora(unwrap_safevlm(model), lora_config, **lora_kwargs)


def merge_stage2(model: nn.Module) -> SafeVLMForConditionalGeneration:
    """Fold Stage II LoRA adapters into the LLM and return a plain `SafeVLMForConditionalGeneration`.

    The result saves as an ordinary SafeVLM checkpoint (no PEFT files, loads with ``trust_remote_code``). A model
    trained without adapters (``stage2_mode="full"``) is returned as is.
    """
    if hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload()
    else:
        merged = model
    merged = unwrap_safevlm(merged)
    for parameter in merged.parameters():
        parameter.requires_grad_(True)  # back to the state of a freshly loaded model
    return merged


def published_data_name(name: str) -> str:
    """A data source's name without its local folders, for a record published with the model card:
    ``vlguard:train.json`` for ``vlguard:/home/me/VLGuard/train.json``, ``train.jsonl`` for ``/data/train.jsonl``."""
    prefix, sep, path = name.partition(":")
    if not sep or os.sep in prefix:
        prefix, sep, path = "", "", name
    return prefix + sep + os.path.basename(path.rstrip(os.sep)) if os.sep in path else name


def record_training_stage(model: nn.Module, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``entry`` to the SafeVLM's ``config.safety_training_stages``; returns the stored record.

    ``entry`` is a dict ``{stage, data, steps, metrics, ...}`` (the model card shows ``stage``, ``data``, ``steps`` and
    ``metrics`` as columns and every other key as a detail). ``model`` is a SafeVLM or a PEFT model wrapping one; the
    list is replaced, never mutated in place, so a config copied before keeps its own history. Values must be JSON
    (the record is saved in ``config.json``): a value that is not raises a ``TypeError`` naming the key here, not
    later at save time.
    """
    config = unwrap_safevlm(model).config
    record = dict(entry)
    for key, value in record.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"training stage record: {key}={value!r} cannot be saved in config.json ({err})."
            ) from None
    config.safety_training_stages = [*(config.safety_training_stages or []), record]
    return record


__all__ = [
    "SAFETY_PARAMETER_PREFIXES",
    "apply_llm_lora",
    "apply_stage2_lora",
    "freeze_for_full_stage2",
    "freeze_for_stage1",
    "is_safety_parameter",
    "llm_linear_layer_names",
    "llm_lora_config",
    "merge_stage2",
    "published_data_name",
    "record_training_stage",
    "unwrap_safevlm",
]
