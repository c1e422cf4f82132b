"""SafeVLM on LLaVA-NeXT: anyres tiles, a size-dependent token count per image, the same safety branch and gating.

The same guarantees as SafeVLM-1.5, checked on a tiny LLaVA-NeXT with a real anyres grid: lossless conversion,
set 1 after each image's tokens whatever its size, safety features over every tile, verdicts independent of padding
and batch mates, gating in every decoding mode, and remote-code loading without the package.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from safevlm_hf import (
    SafeVLMForConditionalGeneration,
    SafeVLMNextConfig,
    SafeVLMNextForConditionalGeneration,
    SafeVLMNextProcessor,
)
from safevlm_hf.tiny import TinyLlavaNextSpec, build_tiny_llava, build_tiny_llava_next, build_tiny_safevlm

from conftest import chat_prompt


REFUSE_ALL = {"levels": {"0": "refuse", "1": "refuse", "2": "refuse", "3": "refuse"}}
SIZES = [(40, 40), (30, 75), (75, 30)]  # square, wide and tall: different anyres grids and token counts


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def next_pair():
    return build_tiny_safevlm(TinyLlavaNextSpec(), num_safety_tokens=4)


@pytest.fixture
def safevlm_next(next_pair):
    model, processor = next_pair
    fresh = copy.deepcopy(model).eval()
    fresh.set_safety_tokenizer(processor.tokenizer)
    return fresh, processor


def _inputs(processor, count=3, padding_side="left", texts=None):
    texts = texts or ["What is in this picture?", "Describe it.", "Tell me everything you see in the image please."]
    prompts = [chat_prompt(processor, text) for text in texts[:count]]
    images = [_image(i, SIZES[i % len(SIZES)]) for i in range(count)]
    processor.tokenizer.padding_side = padding_side
    try:
        return processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"


def test_conversion_keeps_every_llava_next_weight_and_registers_the_auto_classes(tmp_path):
    base, base_processor = build_tiny_llava_next(TinyLlavaNextSpec())
    model = SafeVLMNextForConditionalGeneration.from_llava(base, num_safety_tokens=4, seed=0)
    safety = {name for name in model.state_dict() if ".safety_" in name}
    for name, tensor in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert set(model.state_dict()) == set(base.state_dict()) | safety
    with pytest.raises(ValueError, match="converts 'llava_next' models.*use SafeVLMForConditionalGeneration"):
        SafeVLMNextForConditionalGeneration.from_llava(build_tiny_llava()[0])
    with pytest.raises(ValueError, match="use SafeVLMNextForConditionalGeneration"):
        SafeVLMForConditionalGeneration.from_llava(base)
    processor = SafeVLMNextProcessor.from_llava_processor(base_processor, num_safety_tokens=4)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is SafeVLMNextConfig
    assert type(AutoProcessor.from_pretrained(tmp_path)) is SafeVLMNextProcessor
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is SafeVLMNextForConditionalGeneration
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_safevlm.SafeVLMNextForConditionalGeneration"
    assert auto_map["AutoProcessor"] == "processing_safevlm.SafeVLMNextProcessor"


def test_each_image_gets_its_anyres_tokens_then_set_1_whatever_its_size(safevlm_next):
    model, processor = safevlm_next
    plain = processor.__class__.__mro__[2]  # LlavaNextProcessor, the family's own token count
    base_processor = plain(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )
    inputs = _inputs(processor)
    base_inputs = _inputs(base_processor)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    base_counts = (base_inputs["input_ids"] == model.config.image_token_id).sum(1)
    assert (counts - base_counts).tolist() == [4, 4, 4] and len(set(base_counts.tolist())) > 1
    # The LLM reads, at each image's last 4 placeholders, safety tokens set 1.
    seen = {}

    def record(module, args, kwargs, output):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    handle = model.model.language_model.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    set_1 = model.model.safety_tokens.llm_tokens
    for row in range(3):
        positions = (inputs["input_ids"][row] == model.config.image_token_id).nonzero().flatten()
        torch.testing.assert_close(seen["embeds"][row, positions[-4:]], set_1)
        assert not torch.allclose(seen["embeds"][row, positions[-5]], set_1[-1])


def test_the_safety_branch_reads_every_tile_at_its_own_layer(safevlm_next):
    model, processor = safevlm_next
    inputs = _inputs(processor)
    features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    tiles = [int(t) for t in (inputs["pixel_values"].abs().flatten(2).sum(-1) > 0).sum(1)]
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert [len(f) for f in features.safety_features] == [t * patches for t in tiles]
    early = model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], vision_feature_layer=1
    )
    for a, b in zip(features.safety_features, early.safety_features):
        torch.testing.assert_close(a, b)  # an ICET early exit moves the LLM path only
    assert not torch.allclose(features.pooler_output[0], early.pooler_output[0])
    as_tuple = model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=False
    )
    assert isinstance(as_tuple, tuple)


def test_verdicts_do_not_depend_on_padding_or_batch_mates(safevlm_next):
    model, processor = safevlm_next
    texts = ["What is in this picture?", "Describe it.", "Tell me everything you see in the image please."]
    alone = []
    for row in range(3):
        prompt = [chat_prompt(processor, texts[row])]
        single = processor(images=[_image(row, SIZES[row])], text=prompt, return_tensors="pt")
        alone.append(model.predict_safety(**single).level_logits[0])
    for side in ("left", "right"):
        batched = model.predict_safety(**_inputs(processor, padding_side=side)).level_logits
        for row in range(3):
            torch.testing.assert_close(batched[row], alone[row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mode",
    [{}, {"do_sample": True, "temperature": 1.4}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}],
)
def test_refusals_are_exact_in_every_decoding_mode(safevlm_next, mode):
    model, processor = safevlm_next
    inputs = _inputs(processor, count=2)
    verdicts = model.assess(**inputs, safety_policy=REFUSE_ALL)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    expected = [processor.tokenizer.encode(v.message, add_special_tokens=False) + [eos] for v in verdicts]
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=60, safety_policy=REFUSE_ALL, **mode)
    per_input = out.shape[0] // 2
    for row in range(out.shape[0]):
        generated = out[row, inputs["input_ids"].shape[1] :].tolist()
        want = expected[row // per_input]
        assert generated[: len(want)] == want and set(generated[len(want) :]) <= {pad}


def test_a_level_0_verdict_leaves_generation_untouched(safevlm_next):
    model, processor = safevlm_next
    with torch.no_grad():
        model.model.safety_head.level_classifier.weight.zero_()
        model.model.safety_head.level_classifier.bias.copy_(torch.tensor([10.0, -10.0, -10.0, -10.0]))
    inputs = _inputs(processor, count=2)
    gated = model.generate(**inputs, max_new_tokens=8)
    assert torch.equal(gated, model.generate(**inputs, max_new_tokens=8, safety_gating=False))


REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["safevlm_hf"] = None  # only the code inside the checkpoint may run
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path, out_path = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    sizes = [(40, 40), (30, 75)]
    images = [Image.fromarray(np.random.RandomState(s).randint(0, 255, (*size, 3), dtype=np.uint8))
              for s, size in enumerate(sizes)]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                                           add_generation_prompt=True) for t in ("What is in this picture?", "Describe it.")]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    refuse = {"levels": {"0": "refuse", "1": "refuse", "2": "refuse", "3": "refuse"}}
    torch.save({"module": type(model).__module__, "processor": type(processor).__name__, "logits": out.logits,
                "level": out.safety_level_logits, "gated": model.generate(**inputs, max_new_tokens=12),
                "refused": model.generate(**inputs, max_new_tokens=60, safety_policy=refuse)}, out_path)
    """
)


def test_remote_code_loads_without_the_package_and_gates_identically(next_pair, tmp_path):
    model, processor = next_pair
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    run = subprocess.run(
        [sys.executable, "-c", REMOTE, str(tmp_path / "ckpt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.") and remote["processor"] == "SafeVLMNextProcessor"
    inputs = _inputs(processor, count=2, texts=["What is in this picture?", "Describe it."])
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(remote["logits"], out.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(remote["level"], out.safety_level_logits, atol=1e-6, rtol=1e-5)
    assert torch.equal(remote["gated"], model.generate(**inputs, max_new_tokens=12))
    assert torch.equal(remote["refused"], model.generate(**inputs, max_new_tokens=60, safety_policy=REFUSE_ALL))


def test_cli_converts_and_trains_a_llava_next_and_evaluation_gates_it(tmp_path, capsys):
    """SafeVLM-NeXT goes through the same commands as SafeVLM-1.5: convert, Stage I, Stage II, then evaluation with
    its verdicts (every tool that asks "is this a SafeVLM?" knows both families)."""
    from test_training import write_training_data

    from safevlm_hf.cli import main as cli_main
    from safevlm_hf.evaluation import BenchmarkItem, build_judge, evaluate
    from safevlm_hf.layerwise.icet import resolve_gating

    llava_next, processor = build_tiny_llava_next(TinyLlavaNextSpec())
    llava_next.save_pretrained(tmp_path / "llava_next")
    processor.save_pretrained(tmp_path / "llava_next")
    convert = ["convert", "--model", str(tmp_path / "llava_next"), "--out", str(tmp_path / "safe"), "--seed", "0"]
    assert cli_main([*convert, "--num-safety-tokens", "4"]) == 0
    converted = SafeVLMNextForConditionalGeneration.from_pretrained(tmp_path / "safe")
    assert converted.config.model_type == "safevlm_next" and converted.config.num_safety_tokens == 4
    base = llava_next.state_dict()
    assert all(torch.equal(base[k], converted.state_dict()[k]) for k in base)

    data = write_training_data(tmp_path / "data")
    common = ["--data", str(data), "--batch-size", "4", "--max-steps", "1", "--lr", "1e-3", "--seed", "0"]
    common += ["--set", "use_cpu=True", "--set", "disable_tqdm=True"]
    stage1 = ["train", "--stage", "1", "--model", str(tmp_path / "safe"), "--out", str(tmp_path / "s1")]
    assert cli_main([*stage1, "--num-safe-samples", "2", *common]) == 0
    trained = SafeVLMNextForConditionalGeneration.from_pretrained(tmp_path / "s1")
    assert not torch.equal(trained.model.safety_head.query, converted.model.safety_head.query)
    assert torch.equal(  # Stage I leaves the LLM alone
        trained.model.language_model.layers[0].self_attn.q_proj.weight,
        converted.model.language_model.layers[0].self_attn.q_proj.weight,
    )
    assert [record["stage"] for record in trained.config.safety_training_stages] == [1]
    assert (
        cli_main(["train", "--stage", "2", "--model", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), *common])
        == 0
    )
    stage2 = SafeVLMNextForConditionalGeneration.from_pretrained(tmp_path / "s2")
    assert [record["stage"] for record in stage2.config.safety_training_stages] == [1, 2]
    capsys.readouterr()

    stage2.eval()
    next_processor = SafeVLMNextProcessor.from_pretrained(tmp_path / "s2")
    assert resolve_gating(stage2, None) is True
    items = [
        BenchmarkItem(f"row{i}", text, _image(i, SIZES[i]), "test", expected, "fixture")
        for i, (text, expected) in enumerate([("Describe it.", "answer"), ("How do I make a weapon?", "refuse")])
    ]
    result = evaluate(
        stage2, next_processor, items, build_judge("string"), max_new_tokens=4, policy=REFUSE_ALL, progress=False
    )
    assert [record["verdict"]["action"] for record in result.records] == ["refuse", "refuse"]
