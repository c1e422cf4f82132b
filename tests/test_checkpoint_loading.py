"""Save -> load, installed and through trust_remote_code in a process where safevlm_hf cannot be imported."""

import json
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from safevlm_hf import SafeVLMConfig, SafeVLMForConditionalGeneration, SafeVLMProcessor

from conftest import chat_prompt, make_image


REMOTE_FILES = {
    "configuration_safevlm.py",
    "modeling_safevlm.py",
    "processing_safevlm.py",
    "policy_safevlm.py",
    "gating_safevlm.py",
}


def _reference(model, processor):
    inputs = processor(
        images=[make_image(1)], text=[chat_prompt(processor, "What is in the image?")], return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**inputs)
    return inputs, out


def test_saved_folder_carries_code_weights_and_full_auto_map(saved_safevlm):
    files = {p.name for p in saved_safevlm.iterdir()}
    assert REMOTE_FILES <= files
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    auto_map = json.loads((saved_safevlm / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_safevlm.SafeVLMConfig",
        "AutoModel": "modeling_safevlm.SafeVLMForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_safevlm.SafeVLMForConditionalGeneration",
        "AutoProcessor": "processing_safevlm.SafeVLMProcessor",
    }
    processor_config = json.loads((saved_safevlm / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_safevlm.SafeVLMProcessor"}
    assert processor_config["num_safety_tokens"] == 4


def test_installed_auto_classes_load_identically(_tiny_safevlm_pair, saved_safevlm):
    model, processor = _tiny_safevlm_pair
    inputs, ref = _reference(model, processor)
    assert type(AutoConfig.from_pretrained(saved_safevlm)) is SafeVLMConfig
    loaded_processor = AutoProcessor.from_pretrained(saved_safevlm)
    assert type(loaded_processor) is SafeVLMProcessor and loaded_processor.num_safety_tokens == 4
    for auto in (AutoModel, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(saved_safevlm).eval()
        assert type(loaded) is SafeVLMForConditionalGeneration
        with torch.no_grad():
            out = loaded(
                **loaded_processor(
                    images=[make_image(1)],
                    text=[chat_prompt(loaded_processor, "What is in the image?")],
                    return_tensors="pt",
                )
            )
        # Same weights (bit-identical, see test_resave...); CPU kernels may round differently on other buffers.
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.safety_type_logits, ref.safety_type_logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.safety_level_logits, ref.safety_level_logits, atol=1e-6, rtol=1e-5)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["safevlm_hf"] = None  # the package must not be importable in this process
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
    path, out_path = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (40, 40, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    results = {"processor": type(processor).__name__, "input_ids": inputs["input_ids"]}
    for name, auto in (("AutoModel", AutoModel), ("AutoModelForImageTextToText", AutoModelForImageTextToText)):
        model = auto.from_pretrained(path, trust_remote_code=True).eval()
        assert "safevlm_hf" not in type(model).__module__, type(model).__module__
        with torch.no_grad():
            out = model(**inputs)
        results[name] = (out.logits, out.safety_type_logits, out.safety_level_logits, type(model).__module__)
    torch.save(results, out_path)
    """
)


def test_remote_code_load_without_the_package(_tiny_safevlm_pair, saved_safevlm, tmp_path):
    model, processor = _tiny_safevlm_pair
    inputs, ref = _reference(model, processor)
    out_path = tmp_path / "remote.pt"
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(saved_safevlm), str(out_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(out_path)
    assert results["processor"] == "SafeVLMProcessor"
    assert torch.equal(results["input_ids"], inputs["input_ids"])
    for name in ("AutoModel", "AutoModelForImageTextToText"):
        logits, type_logits, level_logits, module = results[name]
        assert module.startswith("transformers_modules.")
        # A separate process may pick other CPU kernels: equal up to float rounding.
        torch.testing.assert_close(logits, ref.logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(type_logits, ref.safety_type_logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(level_logits, ref.safety_level_logits, atol=1e-6, rtol=1e-5)


def test_resave_of_a_loaded_checkpoint_keeps_it_loadable(saved_safevlm, tmp_path):
    model = AutoModel.from_pretrained(saved_safevlm).eval()
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert REMOTE_FILES - {"processing_safevlm.py"} <= {p.name for p in tmp_path.iterdir()}
