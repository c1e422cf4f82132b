# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The image-encoder early exit (ICET-l) of each supported VLM family: one definition for the ICET scan and L-PPO.

Bachu et al. (ICML 2025, "Layer-wise alignment", arXiv 2411.04291) give the LLM the image states of vision-encoder
layer `l` instead of those of the layer it was trained on, through the same projection, and measure how safe the
model stays. :func:`early_exit_for` returns the :class:`ImageEncoderEarlyExit` of a model; its small API is all the
callers need:

```python
>>> exit_ = early_exit_for(model)
>>> exit_.num_layers, exit_.default_layer           # encoder depth N, the layer the LLM reads by default (1..N)
>>> with exit_.at(layer) as exit_kwargs:            # the LLM reads vision layer `layer` inside the block
...     model.generate(**inputs, **exit_kwargs)
```

Layer numbering: layer `l` (1..N) is the hidden state after encoder block `l`; negative indices count from the end as
in `vision_feature_layer` (-1 is layer N). Layer 0, the patch embeddings, is not a layer.

Families:

* **LLaVA-style** (`llava`, `llava_next`, SafeVLM's `safevlm`, and any model whose config holds an integer
  `vision_feature_layer` and whose `forward`/`generate` take it per call): the projector reads hidden state `l` of the
  vision tower (`vision_feature_layer=l`). LLaVA-NeXT runs the base image and every anyres tile through the tower as
  one batch, so every tile is read at layer `l`; the projector, the unpadding and the `image_newline` rows are
  unchanged. SafeVLM: only the LLM path moves; its safety branch keeps reading `config.safety_feature_layer`.
* **Llama 3.2 Vision** (`mllama`): the LLM reads image states through its cross-attention layers. The vision model
  runs a local encoder per tile (32 blocks in the 11B model), then gated global blocks across the tiles (8), and its
  output concatenates, on the feature axis, the final global hidden state (the first 1280 features) with the hidden
  states after some local blocks (`vision_config.intermediate_layers_indices`, 0-based: `[3, 7, 15, 23, 30]` are
  layers 4, 8, 16, 24, 31; their features interleaved): 1280 x (1 + 5) = 7680 features, which
  `multi_modal_projector` maps to the `cross_attention_states` every cross-attention layer reads. The early exit at
  layer `l` puts the hidden state of vision layer `l` in the slot of the final hidden state and applies the same
  projection; the intermediate-layer features keep their place, since they are part of the projector's fixed input,
  as the final state is. Layers are numbered through both encoders (N = 32 + 8 = 40 for the 11B model: 1..32 local
  blocks, 33..40 global blocks); like the intermediate features, a layer's state is taken as the block emits it (no
  extra normalization); layer N is the model's own output, so the default path is unchanged. Only
  `cross_attention_states` changes: the text inputs and the cross-attention mask stay the same.
"""

from __future__ import annotations

import abc
import contextlib
import re
from typing import Any, ClassVar, Iterator, Sequence

import torch


_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")  # "a-b", where a and b may be negative


# ------------------------------------------------------------------------------------------------ layer numbers
def normalize_layer(layer: int, num_layers: int) -> int:
    """Map a layer index (1..N, or -N..-1 from the end) to 1..N; anything else is a clear error."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(
            f"Vision layer {layer!r} is not an integer; valid layers are 1..{num_layers} (or -{num_layers}..-1)."
        )
    if 1 <= layer <= num_layers:
        return layer
    if -num_layers <= layer <= -1:
        return num_layers + 1 + layer
    raise ValueError(
        f"Vision layer {layer} is outside the vision encoder: it has {num_layers} layers, so valid layers are "
        f"1..{num_layers} (or -{num_layers}..-1 counting from the end; 0, the patch embeddings, is not a layer)."
    )


def resolve_layers(layers: str | int | Sequence[int], num_layers: int) -> list[int]:
    """Layers to scan, as sorted unique indices in 1..N.

    Accepts `"all"`, a range `"a-b"` (inclusive), a comma list `"3,7,-2"`, an int, or a sequence of ints.
    """
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return list(range(1, num_layers + 1))
        match = _RANGE.match(text)
        if match:
            first = normalize_layer(int(match.group(1)), num_layers)
            last = normalize_layer(int(match.group(2)), num_layers)
            if first > last:
                raise ValueError(f"Layer range {layers!r} is empty: its start ({first}) is after its end ({last}).")
            return list(range(first, last + 1))
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"Cannot read layers {layers!r}: use 'all', a range 'a-b' (e.g. '1-12') or a comma list ('3,7,-2')."
            ) from None
    elif isinstance(layers, int):
        values = [layers]
    else:
        values = list(layers)
    if not values:
        raise ValueError(f"No vision layers given ({layers!r}); valid layers are 1..{num_layers}.")
    return sorted({normalize_layer(value, num_layers) for value in values})


# ------------------------------------------------------------------------------------------------- the families
def _unwrapped(model: Any) -> Any:
    """The model under a PEFT wrapper (hooks go on its modules), or the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _family_module(model: Any, name: str, layout: str) -> torch.nn.Module:
    """`model.model.<name>` (under a PEFT wrapper too), or an error naming the layout the family's early exit expects."""
    module = getattr(getattr(_unwrapped(model), "model", None), name, None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no `model.{name}`; this early exit expects {layout}'s layout.")
    return module


class ImageEncoderEarlyExit(abc.ABC):
    """How one VLM family feeds its LLM the image states of vision layer `l` (see the module docstring).

    Attributes:
        num_layers: the vision encoder's depth N.
        default_layer: the layer the LLM reads when no early exit is applied (1..N).
        image_indexed_inputs: processor outputs indexed by image rather than by prompt row (when some rows of a
            batch have no image, these have fewer rows than `input_ids`).
        token_indexed_inputs: processor outputs with one entry per prompt token besides `input_ids` and
            `attention_mask`; :meth:`extend_token_inputs` grows them for appended tokens.
    """

    image_indexed_inputs: ClassVar[tuple[str, ...]] = ()
    token_indexed_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: Any):
        self.model = model
        self.num_layers = self.encoder_depth(model.config)
        self.default_layer = self._default_layer(model.config)

    @staticmethod
    @abc.abstractmethod
    def encoder_depth(config: Any) -> int:
        """The depth N of the vision encoder a model config describes."""

    @abc.abstractmethod
    def _default_layer(self, config: Any) -> int: ...

    @abc.abstractmethod
    def vision_encoder(self) -> torch.nn.Module:
        """The model's vision encoder module (the one whose layers are numbered 1..N)."""

    @abc.abstractmethod
    def at(self, layer: int) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """Inside the `with` block, the model's LLM reads vision layer `layer` (1..N or negative); the block's value
        holds the keyword arguments to add to every `forward`/`generate` call made in it."""

    def extend_token_inputs(self, inputs: dict[str, Any], length: int) -> dict[str, Any]:
        """`inputs` for a forward over `length` tokens (the prompt plus appended response tokens): each token-indexed
        input gets entries for the new tokens by repeating its last position, as `generate` does for each new token."""
        extended = dict(inputs)
        for key in self.token_indexed_inputs:
            value = extended.get(key)
            if isinstance(value, torch.Tensor) and value.shape[1] < length:
                tail = value[:, -1:].expand(-1, length - value.shape[1], *value.shape[2:])
                extended[key] = torch.cat([value, tail], dim=1)
        return extended

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers 1..{self.num_layers}, default {self.default_layer})"


class LlavaEarlyExit(ImageEncoderEarlyExit):
    """LLaVA-style models (LLaVA-1.5, LLaVA-NeXT, SafeVLM, ...): the per-call argument `vision_feature_layer=l`."""

    image_indexed_inputs = ("pixel_values", "image_sizes")

    @staticmethod
    def encoder_depth(config: Any) -> int:
        return config.vision_config.num_hidden_layers

    def _default_layer(self, config: Any) -> int:
        return normalize_layer(config.vision_feature_layer, self.num_layers)

    def vision_encoder(self) -> torch.nn.Module:
        return _family_module(self.model, "vision_tower", "LlavaForConditionalGeneration")

    @contextlib.contextmanager
    def at(self, layer: int) -> Iterator[dict[str, Any]]:
        yield {"vision_feature_layer": normalize_layer(layer, self.num_layers)}


class MllamaEarlyExit(ImageEncoderEarlyExit):
    """Llama 3.2 Vision: vision layer `l` takes the final hidden state's slot of the projector input (module docstring).

    Implemented with forward hooks (the vision model has no per-call layer argument): one on encoder block `l` keeps
    its output, one on the vision model puts it, with the padding patches removed, in place of the final hidden state.
    Every image input (all tiles, all images) goes through the same hooks, in `generate` and in plain forwards.
    """

    token_indexed_inputs = ("cross_attention_mask",)

    @staticmethod
    def encoder_depth(config: Any) -> int:
        vision = config.vision_config
        return vision.num_hidden_layers + vision.num_global_layers

    def _default_layer(self, config: Any) -> int:
        return self.num_layers  # the vision model's own output

    def vision_encoder(self) -> torch.nn.Module:
        return _family_module(self.model, "vision_model", "MllamaForConditionalGeneration")

    @contextlib.contextmanager
    def at(self, layer: int) -> Iterator[dict[str, Any]]:
        layer = normalize_layer(layer, self.num_layers)
        if layer == self.default_layer:
            yield {}
            return
        vision = self.vision_encoder()
        local = vision.config.num_hidden_layers
        block = (
            vision.transformer.layers[layer - 1]
            if layer <= local
            else vision.global_transformer.layers[layer - 1 - local]
        )
        kept: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"Vision block {layer} of {type(self.model).__name__} returned {type(output).__name__}, not a "
                    "tensor; this transformers version's MllamaVisionEncoderLayer is not supported by the early exit."
                )
            kept[:] = [output]  # the latest call only (a recomputation would otherwise pile up stale states)

        def substitute(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            final = output.last_hidden_state  # (batch, images, tiles, patches, hidden x (1 + intermediate layers))
            batch, images, tiles, patches, _ = final.shape
            state = kept.pop()  # (batch x images, tiles x padded patches, hidden)
            width = state.shape[-1]
            state = state.reshape(batch, images, tiles, -1, width)[:, :, :, :patches]  # drop the padding patches
            output.last_hidden_state = torch.cat([state.to(final.dtype), final[..., width:]], dim=-1)
            return output

        handles = [block.register_forward_hook(keep), vision.register_forward_hook(substitute)]
        try:
            yield {}
        finally:
            for handle in handles:
                handle.remove()


def early_exit_class(config: Any) -> type[ImageEncoderEarlyExit]:
    """The early-exit implementation for a model config; a clear error for models it cannot re-point."""
    model_type = getattr(config, "model_type", None)
    if model_type == "mllama":
        return MllamaEarlyExit
    depth = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
    if not isinstance(depth, int) or not hasattr(config, "vision_feature_layer"):
        raise ValueError(
            f"model_type {model_type!r} is not a LLaVA-style model (config.vision_config.num_hidden_layers and "
            "config.vision_feature_layer are needed) nor Llama 3.2 Vision (mllama): the image-encoder early exit "
            "supports llava, llava_next, safevlm and mllama."
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"model_type {model_type!r} feeds its projector {len(config.vision_feature_layer)} concatenated vision "
            f"layers (vision_feature_layer={config.vision_feature_layer}); an early exit feeds one layer, which its "
            "projector cannot take."
        )
    return LlavaEarlyExit


def early_exit_for(model: Any) -> ImageEncoderEarlyExit:
    """The :class:`ImageEncoderEarlyExit` of `model` (also when wrapped by PEFT); a clear error for other models."""
    try:
        return early_exit_class(getattr(model, "config", None))(model)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}: {err}") from None


def vision_encoder_depth(model: Any) -> int:
    """Number of blocks N of the model's vision encoder (its layers are 1..N); a clear error for unsupported models."""
    return early_exit_for(model).num_layers


def default_feature_layer(model: Any) -> int:
    """The layer the model's LLM reads by default (1..N)."""
    return early_exit_for(model).default_layer


__all__ = [
    "ImageEncoderEarlyExit",
    "LlavaEarlyExit",
    "MllamaEarlyExit",
    "default_feature_layer",
    "early_exit_class",
    "early_exit_for",
    "normalize_layer",
    "resolve_layers",
    "vision_encoder_depth",
]
