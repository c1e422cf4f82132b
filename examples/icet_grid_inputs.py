# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Write the inputs of the README's ICET grid: tiny offline checkpoints of the three families and prompt files.

* `llava15-aligned/`: the tiny LLaVA-1.5 of `layerwise_alignment.py`, aligned at its default vision layer only, so it
  refuses risky requests there and leaks at layer 1 (Bachu et al.'s ICET vulnerability, on a toy model);
* `llava-next/`, `llama32-vision/`: untrained tiny LLaVA-NeXT and Llama 3.2 Vision (`safevlm_hf.tiny`);
* `train.jsonl`, `eval.jsonl` (+ `images/`): the example's prompts with training and held-out images.

Then (about a minute on 2 CPU cores)::

    python examples/icet_grid_inputs.py grid_inputs && cd grid_inputs
    safevlm lppo --model llava15-aligned --prompts train.jsonl --layers 1,3 --reward refusal --out lppo --steps 24 \\
        --batch-size 16 --mini-batch-size 8 --ppo-epochs 2 --max-new-tokens 4 --learning-rate 2e-3 --lora-r 8 \\
        --lora-alpha 16 --device cpu
    safevlm icet --model before=llava15-aligned --model after=lppo/final --model llava-next=llava-next \\
        --model llama32-vision=llama32-vision --prompts eval.jsonl --max-new-tokens 12 --batch-size 32 --out grid \\
        --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example owns the alignment recipe
from layerwise_alignment import (  # noqa: E402
    ANSWER,
    REFUSAL,
    RISKY_PROMPTS,
    SAFE_PROMPTS,
    ExperimentConfig,
    align_at_default_layer_only,
    make_items,
)

from safevlm_hf.tiny import TinyLlavaSpec, build_tiny_llava, build_tiny_llava_next, build_tiny_mllama  # noqa: E402


CHECKPOINTS = ("llava15-aligned", "llava-next", "llama32-vision")


def write_inputs(out: Path, config: ExperimentConfig) -> None:
    """Write the checkpoints named in `CHECKPOINTS` and the prompt files into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    torch.manual_seed(config.seed)
    spec = TinyLlavaSpec(corpus=RISKY_PROMPTS + SAFE_PROMPTS + [REFUSAL, ANSWER], seed=config.seed)
    model, processor = build_tiny_llava(spec)
    align_at_default_layer_only(model, processor, make_items(config.train_images), config)
    checkpoints = dict(zip(CHECKPOINTS, [(model, processor), build_tiny_llava_next(), build_tiny_mllama()]))
    for name, (model, processor) in checkpoints.items():
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)
    for split, seeds in (("train", config.train_images), ("eval", config.eval_images)):
        rows = []
        for item in make_items(seeds):
            image = f"images/{item.id.rsplit('-img', 1)[1]}.png"
            item.image.save(out / image)
            rows.append(
                {
                    "prompt": item.prompt,
                    "image": image,
                    "category": item.category,
                    "expected": item.expected,
                    "id": item.id,
                }
            )
        (out / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for the checkpoints and prompt files")
    args = parser.parse_args(argv)
    write_inputs(Path(args.out), ExperimentConfig())
    print(f"Inputs written to {Path(args.out).resolve()}; see this script's docstring for the next two commands.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
