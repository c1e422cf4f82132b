# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""GPU memory of a training stage, computed before any weight exists (``safevlm plan``).

The model is built on the meta device from its config (a checkpoint folder, or the built-in llava-1.5 shapes), the
stage's real freezing / LoRA code marks what trains, and the per-GPU memory follows from four terms:

* **parameters, gradients, optimizer** (the ZeRO paper's accounting, Rajbhandari et al. 2020, section 3.1):
  with bf16 mixed precision every weight is held in bf16 (2 bytes), every trainable weight has a bf16 gradient
  (2 bytes) and Adam keeps an fp32 master copy and two fp32 moments (12 bytes); in fp32 the weights and gradients
  take 4 bytes and Adam 8. ZeRO-2 divides gradients and optimizer state by the GPU count; ZeRO-3 and FSDP (full
  sharding) divide the weights too.
* **activations**: the tensors autograd keeps for the backward pass, counted operation by operation for a
  Llama-style decoder layer (:func:`decoder_layer_activation_bytes`, checked against PyTorch's saved tensors in
  tests/test_plan.py) with SDPA/flash attention (no `seq x seq` term), for one micro-batch; the vision tower is
  frozen and its input needs no gradient, so it keeps nothing. With gradient checkpointing each decoder layer
  keeps only its input, and one layer at a time is rebuilt in the backward pass. Data parallelism and sharding do
  not divide activations.

Left out, so real use is somewhat higher: the CUDA context and allocator fragmentation (typically 1-3 GiB), the
safety modules' own activations (measured on CPU at llava-1.5-7b width in bf16: about 24 MB per image and 94 KB per
prompt token, 1-2 % of the LLM's), transient buffers (the loss's fp32 logit copies, ZeRO-3/FSDP all-gathers of about
one layer's weights, communication buckets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn


if TYPE_CHECKING:
    from ..modeling.configuration_safevlm import SafeVLMConfig


GIB = 1024**3
PRECISIONS = ("bf16", "fp32")
SHARDINGS = ("none", "zero2", "zero3/fsdp")
_BYTES = {"bf16": 2, "fp32": 4}
# Bytes per weight: (weight, gradient of a trainable weight, optimizer state of a trainable weight).
_STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
# The linear layers of a Llama decoder layer and the tensor each reads ("o_in" is the attention output, which the
# attention already keeps, so adapting o_proj costs no extra input).
_LLAMA_LINEAR_INPUTS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}


# ---------------------------------------------------------------------------------------------------- model shapes
BUILTIN_MODELS = {
    "llava-1.5-7b": "7b",
    "llava-hf/llava-1.5-7b-hf": "7b",
    "llava-1.5-13b": "13b",
    "llava-hf/llava-1.5-13b-hf": "13b",
}


def plan_config(model: str | os.PathLike) -> SafeVLMConfig:
    """The `SafeVLMConfig` to plan for: a built-in name (``llava-1.5-7b``, ``llava-1.5-13b``), or a local folder with a
    SafeVLM or LLaVA ``config.json`` (a LLaVA config gets the default safety modules, as `safevlm convert` would)."""
    from transformers import AutoConfig

    from ..modeling.configuration_safevlm import SafeVLMConfig
    from ..real_shapes import llava_15_config

    if str(model) in BUILTIN_MODELS:
        return SafeVLMConfig.from_llava_config(llava_15_config(BUILTIN_MODELS[str(model)]))
    if not os.path.isdir(model):
        raise ValueError(
            f"{model!r} is neither a model folder nor a built-in shape ({', '.join(BUILTIN_MODELS)}); nothing is "
            "downloaded, so point --model at a folder holding its config.json."
        )
    config = AutoConfig.from_pretrained(model)
    if config.model_type == "safevlm":
        return config
    if config.model_type != "llava":
        raise ValueError(
            f"{model} holds a {config.model_type!r} config; safevlm plan takes LLaVA-1.5 or SafeVLM on LLaVA-1.5 "
            "(its activation estimate counts a fixed image_seq_length per image; LLaVA-NeXT's anyres count varies)."
        )
    return SafeVLMConfig.from_llava_config(config)


def build_meta_model(config) -> nn.Module:
    """The SafeVLM model of ``config`` on the meta device: every shape, no weight allocated."""
    from ..modeling.modeling_safevlm import SafeVLMForConditionalGeneration

    with torch.device("meta"):
        return SafeVLMForConditionalGeneration(config)


def _numel(parameters) -> int:
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())  # tied weights count once


def stage_parameters(model: nn.Module, stage: int, stage2_mode: str = "lora", **lora: Any) -> tuple[nn.Module, int]:
    """Mark what ``stage`` trains with the training code itself (LoRA adapters are added on the meta device);
    returns the model (PEFT-wrapped for LoRA) and its trainable parameter count."""
    from .stages import apply_llm_lora, freeze_for_full_stage2, freeze_for_stage1, llm_lora_config

    if stage == 1:
        freeze_for_stage1(model)
    elif stage2_mode == "full":
        freeze_for_full_stage2(model)
    else:
        with torch.device("meta"):
            model = apply_llm_lora(model, llm_lora_config(model, **lora))
    return model, _numel(p for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style LLM that its activations depend on."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    vocab_size: int

    @classmethod
    def from_config(cls, text_config) -> "DecoderShape":
        heads = text_config.num_attention_heads
        return cls(
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            num_layers=text_config.num_hidden_layers,
            vocab_size=text_config.vocab_size,
        )


def decoder_layer_activation_bytes(
    shape: DecoderShape,
    dtype_bytes: int,
    mode: str,
    lora_r: int = 0,
    lora_targets: Sequence[str] = tuple(_LLAMA_LINEAR_INPUTS),
    lora_dropout: float = 0.0,
) -> int:
    """Bytes autograd keeps per token for one Llama decoder layer, operation by operation.

    ``mode``: ``"frozen"`` (no weight trains but the gradient flows through, as in Stage I, where the loss reaches
    the safety tokens at the LLM's input), ``"full"`` (every weight trains) or ``"lora"`` (frozen, with LoRA on
    ``lora_targets``). ``dtype_bytes`` is the activation dtype (2 for bf16, 4 for fp32).
    """
    h, i, d = shape.hidden_size, shape.intermediate_size, dtype_bytes
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    # Each RMSNorm upcasts its input to fp32 and keeps it with the fp32 inverse RMS of every token.
    norms = 2 * (4 * h + 4)
    # Attention keeps q, k, v (after the rotary embedding, whose cos/sin are shared by all layers), its output
    # (which o_proj then reads without a copy) and the fp32 log-sum-exp of each head.
    attention = d * (h + 2 * kv + h) + 4 * shape.num_attention_heads
    # SwiGLU: SiLU keeps the gate projection; the product keeps the SiLU output and the up projection.
    mlp = d * 3 * i
    frozen = norms + attention + mlp
    if mode == "frozen":
        return frozen
    if mode == "full":
        # Trainable weights need their inputs: each RMSNorm's normalized input (for its weight) and its output (the
        # input of the next linears), and the SwiGLU product read by down_proj.
        return frozen + d * (4 * h + i)
    if mode != "lora":
        raise ValueError(f"mode must be 'frozen', 'full' or 'lora', got {mode!r}.")
    sizes = {"attn_in": h, "o_in": h, "mlp_in": h, "down_in": i}
    targets = [t for t in lora_targets if t in _LLAMA_LINEAR_INPUTS]
    extra = d * lora_r * len(targets)  # each adapter's B reads A's r-wide output
    if lora_dropout > 0:
        # Each adapter draws its own dropout of its input: the dropped copy and a 1-byte mask (CUDA's fused dropout).
        extra += sum((d + 1) * sizes[_LLAMA_LINEAR_INPUTS[t]] for t in targets)
    elif d < 4:
        # PEFT keeps the adapters in fp32 and casts their input up; bf16 autocast casts it back down, a new copy for
        # every adapter (DeepSpeed's bf16 casts the adapters too and would share one copy: a slight overestimate).
        extra += sum(d * sizes[_LLAMA_LINEAR_INPUTS[t]] for t in targets)
    else:
        # Adapter A reads the layer input itself; layers sharing an input share it (o_proj's is kept already).
        extra += d * sum(sizes[group] for group in {_LLAMA_LINEAR_INPUTS[t] for t in targets} - {"o_in"})
    return frozen + extra


def activation_bytes(
    shape: DecoderShape,
    tokens: int,
    dtype_bytes: int,
    mode: str,
    gradient_checkpointing: bool,
    **lora: Any,
) -> int:
    """Activation bytes of one micro-batch of ``tokens`` tokens through the LLM, its final norm and the loss."""
    h, v = shape.hidden_size, shape.vocab_size
    layer = decoder_layer_activation_bytes(shape, dtype_bytes, mode, **lora)
    # Final RMSNorm (fp32 input + inverse RMS), a trainable norm/lm_head's inputs, the loss's fp32 log-softmax over
    # the vocabulary and its int64 targets.
    head = (4 * h + 4) + (2 * dtype_bytes * h if mode == "full" else 0) + 4 * v + 8
    if gradient_checkpointing:
        # Each layer keeps its input hidden state; the backward pass rebuilds one layer at a time.
        per_token = shape.num_layers * dtype_bytes * h + layer + head
    else:
        per_token = shape.num_layers * layer + head
    return tokens * per_token


# ---------------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one configuration."""

    mode: str  # "stage1", "lora" or "full"
    precision: str  # "bf16" or "fp32"
    gradient_checkpointing: bool
    sharding: str  # "none" (DDP), "zero2" or "zero3/fsdp"
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def state_bytes(total: int, trainable: int, precision: str, sharding: str, gpus: int) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer) bytes per GPU for ``total`` weights of which ``trainable`` train."""
    weight, grad, optim = _STATE_BYTES[precision]
    parameters, gradients, optimizer = total * weight, trainable * grad, trainable * optim
    if sharding in ("zero2", "zero3/fsdp"):
        gradients, optimizer = gradients // gpus, optimizer // gpus
    if sharding == "zero3/fsdp":
        parameters //= gpus
    return parameters, gradients, optimizer


@dataclass
class TrainingPlan:
    """Every memory estimate of one stage of one model, and what they assume."""

    model: str
    stage: int
    gpus: int
    micro_batch: int
    seq_len: int
    total_parameters: dict[str, int]  # mode -> all weights (LoRA adapters included)
    trainable_parameters: dict[str, int]  # mode -> trainable weights
    safety_parameters: int
    shape: DecoderShape
    chosen: dict[str, Any] = field(default_factory=dict)  # the recipe's / options' configuration
    estimates: list[MemoryEstimate] = field(default_factory=list)

    def find(self, **where: Any) -> MemoryEstimate:
        """The estimate matching every given field, e.g. ``find(precision="bf16", sharding="zero2", ...)``."""
        found = [e for e in self.estimates if all(getattr(e, k) == v for k, v in where.items())]
        if len(found) != 1:
            raise KeyError(f"{len(found)} estimates match {where}.")
        return found[0]

    def table(self) -> str:
        """The plan as text: a header and one row per configuration (GiB per GPU), the chosen one marked."""
        s = self.shape
        lines = [
            f"safevlm plan: {self.model} as SafeVLM, stage {self.stage}, {self.gpus} GPU(s), micro-batch "
            f"{self.micro_batch} x {self.seq_len} tokens",
            f"LLM: {s.num_layers} layers, hidden {s.hidden_size}, MLP {s.intermediate_size}, vocab {s.vocab_size}; "
            f"safety modules {self.safety_parameters / 1e9:.3f} B parameters",
        ]
        for mode, total in self.total_parameters.items():
            lines.append(
                f"{_MODE_NAMES[mode]}: {total / 1e9:.3f} B parameters, {self.trainable_parameters[mode] / 1e9:.3f} B "
                "trainable"
            )
        header = ("mode", "precision", "grad-ckpt", "sharding", "params", "grads", "optimizer", "activations", "total")
        rows, marks = [header], [""]
        for e in self.estimates:
            sizes = (e.parameters, e.gradients, e.optimizer, e.activations, e.total)
            rows.append(
                (e.mode, e.precision, "on" if e.gradient_checkpointing else "off", e.sharding)
                + tuple(f"{value / GIB:.2f}" for value in sizes)
            )
            chosen = bool(self.chosen) and all(getattr(e, k) == v for k, v in self.chosen.items())
            marks.append("  <- chosen" if chosen else "")
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines.append("GiB per GPU:")
        for row, mark in zip(rows, marks):
            cells = [cell.ljust(w) if c < 4 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells) + mark)
        lines.append(
            "Not counted: CUDA context and fragmentation (1-3 GiB), transient buffers (the loss's fp32 logit copies, "
            "ZeRO-3/FSDP gathers of about one layer), the safety modules' activations (1-2%)."
        )
        return "\n".join(lines)


_MODE_NAMES = {"stage1": "Stage I (safety modules)", "lora": "Stage II LoRA", "full": "Stage II full LLM"}


def plan_training(
    model: str | os.PathLike,
    stage: int,
    gpus: int = 1,
    micro_batch: int = 8,
    seq_len: int | None = None,
    text_tokens: int = 512,
    stage2_mode: str | None = None,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] | None = None,
    chosen: dict[str, Any] | None = None,
) -> TrainingPlan:
    """Memory estimates for ``stage`` of ``model`` on ``gpus`` GPUs, for every precision, gradient checkpointing
    setting and sharding (and, for Stage II, LoRA and full-LLM training unless ``stage2_mode`` picks one).

    ``seq_len`` defaults to the image tokens + the safety tokens + ``text_tokens``.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}.")
    if gpus < 1 or micro_batch < 1:
        raise ValueError(f"gpus and micro_batch must be >= 1, got {gpus} and {micro_batch}.")
    config = plan_config(model)
    if seq_len is None:
        seq_len = config.image_seq_length + config.num_safety_tokens + text_tokens
    shape = DecoderShape.from_config(config.text_config)
    lora = dict(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_target_modules)
    modes = ["stage1"] if stage == 1 else [stage2_mode] if stage2_mode else ["lora", "full"]
    plan = TrainingPlan(
        model=str(model),
        stage=stage,
        gpus=gpus,
        micro_batch=micro_batch,
        seq_len=seq_len,
        total_parameters={},
        trainable_parameters={},
        safety_parameters=0,
        shape=shape,
        chosen=dict(chosen or {}),
    )
    for mode in modes:
        meta = build_meta_model(config)
        plan.safety_parameters = _numel(p for m in meta.safety_modules().values() for p in m.parameters())
        meta, trainable = stage_parameters(meta, stage, "full" if mode == "full" else "lora", **lora)
        plan.total_parameters[mode] = _numel(meta.parameters())
        plan.trainable_parameters[mode] = trainable
        targets = lora_target_modules or list(_LLAMA_LINEAR_INPUTS)
        layer_mode = {"stage1": "frozen", "lora": "lora", "full": "full"}[mode]
        for precision, checkpointing, sharding in product(PRECISIONS, (False, True), SHARDINGS):
            parameters, gradients, optimizer = state_bytes(
                plan.total_parameters[mode], trainable, precision, sharding, gpus
            )
            activations = activation_bytes(
                shape,
                micro_batch * seq_len,
                _BYTES[precision],
                layer_mode,
                checkpointing,
                **(dict(lora_r=lora_r, lora_targets=targets, lora_dropout=lora_dropout) if mode == "lora" else {}),
            )
            plan.estimates.append(
                MemoryEstimate(mode, precision, checkpointing, sharding, parameters, gradients, optimizer, activations)
            )
    return plan


__all__ = [
    "BUILTIN_MODELS",
    "DecoderShape",
    "MemoryEstimate",
    "TrainingPlan",
    "activation_bytes",
    "build_meta_model",
    "decoder_layer_activation_bytes",
    "plan_config",
    "plan_training",
    "stage_parameters",
    "state_bytes",
]
