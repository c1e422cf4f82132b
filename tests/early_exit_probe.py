"""A probe of the tensor through which a VLM's LLM reads the image, and an independent reference for it.

* LLaVA family (LLaVA-1.5, LLaVA-NeXT, SafeVLM): the projector's input (the LLM path; SafeVLM's safety branch has its
  own projector). Reference: `vision_tower(pixels, output_hidden_states=True).hidden_states[l]` without its CLS token,
  for exactly the pixels (every anyres tile) the tower was given.
* `mllama`: the `cross_attention_states` each cross-attention layer receives. Reference: the vision model run without
  early exit, every encoder block's output kept by hooks; block `l`'s output is reshaped and unpadded by hand, put in
  the final hidden state's slot of the vision output, and projected by `multi_modal_projector`.
"""

from __future__ import annotations

from typing import Any

import torch


def _base(model: Any) -> Any:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


class EarlyExitProbe:
    """Records every image-reading forward of `model`: its image inputs and the tensor the LLM reads."""

    def __init__(self, model: Any):
        self.model = _base(model)
        self.mllama = self.model.config.model_type == "mllama"
        self.image_inputs: list[dict[str, torch.Tensor]] = []
        self.llm_reads: list[torch.Tensor] = []
        self.recording = True
        inner = self.model.model
        if self.mllama:
            handles = [inner.vision_model.register_forward_pre_hook(self._vision_inputs, with_kwargs=True)]
            for layer in inner.language_model.layers:
                if type(layer).__name__ == "MllamaCrossAttentionDecoderLayer":
                    handles.append(layer.register_forward_pre_hook(self._cross_attention_states, with_kwargs=True))
        else:
            handles = [
                inner.vision_tower.register_forward_pre_hook(self._tower_pixels, with_kwargs=True),
                inner.multi_modal_projector.register_forward_pre_hook(self._projector_input),
            ]
        self.handles = handles

    # ------------------------------------------------------------------------------------------------- recording
    def _tower_pixels(self, _module, args, kwargs):
        if self.recording:
            pixels = args[0] if args else kwargs["pixel_values"]
            self.image_inputs.append({"pixel_values": pixels.detach().clone()})

    def _projector_input(self, _module, args):
        if self.recording:
            self.llm_reads.append(args[0].detach().clone())

    def _vision_inputs(self, _module, args, kwargs):
        if self.recording:
            names = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
            self.image_inputs.append({name: kwargs[name].detach().clone() for name in names})

    def _cross_attention_states(self, _module, args, kwargs):
        states = kwargs.get("cross_attention_states")
        if self.recording and states is not None:
            if len(self.llm_reads) == len(self.image_inputs):  # every cross-attention layer reads the same states
                torch.testing.assert_close(states, self.llm_reads[-1], rtol=0, atol=0)
            else:
                self.llm_reads.append(states.detach().clone())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # ------------------------------------------------------------------------------------------------- reference
    @torch.no_grad()
    def expected(self, index: int, layer: int) -> torch.Tensor:
        """What the LLM must read at vision layer `layer` (1..N) for recorded forward `index`."""
        self.recording = False
        try:
            inputs = self.image_inputs[index]
            if self.mllama:
                return self._mllama_reference(inputs, layer)
            tower = self.model.model.vision_tower
            return tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[layer][:, 1:]
        finally:
            self.recording = True

    def block_outputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """mllama: the vision model's output and each encoder block's output (local blocks, then global ones),
        reshaped to `(batch, images, tiles, patches, hidden)` with the padding patches removed."""
        vision = self.model.model.vision_model
        blocks = list(vision.transformer.layers) + list(vision.global_transformer.layers)
        kept: list[torch.Tensor] = []
        handles = [block.register_forward_hook(lambda _m, _a, out: kept.append(out)) for block in blocks]
        try:
            final = vision(**inputs).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        batch, images, tiles, patches, _ = final.shape
        hidden = vision.config.hidden_size
        return final, [state.reshape(batch, images, tiles, -1, hidden)[:, :, :, :patches] for state in kept]

    def _mllama_reference(self, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        final, states = self.block_outputs(inputs)
        hidden = self.model.model.vision_model.config.hidden_size
        vision_output = torch.cat([states[layer - 1], final[..., hidden:]], dim=-1)
        projected = self.model.model.multi_modal_projector(vision_output)
        return projected.reshape(-1, vision_output.shape[-2], self.model.config.text_config.hidden_size)

    def assert_reads(self, layers: list[int]) -> None:
        """Recorded forward `i` read layer `layers[i]` (one entry per recorded forward)."""
        assert len(self.llm_reads) == len(self.image_inputs) == len(layers), (
            len(self.llm_reads),
            len(self.image_inputs),
            len(layers),
        )
        for index, layer in enumerate(layers):
            torch.testing.assert_close(self.llm_reads[index], self.expected(index, layer), rtol=0, atol=0)
