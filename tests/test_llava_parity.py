"""Drop-in parity: SafeVLM keeps the contract of transformers' LLaVA (each check runs on both models).

Where SafeVLM must differ it is by design and documented: each image fills `num_safety_tokens` more placeholders
(safety tokens set 1), and outputs carry the safety head's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safevlm_hf import SafeVLMForConditionalGeneration

from conftest import chat_prompt


@pytest.fixture(params=["llava", "safevlm"])
def pair(request, tiny_llava_pair, _tiny_safevlm_pair):
    model, processor = tiny_llava_pair if request.param == "llava" else _tiny_safevlm_pair
    model = copy.deepcopy(model).eval()
    if request.param == "safevlm":
        model.set_safety_tokenizer(processor.tokenizer)
    return model, processor


def _inputs(processor, images, texts=("What is shown?", "Describe the picture in detail please.")):
    prompts = [chat_prompt(processor, text) for text in texts]
    return processor(images=images[: len(prompts)], text=prompts, return_tensors="pt", padding=True)


def test_return_dict_false_gives_the_same_values_as_a_tuple(pair, images):
    model, processor = pair
    inputs = _inputs(processor, images)
    with torch.no_grad():
        as_dict = model(**inputs, use_cache=False)
        as_tuple = model(**inputs, use_cache=False, return_dict=False)
        base_tuple = model.model(**inputs, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple())
    if isinstance(model, SafeVLMForConditionalGeneration):  # the safety fields come last, in declaration order
        torch.testing.assert_close(as_tuple[-3], as_dict.safety_type_logits)
        torch.testing.assert_close(as_tuple[-2], as_dict.safety_level_logits)
        torch.testing.assert_close(as_tuple[-1], as_dict.safety_subcategory_logits)


def test_get_image_features_follows_the_5x_contract(pair, images):
    model, processor = pair
    pixel_values = _inputs(processor, images)["pixel_values"]
    num_states = model.config.vision_config.num_hidden_layers + 1
    with torch.no_grad():
        as_dict = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        as_tuple = model.get_image_features(pixel_values=pixel_values, return_dict=False)
        with_states = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
    assert isinstance(as_tuple, tuple)
    assert len(as_dict.pooler_output) == 2  # one feature tensor per image
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state)
    assert len(with_states.hidden_states) == num_states
    assert all(state is not None for state in with_states.hidden_states)
    if isinstance(model, SafeVLMForConditionalGeneration):
        # Set 1 follows LLaVA's own projected tokens; the safety features sit beside them.
        llava_tokens = model.model.multi_modal_projector(with_states.hidden_states[-2][:, 1:])
        torch.testing.assert_close(as_dict.pooler_output[0][: llava_tokens.shape[1]], llava_tokens[0])
        torch.testing.assert_close(
            as_dict.pooler_output[0][llava_tokens.shape[1] :], model.model.safety_tokens.llm_tokens
        )
        assert len(as_dict.safety_features) == 2


def _four_d(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal + padding mask (batch, 1, query, key) a packed or shared-prefix trainer passes."""
    length = mask.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # padded queries attend to themselves only (no NaN rows)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def test_a_4d_attention_mask_works_as_its_2d_equivalent(pair, images):
    model, processor = pair
    inputs = _inputs(processor, images)
    four_d = dict(inputs, attention_mask=_four_d(inputs["attention_mask"], torch.float32))
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        reference = model(**inputs, position_ids=position_ids, use_cache=False)
        packed = model(**four_d, position_ids=position_ids, use_cache=False)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(packed.logits[real], reference.logits[real], atol=1e-4, rtol=1e-4)
    if isinstance(model, SafeVLMForConditionalGeneration):
        torch.testing.assert_close(packed.safety_type_logits, reference.safety_type_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.safety_level_logits, reference.safety_level_logits, atol=1e-5, rtol=1e-5)


def test_switching_the_attention_implementation_reaches_every_attention_layer(pair, images):
    model, processor = pair
    inputs = _inputs(processor, images)
    with torch.no_grad():
        sdpa = model(**inputs)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        assert model.config.text_config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "eager"
        eager = model(**inputs)
    real = inputs["attention_mask"].bool()  # padded positions differ between kernels by design
    torch.testing.assert_close(eager.logits[real], sdpa.logits[real], atol=1e-4, rtol=1e-4)
    if isinstance(model, SafeVLMForConditionalGeneration):
        torch.testing.assert_close(eager.safety_level_logits, sdpa.safety_level_logits, atol=1e-5, rtol=1e-5)


def test_generate_without_a_prompt_starts_from_bos(pair):
    model, processor = pair
    out = model.generate(max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4) and int(out[0, 0]) == processor.tokenizer.bos_token_id
    if isinstance(model, SafeVLMForConditionalGeneration):
        ungated = model.generate(max_new_tokens=3, do_sample=False, safety_gating=False)
        verdict = model.assess(input_ids=out[:, :1])[0]
        if verdict.action == "answer":
            assert torch.equal(out, ungated)


def test_resized_token_embeddings_keep_forward_and_generate_working(pair, images):
    model, processor = pair
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(old + 8)
    assert model.get_input_embeddings().num_embeddings == old + 8
    assert model.get_output_embeddings().out_features == old + 8
    inputs = _inputs(processor, images)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[-1] == old + 8
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(pair, images):
    model, processor = pair
    inputs = _inputs(processor, images)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    extra = {}
    if isinstance(model, SafeVLMForConditionalGeneration):
        extra = {"safety_type_labels": torch.tensor([6, 1]), "safety_level_labels": torch.tensor([0, 3])}

    def loss_and_grad():
        model.zero_grad()
        loss = model(**inputs, labels=labels, use_cache=False, **extra).loss
        loss.backward()
        return loss.detach(), model.get_input_embeddings().weight.grad.clone()

    model.train()
    torch.manual_seed(0)
    plain_loss, plain_grad = loss_and_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    torch.manual_seed(0)
    checkpointed_loss, checkpointed_grad = loss_and_grad()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    torch.testing.assert_close(checkpointed_grad, plain_grad, atol=1e-6, rtol=1e-5)


def test_safevlm_takes_the_cache_under_either_name(tiny_safevlm, images):
    # transformers 5.24 renamed `past_key_values` to `cache`; SafeVLM accepts both on every release in its range.
    model, processor = tiny_safevlm
    inputs = _inputs(processor, images, texts=("What is shown?",))
    with torch.no_grad():
        prefix = model(**inputs, use_cache=True)
        cache = prefix.get("cache", prefix.get("past_key_values"))
        token = prefix.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        full = model(
            input_ids=torch.cat([inputs["input_ids"], token], dim=1),
            pixel_values=inputs["pixel_values"],
            attention_mask=mask,
        ).logits[:, -1:]
        for name in ("cache", "past_key_values"):
            step = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: copy.deepcopy(cache)})
            torch.testing.assert_close(step.logits, full, atol=1e-4, rtol=1e-4)
            assert step.safety_type_logits is None  # decoding steps never rerun the head
        with pytest.raises(ValueError, match="not both"):
            model(input_ids=token, attention_mask=mask, cache=cache, past_key_values=cache)
