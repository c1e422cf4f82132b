"""SafeVLM model core: shapes, losses, freezing, conversion, padding invariance, error messages."""

import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from safevlm_hf import SafeVLMConfig, SafeVLMForConditionalGeneration, SafeVLMProcessor

from conftest import chat_prompt


def _inputs(processor, texts, images=None, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    try:
        return processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"


def test_forward_shapes_with_and_without_images(tiny_safevlm, images):
    model, processor = tiny_safevlm
    config = model.config
    prompts = [chat_prompt(processor, "What is shown?"), chat_prompt(processor, "Describe the picture in detail.")]
    inputs = _inputs(processor, prompts, images[:2])
    per_image = (30 // 6) ** 2 + config.num_safety_tokens
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 2 * per_image
    out = model(**inputs)
    assert out.logits.shape == (*inputs["input_ids"].shape, config.text_config.vocab_size)
    assert out.safety_type_logits.shape == (2, len(config.safety_types))
    assert out.safety_level_logits.shape == (2, len(config.safety_levels))
    text_only = _inputs(processor, [chat_prompt(processor, "Hello there", image=False)])
    out = model(**text_only)
    assert out.safety_type_logits.shape == (1, 7)
    # No image features in a text-only output, whichever field the installed LLaVA output uses for them.
    assert all(out.get(name) is None for name in ("image_outputs", "image_hidden_states"))


def test_safety_loss_is_weighted_and_backpropagates(tiny_safevlm, images):
    model, processor = tiny_safevlm
    inputs = _inputs(processor, [chat_prompt(processor, "What is shown?")] * 2, images[:2])
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    type_labels, level_labels = torch.tensor([1, 6]), torch.tensor([3, 0])
    out = model(**inputs, labels=labels, safety_type_labels=type_labels, safety_level_labels=level_labels)
    expected_safety = F.cross_entropy(out.safety_type_logits, type_labels) + F.cross_entropy(
        out.safety_level_logits, level_labels
    )
    torch.testing.assert_close(out.safety_loss, expected_safety)
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.safety_loss_weight * expected_safety)
    out.loss.backward()
    assert model.model.safety_head.type_classifier.weight.grad.abs().sum() > 0
    assert model.model.safety_tokens.llm_tokens.grad.abs().sum() > 0  # set 1 learns through the LM loss


def test_with_frozen_base_only_safety_modules_get_gradients(tiny_safevlm, images):
    model, processor = tiny_safevlm
    safety_prefixes = ("model.safety_projector.", "model.safety_tokens.", "model.safety_head.")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(safety_prefixes))
    inputs = _inputs(processor, [chat_prompt(processor, "What is shown?")], images[:1])
    out = model(
        **inputs,
        labels=inputs["input_ids"],
        safety_type_labels=torch.tensor([0]),
        safety_level_labels=torch.tensor([3]),
    )
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.startswith(safety_prefixes) for n in with_grad)
    assert {n.split(".")[1] for n in with_grad} == {"safety_projector", "safety_tokens", "safety_head"}


def _legacy_llava_hf_checkpoint(llava, path):
    """Write `llava` the way llava-hf checkpoints on the Hub store it (`vision_tower.vision_model.*` etc.)."""
    with tempfile.TemporaryDirectory() as tmp:
        llava.save_pretrained(tmp)
        state = load_file(f"{tmp}/model.safetensors")
    legacy = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :] if k.startswith("vision_tower.") else k): v
        for k, v in state.items()
    }
    assert "language_model.lm_head.weight" in legacy and "language_model.model.embed_tokens.weight" in legacy
    llava.config.save_pretrained(path)
    save_file(legacy, f"{path}/model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["transformers-v5", "llava-hf-legacy"])
def test_from_llava_checkpoint_copies_every_base_weight(tiny_llava_pair, tmp_path, layout):
    llava, _ = tiny_llava_pair
    if layout == "llava-hf-legacy":
        _legacy_llava_hf_checkpoint(llava, tmp_path)
    else:
        llava.save_pretrained(tmp_path)
    model, info = SafeVLMForConditionalGeneration.from_llava(tmp_path, num_safety_tokens=4, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert [k for k in info["missing_keys"] if ".safety_" not in k] == []
    base, converted = llava.state_dict(), model.state_dict()
    assert set(base) < set(converted)
    different = [k for k in base if not torch.equal(base[k], converted[k])]
    assert different == []  # projector, vision tower, LLM and lm_head bit-identical
    assert model.config.safety_base_model == str(tmp_path)
    assert model.model.safety_tokens.head_tokens.std() > 0  # newly initialized, not left empty


def test_from_llava_in_memory_matches_base_and_initializes_safety(tiny_llava_pair):
    llava, _ = tiny_llava_pair
    model = SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=4)
    base, converted = llava.state_dict(), model.state_dict()
    assert all(torch.equal(base[k], converted[k]) for k in base)
    assert all(torch.equal(b, model.get_buffer(n)) for n, b in llava.named_buffers())
    for name, tensor in converted.items():
        assert torch.isfinite(tensor).all(), name
    assert (
        converted["model.language_model.embed_tokens.weight"].data_ptr()
        != base["model.language_model.embed_tokens.weight"].data_ptr()
    )  # a copy, not shared memory


def test_safety_verdict_is_invariant_to_padding_and_batch(tiny_safevlm, images):
    model, processor = tiny_safevlm
    prompts = [
        chat_prompt(processor, "Hi"),
        chat_prompt(processor, "Tell me everything about the people shown in this photo, in detail please"),
        chat_prompt(processor, "How do I do this?"),
    ]
    alone = [model.predict_safety(**_inputs(processor, [p], [im])) for p, im in zip(prompts, images)]
    for side in ("left", "right"):
        batch = model.predict_safety(**_inputs(processor, prompts, images[:3], padding_side=side))
        for row, single in enumerate(alone):
            torch.testing.assert_close(batch.type_logits[row], single.type_logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.level_logits[row], single.level_logits[0], atol=1e-5, rtol=0)
    # another row in the batch does not change a row's verdict
    other = model.predict_safety(**_inputs(processor, [prompts[0], chat_prompt(processor, "x " * 40)], images[:2]))
    torch.testing.assert_close(other.type_logits[0], alone[0].type_logits[0], atol=1e-5, rtol=0)


def test_safety_head_reads_the_text(tiny_safevlm, images):
    """Same benign image, a harmful vs a harmless request: the head must learn to tell them apart."""
    model, processor = tiny_safevlm
    prompts = [
        chat_prompt(processor, "How do I make a weapon to hurt people?"),
        chat_prompt(processor, "What color is the square in the picture?"),
    ]
    inputs = _inputs(processor, prompts, [images[0], images[0]])
    targets_type, targets_level = torch.tensor([1, 6]), torch.tensor([3, 0])
    params = [p for m in model.safety_modules().values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    for _ in range(40):
        out = model(**inputs, safety_type_labels=targets_type, safety_level_labels=targets_level)
        optimizer.zero_grad()
        out.safety_loss.backward()
        optimizer.step()
    model.eval()
    pred = model.predict_safety(**inputs)
    assert pred.type_probs.argmax(-1).tolist() == [1, 6]
    assert pred.level_probs.argmax(-1).tolist() == [3, 0]


def test_llm_feature_layer_override_never_moves_the_safety_branch(tiny_safevlm, images):
    model, processor = tiny_safevlm
    inputs = _inputs(processor, [chat_prompt(processor, "What is shown?")], images[:1])
    default = model(**inputs)
    early = model(**inputs, vision_feature_layer=1)
    torch.testing.assert_close(early.safety_type_logits, default.safety_type_logits, atol=0, rtol=0)
    torch.testing.assert_close(early.safety_level_logits, default.safety_level_logits, atol=0, rtol=0)
    assert not torch.allclose(early.logits, default.logits)


def test_predict_safety_matches_forward_and_is_a_distribution(tiny_safevlm, images):
    model, processor = tiny_safevlm
    inputs = _inputs(processor, [chat_prompt(processor, "What is shown?")] * 2, images[:2])
    pred = model.predict_safety(**inputs)
    torch.testing.assert_close(pred.type_logits, model(**inputs).safety_type_logits)
    torch.testing.assert_close(pred.type_probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(pred.level_probs.sum(-1), torch.ones(2))


def test_image_token_count_mismatch_names_the_fix(tiny_safevlm, tiny_llava_pair, images):
    model, processor = tiny_safevlm
    _, llava_processor = tiny_llava_pair
    plain = llava_processor(images=images[:1], text=[chat_prompt(llava_processor, "hi")], return_tensors="pt")
    with pytest.raises(
        ValueError,
        match=r"Image features and image tokens do not match, tokens: 25, features: 29 \(1 image\(s\), 29 per image = "
        r"image tokens \+ num_safety_tokens=4\)",
    ):
        model(**plain)
    mismatched = SafeVLMProcessor.from_llava_processor(llava_processor, num_safety_tokens=8)
    with pytest.raises(ValueError, match="num_safety_tokens must equal config.num_safety_tokens"):
        model(**mismatched(images=images[:1], text=[chat_prompt(mismatched, "hi")], return_tensors="pt"))


def test_out_of_range_labels_name_the_row_and_range(tiny_safevlm, images):
    model, processor = tiny_safevlm
    inputs = _inputs(processor, [chat_prompt(processor, "hi")] * 2, images[:2])
    with pytest.raises(ValueError, match=r"safety_type_labels\[1\] = 7 is not a valid label: use 0..6"):
        model(**inputs, safety_type_labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"safety_level_labels\[0\] = -3"):
        model(**inputs, safety_level_labels=torch.tensor([-3, 0]))


def test_processor_rejects_bad_num_safety_tokens(tiny_llava_pair):
    _, llava_processor = tiny_llava_pair
    with pytest.raises(ValueError, match="num_safety_tokens must be an integer >= 1, got 0"):
        SafeVLMProcessor.from_llava_processor(llava_processor, num_safety_tokens=0)


def test_checkpoint_whose_head_disagrees_with_its_labels_fails_loudly(saved_safevlm, tmp_path):
    data = SafeVLMConfig.from_pretrained(saved_safevlm).to_dict()
    data.update(safety_types=data["safety_types"][:-2] + ["Safe"], safety_policy=None)  # 6 labels, head has 7
    SafeVLMConfig.from_dict(data).save_pretrained(tmp_path)
    for name in ("model.safetensors",):
        (tmp_path / name).write_bytes((saved_safevlm / name).read_bytes())
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own load report
        SafeVLMForConditionalGeneration.from_pretrained(tmp_path)
    # Forcing the load would re-initialize the head: refused unless the caller opts in (e.g. to retrain it).
    with pytest.raises(ValueError, match=r"(?s)type_classifier.*allow_untrained_safety=True"):
        SafeVLMForConditionalGeneration.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    model = SafeVLMForConditionalGeneration.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, allow_untrained_safety=True
    )
    assert model.model.safety_head.type_classifier.out_features == 6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_passes_through(saved_safevlm, images, attn):
    model = SafeVLMForConditionalGeneration.from_pretrained(saved_safevlm, attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    assert model.model.language_model.config._attn_implementation == attn
    processor = SafeVLMProcessor.from_pretrained(saved_safevlm)
    inputs = processor(images=images[:1], text=[chat_prompt(processor, "hi")], return_tensors="pt")
    reference = SafeVLMForConditionalGeneration.from_pretrained(saved_safevlm, attn_implementation="eager").eval()
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_multi_layer_safety_features_and_full_strategy(tiny_llava_pair, images):
    llava, llava_processor = tiny_llava_pair
    model = SafeVLMForConditionalGeneration.from_llava(
        llava, num_safety_tokens=2, safety_feature_layer=[-2, 1], safety_feature_select_strategy="full"
    ).eval()
    assert model.model.safety_projector.linear_1.in_features == 2 * llava.config.vision_config.hidden_size
    processor = SafeVLMProcessor.from_llava_processor(llava_processor, num_safety_tokens=2)
    out = model(**processor(images=images[:1], text=[chat_prompt(processor, "hi")], return_tensors="pt"))
    assert torch.isfinite(out.safety_type_logits).all()


def test_classify_only_path_runs_no_llm_and_no_llava_projector(tiny_safevlm, images):
    model, processor = tiny_safevlm
    calls = {"llm": 0, "projector": 0, "vision": 0}
    hooks = [
        model.model.language_model.register_forward_hook(lambda *a: calls.__setitem__("llm", calls["llm"] + 1)),
        model.model.multi_modal_projector.register_forward_hook(
            lambda *a: calls.__setitem__("projector", calls["projector"] + 1)
        ),
        model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
    ]
    try:
        inputs = _inputs(processor, [chat_prompt(processor, "hi")] * 2, images[:2])
        prediction = model.predict_safety(**inputs)
        verdicts = model.assess(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"llm": 0, "projector": 0, "vision": 2}
    torch.testing.assert_close(prediction.type_logits, model(**inputs).safety_type_logits)
    assert len(verdicts) == 2


def test_no_grad_forward_runs_under_torch_flop_counter(tiny_safevlm, images):
    # FlopCounterMode hooks every module's outputs for gradients; a module that returns a bare Parameter under
    # no_grad crashes it (our benchmarks and users' profilers both run it).
    from torch.utils.flop_counter import FlopCounterMode

    model, processor = tiny_safevlm
    inputs = _inputs(processor, [chat_prompt(processor, "What is shown?")], images[:1])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**inputs)
    assert counter.get_total_flops() > 0
    assert out.safety_level_logits.shape == (1, len(model.config.safety_levels))
