"""Fail closed: every route into the LLM is gated or refused, untrustworthy verdicts refuse, degradation is loud.

Each test names the route or failure it closes (issue: "Fail closed: no route around the verdict").
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from safevlm_hf import SafeVLMForConditionalGeneration, SafetyPolicy, SafetyPolicyError

from conftest import chat_prompt, make_image


REFUSE_IMAGE_LEVEL = 3


def _inputs(processor, text="What is in this picture?", image=True, seed=0):
    prompt = chat_prompt(processor, text, image=image)
    return processor(images=[make_image(seed)] if image else None, text=[prompt], return_tensors="pt")


@pytest.fixture
def image_refuser(tiny_safevlm):
    """A head that refuses whenever it sees the image (level 3) and answers any text without it (level 0)."""
    model, processor = tiny_safevlm
    head = model.model.safety_head
    with torch.no_grad():  # the verdict depends on the safety features alone: the text stream carries no signal
        head.text_proj.weight.zero_()
        head.text_proj.bias.zero_()
        for layer in head.layers:  # nor does the prompt's length: the query does not attend over the text
            layer.self_attn.o_proj.weight.zero_()
            layer.self_attn.o_proj.bias.zero_()
    model.config.safety_training_stages = [{"stage": "test"}]
    policy = {"levels": {"0": "answer", "1": "refuse", "2": "refuse", "3": "refuse"}}
    image_state = _pooled(model, _inputs(processor))
    text_state = _pooled(model, _inputs(processor, image=False))
    direction = image_state - text_state
    middle = (image_state + text_state) / 2
    with torch.no_grad():
        head.level_classifier.weight.zero_()
        head.level_classifier.bias.copy_(torch.tensor([0.0, -50.0, -50.0, 0.0]))
        head.level_classifier.weight[REFUSE_IMAGE_LEVEL] = 200 * direction / direction.norm() ** 2
        head.level_classifier.bias[REFUSE_IMAGE_LEVEL] = -200 * (direction @ middle) / direction.norm() ** 2
    for text in ("What is in this picture?", "a much longer question about the picture " * 4):
        assert model.assess(**_inputs(processor, text), safety_policy=policy)[0].action == "refuse"
        assert model.assess(**_inputs(processor, text, image=False), safety_policy=policy)[0].action == "answer"
    return model, processor, policy


def _pooled(model, inputs) -> torch.Tensor:
    captured = {}
    handle = model.model.safety_head.norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", o[0]))
    model.predict_safety(**inputs)
    handle.remove()
    return captured["x"].detach()


def _message_ids(model, processor, inputs, policy):
    verdict = model.assess(**inputs, safety_policy=policy)[0]
    return processor.tokenizer.encode(verdict.message, add_special_tokens=False) + [processor.tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------- routes into the LLM
def test_image_features_passed_as_encoder_outputs_are_gated(image_refuser):
    model, processor, policy = image_refuser
    inputs = _inputs(processor)
    expected = _message_ids(model, processor, inputs, policy)
    features = model.get_image_features(pixel_values=inputs["pixel_values"])
    out = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        mm_encoder_outputs={"image": features},
        max_new_tokens=60,
        safety_policy=policy,
    )
    assert out[0, inputs["input_ids"].shape[1] :].tolist()[: len(expected)] == expected
    # Features without the safety branch's view of the image (e.g. LLaVA's own) are refused, naming the opt-out.
    plain = BaseModelOutputWithPooling(pooler_output=list(features.pooler_output))
    with pytest.raises(ValueError, match="safety_gating=False"):
        model.generate(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": plain}, max_new_tokens=4)


def test_a_prefix_cache_keeps_the_verdict_of_the_image_it_holds(image_refuser):
    model, processor, policy = image_refuser
    inputs = _inputs(processor)
    expected = _message_ids(model, processor, inputs, policy)
    prompt = inputs["input_ids"]
    with torch.no_grad():
        prefix = model(input_ids=prompt[:, :-2], pixel_values=inputs["pixel_values"], use_cache=True)
    cache = prefix.get("cache", prefix.get("past_key_values"))
    out = model.generate(
        input_ids=prompt,
        attention_mask=inputs["attention_mask"],
        past_key_values=cache,
        max_new_tokens=60,
        safety_policy=policy,
    )
    assert out[0, prompt.shape[1] :].tolist()[: len(expected)] == expected


def test_a_conversation_continued_from_a_returned_cache_keeps_its_verdict(image_refuser):
    model, processor, policy = image_refuser
    inputs = _inputs(processor)
    expected = _message_ids(model, processor, inputs, policy)
    # A first turn decoded without gating (e.g. by a server that gates only later turns) returns its cache.
    first = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, safety_gating=False)
    cache = first.get("cache", first.get("past_key_values"))
    assert cache.safevlm_safety_context.placeholders == [
        int((inputs["input_ids"] == model.config.image_token_id).sum())
    ]
    follow_up = processor.tokenizer(" USER: and now? ASSISTANT:", add_special_tokens=False, return_tensors="pt")
    ids = torch.cat([first.sequences, follow_up["input_ids"]], dim=1)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=60,
        safety_policy=policy,
    )
    assert out[0, ids.shape[1] :].tolist()[: len(expected)] == expected


def test_a_refused_row_leaves_no_cache_and_a_resent_conversation_is_assessed_again(image_refuser):
    model, processor, policy = image_refuser
    inputs = _inputs(processor)
    first = model.generate(**inputs, max_new_tokens=60, return_dict_in_generate=True, safety_policy=policy)
    assert first.safety_verdicts[0].refused and first.get("cache", first.get("past_key_values")) is None
    # Without the image or a cache that saw it, the placeholders cannot be assessed: an error, never an answer.
    with pytest.raises(ValueError, match="safety_gating=False"):
        model.generate(input_ids=first.sequences, max_new_tokens=4, safety_policy=policy)


def test_a_cache_the_model_did_not_build_is_refused(image_refuser):
    model, processor, policy = image_refuser
    inputs = _inputs(processor)
    with torch.no_grad():  # an image conversation cached by the LLM alone: the safety branch never saw the image
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        embeds[inputs["input_ids"] == model.config.image_token_id] = features
        cache = DynamicCache(config=model.config.get_text_config())
        model.model.language_model(inputs_embeds=embeds[:, :-2], use_cache=True, past_key_values=cache)
    with pytest.raises(ValueError, match="cache whose content the safety branch has not seen.*safety_gating=False"):
        model.generate(input_ids=inputs["input_ids"], past_key_values=cache, max_new_tokens=4)


def test_embeddings_with_merged_image_features_are_refused(image_refuser):
    model, processor, policy = image_refuser
    inputs = _inputs(processor)
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        merged = embeds.clone()
        merged[inputs["input_ids"] == model.config.image_token_id] = features
    with pytest.raises(ValueError, match="without input_ids cannot be gated.*safety_gating=False"):
        model.generate(inputs_embeds=merged, attention_mask=inputs["attention_mask"], max_new_tokens=4)
    with pytest.raises(ValueError, match="not the token embeddings of input_ids"):
        model.generate(input_ids=inputs["input_ids"], inputs_embeds=merged, max_new_tokens=4)
    # Plain token embeddings beside their ids are read as text, and the image is gated as usual.
    expected = _message_ids(model, processor, inputs, policy)
    out = model.generate(**inputs, inputs_embeds=embeds, max_new_tokens=60, safety_policy=policy)
    assert out[0, inputs["input_ids"].shape[1] :].tolist()[: len(expected)] == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"penalty_alpha": 0.6, "top_k": 4},
        {"dola_layers": "low"},
        {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0},
        {"num_beams": 2, "force_words_ids": [[5]]},
        {"prompt_lookup_num_tokens": 3},
        {"custom_generate": "some-org/some-decoding-loop"},
    ],
)
def test_decoding_modes_that_run_other_code_are_refused_under_gating(tiny_safevlm, kwargs):
    model, processor = tiny_safevlm
    with pytest.raises(ValueError, match="safety_gating=False"):
        model.generate(**_inputs(processor), max_new_tokens=3, **kwargs)


def test_a_checkpoints_custom_generate_folder_cannot_replace_gated_generate(saved_safevlm, tmp_path, caplog):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_safevlm, folder)
    (folder / "custom_generate").mkdir()
    (folder / "custom_generate" / "generate.py").write_text(
        "import torch\n\ndef generate(model, **kwargs):\n    return torch.tensor([[1, 2, 3]])  # ungated\n"
    )
    with caplog.at_level(logging.WARNING):
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert "custom_generate" in caplog.text
    processor_inputs = _inputs(__import__("safevlm_hf").SafeVLMProcessor.from_pretrained(folder))
    out = model.generate(
        **processor_inputs,
        max_new_tokens=3,
        safety_policy={"levels": {"0": "refuse", "1": "refuse", "2": "refuse", "3": "refuse"}},
    )
    assert out.shape[1] > processor_inputs["input_ids"].shape[1]  # our gated generate ran, not the folder's


# -------------------------------------------------------------------------------------- untrustworthy verdicts
def _unassessed(verdict) -> bool:
    return verdict.action == "refuse" and not verdict.assessed and "could not be assessed" in verdict.message


def test_non_finite_inputs_give_a_refusal_never_an_answer(tiny_safevlm, caplog):
    model, processor = tiny_safevlm
    lenient = {"levels": {"0": "answer", "1": "answer", "2": "answer", "3": "refuse"}}
    inputs = _inputs(processor)
    for corrupt in ("nan", "huge"):
        bad = dict(inputs, pixel_values=inputs["pixel_values"].clone())
        if corrupt == "nan":
            bad["pixel_values"][0, 0, 0, 0] = float("nan")
        else:
            bad["pixel_values"].fill_(1e30)
        with caplog.at_level(logging.WARNING):
            verdict = model.assess(**bad, safety_policy=lenient)[0]
        assert _unassessed(verdict), (corrupt, verdict)
        out = model.generate(**bad, max_new_tokens=40, safety_policy=lenient)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "could not be assessed" in text
    assert "non-finite" in caplog.text


def test_nan_safety_weights_fail_to_load_and_refuse_if_forced(saved_safevlm, tmp_path, processor_of=None):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_safevlm, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.safety_head.level_classifier.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN or infinite.*level_classifier"):
        SafeVLMForConditionalGeneration.from_pretrained(folder)
    model = SafeVLMForConditionalGeneration.from_pretrained(folder, allow_untrained_safety=True).eval()
    processor = __import__("safevlm_hf").SafeVLMProcessor.from_pretrained(folder)
    assert _unassessed(model.assess(**_inputs(processor))[0])


# ------------------------------------------------------------------------------------------- loud degradation
def test_a_checkpoint_without_its_safety_weights_does_not_load_silently(saved_safevlm, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_safevlm, folder)
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if ".safety_" not in k}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks .* safety weight.*allow_untrained_safety=True"):
        AutoModelForImageTextToText.from_pretrained(folder)
    with pytest.raises(ValueError, match="allow_untrained_safety=True"):
        AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert SafeVLMForConditionalGeneration.from_pretrained(folder, allow_untrained_safety=True) is not None


def test_editing_num_safety_tokens_names_the_weights_that_do_not_fit(saved_safevlm, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_safevlm, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_safety_tokens"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        SafeVLMForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ValueError, match="safety_tokens"):
        SafeVLMForConditionalGeneration.from_pretrained(folder, ignore_mismatched_sizes=True)


def test_an_untrained_safety_branch_warns_once_per_model(tiny_llava_pair, caplog):
    llava, processor = tiny_llava_pair
    model = SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=4, seed=0).eval()
    from safevlm_hf import SafeVLMProcessor

    safe_processor = SafeVLMProcessor.from_llava_processor(processor, num_safety_tokens=4)
    model.set_safety_tokenizer(safe_processor.tokenizer)
    inputs = _inputs(safe_processor)
    with caplog.at_level(logging.WARNING):
        model.assess(**inputs)
        model.generate(**inputs, max_new_tokens=2)
    assert caplog.text.count("no recorded training") == 1


def test_conversion_is_reproducible_with_a_seed(tiny_llava_pair):
    llava, _ = tiny_llava_pair
    a, b, c = (SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=4, seed=s) for s in (7, 7, 8))
    for (name, x), (_, y), (_, z) in zip(
        a.model.safety_head.state_dict().items(),
        b.model.safety_head.state_dict().items(),
        c.model.safety_head.state_dict().items(),
    ):
        assert torch.equal(x, y), name
    assert not torch.equal(a.model.safety_tokens.llm_tokens, c.model.safety_tokens.llm_tokens)


def test_refusal_without_an_end_token_names_the_fix(tiny_safevlm):
    model, processor = tiny_safevlm
    refuse_all = {"levels": {"0": "refuse", "1": "refuse", "2": "refuse", "3": "refuse"}}
    with pytest.raises(ValueError, match="end-of-sequence token"):
        model.generate(**_inputs(processor), max_new_tokens=3, eos_token_id=[], safety_policy=refuse_all)


# ---------------------------------------------------------------------------------------------- policy checks
BASE = {"levels": {"0": "answer", "1": "caution", "2": "refuse", "3": "refuse"}}


@pytest.mark.parametrize(
    "template",
    ["No. {reason:{0}}", "No. {reason!x}", "No. {category:d}", "No. {reason:>999999999}", "No. {reason!r}"],
)
def test_templates_that_cannot_be_formatted_plainly_are_rejected_at_load(template):
    with pytest.raises(SafetyPolicyError, match=r"safety_policy.messages.refuse.default"):
        SafetyPolicy.from_dict({**BASE, "messages": {"refuse": {"default": template}}})


def test_level_keys_that_normalize_to_the_same_level_are_rejected():
    with pytest.raises(SafetyPolicyError, match=r"keys '2' and ' 2' both name level 2"):
        SafetyPolicy.from_dict({"levels": {**BASE["levels"], " 2": "caution"}})
    policy = SafetyPolicy.from_dict({"levels": {"0": "answer", " 1": "caution", "2 ": "refuse", "3": "refuse"}})
    assert policy.action("Privacy", 1) == "caution" and policy.action("Privacy", 2) == "refuse"


def test_extends_must_name_one_profile():
    with pytest.raises(SafetyPolicyError, match=r"profiles.teen.extends: expected one profile name"):
        SafetyPolicy.from_dict({**BASE, "profiles": {"teen": {"extends": ["minor", "adult"]}}})
