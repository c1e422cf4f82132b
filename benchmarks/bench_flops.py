"""FLOPs of LLaVA / SafeVLM: an analytic model (the floor beside each measurement) and a counter for the real run.

Only matrix products are counted (linear layers, attention score and value products, the patch convolution), at
2 FLOPs per multiply-add; norms, activations and softmax are left out on both sides. Causal self-attention counts
the ``n(n+1)/2`` query-key pairs a causal kernel has to compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils import flop_counter

from safevlm_hf import SafeVLMConfig, SafeVLMForConditionalGeneration
from safevlm_hf.real_shapes import llava_15_config
from safevlm_hf.training.plan import build_meta_model


@dataclass(frozen=True)
class FlopShape:
    """The sizes the FLOP model needs, read from a SafeVLM configuration."""

    patches: int
    patch_dim: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_feature_layers: int
    text_hidden: int
    text_kv_hidden: int
    text_intermediate: int
    text_layers: int
    vocab: int
    safety_tokens: int
    head_hidden: int
    head_intermediate: int
    head_layers: int
    num_types: int
    num_levels: int

    @classmethod
    def from_config(cls, config: SafeVLMConfig) -> "FlopShape":
        vision, text = config.vision_config, config.text_config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        layers = config.safety_feature_layer
        return cls(
            patches=(vision.image_size // vision.patch_size) ** 2,
            patch_dim=vision.num_channels * vision.patch_size**2,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_feature_layers=1 if isinstance(layers, int) else len(layers),
            text_hidden=text.hidden_size,
            text_kv_hidden=text.hidden_size * kv_heads // heads,
            text_intermediate=text.intermediate_size,
            text_layers=text.num_hidden_layers,
            vocab=text.vocab_size,
            safety_tokens=config.num_safety_tokens,
            head_hidden=config.safety_head_hidden_size,
            head_intermediate=config.safety_head_intermediate_size,
            head_layers=config.safety_head_num_layers,
            num_types=len(config.safety_types),
            num_levels=len(config.safety_levels),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vision_flops(s: FlopShape) -> float:
    """CLIP vision tower over one image (patch embedding and every encoder layer; HF runs them all)."""
    tokens = s.patches + 1  # + CLS
    h, i = s.vision_hidden, s.vision_intermediate
    per_layer = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens * tokens * h
    return 2 * s.patches * s.patch_dim * h + s.vision_layers * per_layer


def projector_flops(s: FlopShape) -> float:
    """LLaVA's two-layer projector (also the shape of the safety projector) over one image's patches."""
    d = s.text_hidden
    return 2 * s.patches * (s.vision_hidden * s.vision_feature_layers * d + d * d)


def llm_prefill_flops(s: FlopShape, tokens: int, logits_tokens: int = 1) -> float:
    """Llama decoder over a ``tokens``-long prompt (causal), ``lm_head`` on ``logits_tokens`` positions."""
    d, kv, i = s.text_hidden, s.text_kv_hidden, s.text_intermediate
    linear = 2 * tokens * (2 * d * d + 2 * d * kv + 3 * d * i)
    attention = 4 * d * tokens * (tokens + 1) // 2
    return s.text_layers * (linear + attention) + 2 * d * s.vocab * logits_tokens


def llm_decode_step_flops(s: FlopShape, context: int) -> float:
    """One decoding step: one new token attending to ``context`` cached + new positions, and ``lm_head``."""
    d, kv, i = s.text_hidden, s.text_kv_hidden, s.text_intermediate
    return s.text_layers * (2 * (2 * d * d + 2 * d * kv + 3 * d * i) + 4 * d * context) + 2 * d * s.vocab


def safety_branch_flops(s: FlopShape, text_tokens: int, images: int = 1) -> float:
    """Safety projector + safety head for one row with ``text_tokens`` prompt tokens and ``images`` images."""
    d, dh, ih = s.text_hidden, s.head_hidden, s.head_intermediate
    query_len = text_tokens + 1  # learned query + text
    features = s.safety_tokens + images * s.patches  # set 2 + safety projector output
    head = 2 * text_tokens * d * dh + 2 * features * d * dh
    per_layer = (
        2 * query_len * 4 * dh * dh
        + 4 * dh * query_len * query_len  # self-attention over the text stream
        + 2 * query_len * 2 * dh * dh
        + 2 * features * 2 * dh * dh
        + 4 * dh * query_len * features  # cross-attention
        + 2 * query_len * 2 * dh * ih  # MLP
    )
    head += s.head_layers * per_layer + 2 * dh * (s.num_types + s.num_levels)
    return images * projector_flops(s) + head


@dataclass(frozen=True)
class AnalyticFloors:
    """Analytic FLOP ratios for one shape and prompt (image tokens + safety tokens + ``text_tokens``)."""

    shape: str
    text_tokens: int
    llava_prefill: float
    safevlm_prefill: float
    verdict: float
    safety_branch: float
    decode_step_llava: float
    decode_step_safevlm: float
    guard_verdict: float
    guard_first_answer_token: float
    guard_pattern: float
    safevlm_generate: float
    training_stage1: float
    training_full: float

    @property
    def prefill_overhead(self) -> float:
        return self.safevlm_prefill / self.llava_prefill - 1

    @property
    def verdict_fraction(self) -> float:
        return self.verdict / self.safevlm_prefill

    @property
    def decode_overhead(self) -> float:
        return self.decode_step_safevlm / self.decode_step_llava - 1

    @property
    def guard_speedup_verdict(self) -> float:
        return self.guard_verdict / self.verdict

    @property
    def guard_speedup_first_token(self) -> float:
        return self.guard_first_answer_token / self.safevlm_prefill

    @property
    def guard_speedup(self) -> float:
        return self.guard_pattern / self.safevlm_generate

    @property
    def training_ratio(self) -> float:
        return self.training_stage1 / self.training_full

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            prefill_overhead=self.prefill_overhead,
            verdict_fraction=self.verdict_fraction,
            decode_overhead=self.decode_overhead,
            guard_speedup_verdict=self.guard_speedup_verdict,
            guard_speedup_first_token=self.guard_speedup_first_token,
            guard_speedup=self.guard_speedup,
            training_ratio=self.training_ratio,
        )
        return data


def analytic_floors(
    config: SafeVLMConfig, text_tokens: int, name: str, new_tokens: int = 32, guard_tokens: int = 5
) -> AnalyticFloors:
    """The FLOP floor of every comparison the suite measures, for one image and ``text_tokens`` prompt tokens.

    Decode steps are taken at the middle of a ``new_tokens`` answer. The guard pattern is a same-size guard LLaVA
    reading the same prompt and decoding ``guard_tokens`` tokens, then the base model answering. Training: full
    fine-tuning runs the backward of every matrix product twice (input and weight gradients); Stage I needs the
    input gradients through the LLM (safety tokens set 1 sit in its input) and the full backward of the safety
    branch only; the vision tower and projector need no backward.
    """
    s = FlopShape.from_config(config)
    base_len = s.patches + text_tokens
    safe_len = base_len + s.safety_tokens
    vision = vision_flops(s) + projector_flops(s)
    safety = safety_branch_flops(s, text_tokens)
    llava_prefill = vision + llm_prefill_flops(s, base_len)
    safevlm_prefill = vision + llm_prefill_flops(s, safe_len) + safety
    mid = new_tokens // 2
    step_llava = llm_decode_step_flops(s, base_len + mid)
    step_safe = llm_decode_step_flops(s, safe_len + mid)
    guard = llava_prefill + sum(llm_decode_step_flops(s, base_len + k) for k in range(1, guard_tokens))
    llava_generate = llava_prefill + sum(llm_decode_step_flops(s, base_len + k) for k in range(1, new_tokens))
    safevlm_generate = safevlm_prefill + sum(llm_decode_step_flops(s, safe_len + k) for k in range(1, new_tokens))
    llm_train = llm_prefill_flops(s, safe_len, logits_tokens=safe_len)
    forward = vision + llm_train + safety
    return AnalyticFloors(
        shape=name,
        text_tokens=text_tokens,
        llava_prefill=llava_prefill,
        safevlm_prefill=safevlm_prefill,
        verdict=vision_flops(s) + safety,
        safety_branch=safety,
        decode_step_llava=step_llava,
        decode_step_safevlm=step_safe,
        guard_verdict=guard,
        guard_first_answer_token=guard + llava_prefill,
        guard_pattern=guard + llava_generate,
        safevlm_generate=safevlm_generate,
        training_stage1=forward + llm_train + 2 * safety,
        training_full=3 * forward,
    )


# ------------------------------------------------------------------------------------------------ FLOP counter
def _causal_fraction(query_shape, key_shape, is_causal: bool) -> float:
    s_q, s_k = query_shape[-2], key_shape[-2]
    return (s_q + 1) / (2 * s_q) if is_causal and s_q == s_k else 1.0


def _cpu_flash_sdpa(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return int(flop_counter.sdpa_flop_count(query, key, value) * _causal_fraction(query, key, is_causal))


def _cpu_flash_sdpa_backward(
    grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs
) -> int:
    flops = flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
    return int(flops * _causal_fraction(query, key, is_causal))


# PyTorch's counter knows the CUDA attention kernels only; the CPU flash-attention kernel SDPA picks here is added.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_sdpa_backward,
}


def count_flops(run: Callable[[], Any]) -> int:
    """Matrix-product FLOPs executed by ``run()`` (``torch.utils.flop_counter`` plus the CPU attention kernel)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        run()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------- real llava shapes
def parameter_overhead(model: SafeVLMForConditionalGeneration) -> dict[str, Any]:
    """Base and safety parameter counts of a SafeVLM (any device, meta included), per safety module."""
    per_module = {name: sum(p.numel() for p in module.parameters()) for name, module in model.safety_modules().items()}
    safety = sum(per_module.values())
    total = sum(p.numel() for p in model.parameters())
    return {
        "base_params": total - safety,
        "total_params": total,
        "safety_params": safety,
        "safety_fraction": safety / (total - safety),
        "per_module": per_module,
    }


def real_shape_overheads(num_safety_tokens: int = 64, text_tokens: int = 40) -> dict[str, Any]:
    """Parameter overhead (meta device, nothing allocated) and FLOP floors at llava-1.5-7b and -13b shapes."""
    results = {}
    for size in ("7b", "13b"):
        config = SafeVLMConfig.from_llava_config(llava_15_config(size), num_safety_tokens=num_safety_tokens)
        model = build_meta_model(config)
        floors = analytic_floors(config, text_tokens, name=f"llava-1.5-{size}")
        parameters = parameter_overhead(model)
        results[f"llava-1.5-{size}"] = {
            "parameters": parameters,
            "floors": floors.to_dict(),
            # Training state in fp32 with AdamW (gradient + two moments = 12 bytes per trainable parameter).
            "adamw_state_bytes_stage1": 12 * parameters["safety_params"],
            "adamw_state_bytes_full": 12 * parameters["total_params"],
        }
    return results
