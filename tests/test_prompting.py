"""One prompt builder and encoder for evaluation and layer-wise alignment (safevlm_hf.prompting)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safevlm_hf.data import SafetyDataError
from safevlm_hf.layerwise import PromptItem
from safevlm_hf.prompting import chat_text, encode_items, encode_prompts, is_safevlm, item_image

from conftest import make_image
from test_data import bomb_png


def test_chat_text_uses_the_processor_template(tiny_safevlm):
    _, processor = tiny_safevlm
    assert chat_text(processor, "Hi?", True) == "USER: <image>\nHi? ASSISTANT:"
    assert chat_text(processor, "Hi?", False) == "USER: Hi? ASSISTANT:"
    with pytest.raises(ValueError, match="has no chat template"):  # formatted wrongly otherwise: refused, with the fix
        chat_text(object(), "Hi?", False)


def test_is_safevlm_reads_the_config_also_through_peft(tiny_safevlm, tiny_llava_pair):
    model, _ = tiny_safevlm
    llava, _ = tiny_llava_pair
    assert is_safevlm(model) and not is_safevlm(llava)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert is_safevlm(wrapped)


def test_encode_prompts_mixes_image_and_text_rows_left_padded_in_the_model_dtype(tiny_safevlm):
    _, processor = tiny_safevlm
    prompts = ["Describe this picture in a few words, please.", "Hi?"]
    batch = encode_prompts(processor, prompts, [make_image(0), None], device="cpu", dtype=torch.bfloat16)
    assert batch["pixel_values"].dtype == torch.bfloat16 and batch["pixel_values"].shape[0] == 1
    assert batch["input_ids"].dtype == torch.long  # only floating inputs take the dtype
    mask = batch["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]  # left padding: every row ends at the last position
    items = [PromptItem(prompts[0], make_image(0)), PromptItem(prompts[1])]
    same = encode_items(processor, items)
    assert torch.equal(same["input_ids"], batch["input_ids"])


def test_item_image_refuses_a_decompression_bomb_naming_the_item(tmp_path):
    item = PromptItem("Describe it.", str(bomb_png(tmp_path / "bomb.png", 20_000, 20_000)), id="b1")
    with pytest.raises(SafetyDataError, match=r"item 'b1': image file .*bomb\.png.* decompression bomb"):
        item_image(item)
