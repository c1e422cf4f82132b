"""Remote-code and pipeline paths gate exactly like the installed model."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import pipeline

from safevlm_hf import SafeVLMForConditionalGeneration, SafeVLMProcessor

from conftest import REMOTE_LOAD_AND_ENCODE, make_image


PROMPTS = ["What is in this picture?", "Tell me about the person in this photo and where they live."]
POLICY = {
    "levels": {"0": "refuse", "1": "caution", "2": "refuse", "3": "refuse"},
    "profiles": {"lenient": {"levels": {"0": "caution", "2": "caution"}}},
    "messages": {"refuse": {"default": "Refused ({category}, level {level})."}},
}
CASES = [  # (generate kwargs, decoded as JSON for the subprocess)
    {"max_new_tokens": 12},
    {"max_new_tokens": 12, "safety_policy": POLICY},
    {"max_new_tokens": 12, "safety_policy": POLICY, "safety_profile": "lenient"},
    {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "safety_policy": POLICY},
    {"max_new_tokens": 12, "safety_profile": "minor"},
]

REMOTE_SCRIPT = (
    textwrap.dedent(
        """
    import json, sys
    sys.modules["safevlm_hf"] = None
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    path, prompts, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    """
    )
    + REMOTE_LOAD_AND_ENCODE
    + textwrap.dedent(
        """
    out = {"generate": [], "pipeline": []}
    for kwargs in cases:
        out["generate"].append(model.generate(**inputs, **kwargs).tolist())
    pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)
    for profile in (None, "minor"):
        messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": prompts[0]}]}]
        result = pipe(text=messages, max_new_tokens=30, return_full_text=False,
                      generate_kwargs={"safety_profile": profile} if profile else {})
        out["pipeline"].append(result[0]["generated_text"])
    print(json.dumps(out))
    """
    )
)


def _installed_outputs(path):
    model = SafeVLMForConditionalGeneration.from_pretrained(path).eval()
    processor = SafeVLMProcessor.from_pretrained(path)
    images = [make_image(0), make_image(1)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in PROMPTS
    ]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    generated = [model.generate(**inputs, **kwargs).tolist() for kwargs in CASES]
    # the installed package, model passed as an object (the other drop-in path)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    piped = []
    for profile in (None, "minor"):
        messages = [
            {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": PROMPTS[0]}]}
        ]
        result = pipe(
            text=messages,
            max_new_tokens=30,
            return_full_text=False,
            generate_kwargs={"safety_profile": profile} if profile else {},
        )
        piped.append(result[0]["generated_text"])
    verdict = model.assess(**inputs)[0]
    return generated, piped, verdict


@pytest.fixture(scope="module")
def level_0_checkpoint(_tiny_safevlm_pair, tmp_path_factory):
    """A checkpoint whose head gives level 0: POLICY refuses it, its "lenient" profile cautions it."""
    model, processor = _tiny_safevlm_pair
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.safety_head.level_classifier.weight.zero_()
        model.model.safety_head.level_classifier.bias.copy_(torch.tensor([10.0, -10.0, -10.0, -10.0]))
    path = tmp_path_factory.mktemp("level0")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_remote_code_and_pipelines_gate_identically(level_0_checkpoint, tmp_path):
    saved_safevlm = level_0_checkpoint
    generated, piped, verdict = _installed_outputs(saved_safevlm)
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(saved_safevlm), json.dumps(PROMPTS), json.dumps(CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = json.loads(run.stdout.strip().splitlines()[-1])
    assert remote["generate"] == generated
    assert remote["pipeline"] == piped
    # the pipeline really is gated: its answer is the forced message of the row's verdict (or starts with it)
    if verdict.action != "answer":
        assert piped[0].strip().startswith(verdict.message[:15])
    # and the policy/profile reached generate through both paths
    assert generated[1] != generated[2]
    assert torch.tensor(generated[0]).shape[0] == 2
