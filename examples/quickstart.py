"""Quick start: LLaVA -> SafeVLM, save, and load back with `trust_remote_code=True`.

Runs offline on a CPU with a tiny randomly initialized LLaVA. For a real model, replace `build_tiny_llava()` with
`"llava-hf/llava-1.5-7b-hf"` in `from_llava(...)` / `from_llava_processor(...)`.

    python examples/quickstart.py [--out quickstart_model]
"""

import argparse

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from safevlm_hf import SafeVLMForConditionalGeneration, SafeVLMProcessor
from safevlm_hf.tiny import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="quickstart_model")
    args = parser.parse_args()

    llava, llava_processor = build_tiny_llava()  # or the path / Hub id of any LLaVA checkpoint
    model = SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=64)
    processor = SafeVLMProcessor.from_llava_processor(llava_processor, num_safety_tokens=64)
    model.save_pretrained(args.out)  # weights (safetensors), config with auto_map, code files, model card
    processor.save_pretrained(args.out)

    # Anyone can now load it without installing safevlm-hf:
    model = AutoModel.from_pretrained(args.out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.out, trust_remote_code=True)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    verdict = model.assess(**inputs)[0]
    print(f"verdict: {verdict.category}, level {verdict.level} -> {verdict.action}")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=30)
    print("answer:", processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    print("(the safety modules are untrained here: train them with `safevlm train --stage 1`, or run `safevlm demo`)")


if __name__ == "__main__":
    main()
