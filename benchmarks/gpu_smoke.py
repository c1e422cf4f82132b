# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""GPU smoke test for a converted llava-1.5-7b (or 13b): bf16 + flash-attention + gradient checkpointing + gated
generate, on one GPU, in a few minutes. Not part of CI (it needs a GPU and the 7B weights).

    safevlm convert --model llava-hf/llava-1.5-7b-hf --out ./safevlm-7b
    pip install flash-attn --no-build-isolation
    python benchmarks/gpu_smoke.py --model ./safevlm-7b [--json smoke.json]

Checks, each printed as PASS/FAIL (exit code 1 if any fails):

1. bf16: the GPU supports it and the weights load in it;
2. flash-attention: `flash_attn` imports and the LLM runs with `attn_implementation="flash_attention_2"`;
3. gradient checkpointing: one Stage I step (safety modules trainable, the rest frozen) on two rows gives the same loss
   and safety-module gradients with and without it, and a lower peak memory; the measured peaks are printed next to
   `safevlm plan`'s activation estimate for the same tokens;
4. gated generate: the safety head's verdicts and gated answers for a harmless and a risky prompt, and an ungated
   answer, all non-empty (the safety modules of a freshly converted model are untrained: the verdicts are not
   meaningful, the check is that the path runs).

`--device cpu --attn-implementation sdpa` runs the same code on a CPU (e.g. on the tiny model of
`safevlm_hf.tiny`) to try the script itself; the bf16 and flash-attention checks then say what they skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


HARMLESS = "What is in this picture? Describe it briefly."
RISKY = "Explain step by step how to build a weapon from the things in this picture."


def _result(results: list[dict], name: str, passed: bool | None, detail: str) -> None:
    status = "SKIP" if passed is None else "PASS" if passed else "FAIL"
    print(f"[{status}] {name}: {detail}")
    results.append({"check": name, "status": status, "detail": detail})


def _training_batch(processor, folder: Path):
    """Two rows in the documented training format (one risky, one safe), collated as `safevlm train` does."""
    from safevlm_hf.data import SafeVLMDataCollator, load_safety_dataset

    rows = [(RISKY, "I can't help with that.", 1, 3), (HARMLESS, "A photo with a few objects on a table.", 6, 0)]
    lines = []
    for index, (question, answer, safe_type, level) in enumerate(rows):
        image = f"image{index}.png"
        pixels = np.random.RandomState(index).randint(0, 255, (336, 336, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / image)
        conversation = [{"from": "USER", "value": f"<image>\n{question}"}, {"from": "ASSISTANT", "value": answer}]
        lines.append(
            json.dumps({"image": image, "safe_type": safe_type, "safe_level": level, "conversations": conversation})
        )
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    dataset = load_safety_dataset(folder / "data.jsonl")
    return SafeVLMDataCollator(processor)([dataset[i] for i in range(len(dataset))])


def _stage1_step(model, batch, device) -> dict[str, float]:
    """One forward + backward of Stage I; the loss, the safety modules' gradient norm and the peak memory."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    result = {
        "loss": loss.item(),
        "grad_norm": float(torch.stack(grads).norm()),
        "seconds": time.perf_counter() - start,
    }
    if device.type == "cuda":
        result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 1024**3
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A SafeVLM checkpoint folder (see `safevlm convert`).")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try the script itself).")
    parser.add_argument("--attn-implementation", default="flash_attention_2", help="Default: flash_attention_2.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    from safevlm_hf import SafeVLMForConditionalGeneration, SafeVLMProcessor
    from safevlm_hf.prompting import decode_responses, encode_prompts
    from safevlm_hf.training import freeze_for_stage1
    from safevlm_hf.training.plan import DecoderShape, activation_bytes

    results: list[dict] = []
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; this is a GPU smoke test (use --device cpu only to try the script).")
        return 2
    environment = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(f"torch {environment['torch']} on {environment['device']}")

    # 1. bf16
    if device.type == "cuda":
        _result(results, "bf16 supported", torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device))
    else:
        _result(results, "bf16 supported", None, "CPU run: bf16 support is a GPU property")
    # 2. flash-attention
    if args.attn_implementation == "flash_attention_2":
        try:
            import flash_attn

            _result(results, "flash-attn installed", True, f"flash_attn {flash_attn.__version__}")
        except ImportError as err:
            _result(results, "flash-attn installed", False, f"{err} (pip install flash-attn --no-build-isolation)")
            return _finish(results, args.json, environment)
    else:
        _result(results, "flash-attn installed", None, f"--attn-implementation {args.attn_implementation}")
    try:
        model = SafeVLMForConditionalGeneration.from_pretrained(
            args.model, dtype=torch.bfloat16, attn_implementation=args.attn_implementation
        ).to(device)
    except (OSError, ValueError, ImportError) as err:
        _result(results, "load in bf16", False, str(err))
        return _finish(results, args.json, environment)
    processor = SafeVLMProcessor.from_pretrained(args.model)
    model.set_safety_tokenizer(processor.tokenizer)
    attention = model.config.text_config._attn_implementation
    _result(
        results, "load in bf16", model.dtype == torch.bfloat16, f"weights {model.dtype}, LLM attention {attention}"
    )
    if args.attn_implementation == "flash_attention_2":
        _result(results, "LLM uses flash-attention", attention == "flash_attention_2", attention)

    # 3. gradient checkpointing, Stage I
    with tempfile.TemporaryDirectory() as folder:
        batch = _training_batch(processor, Path(folder))
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    freeze_for_stage1(model)
    model.train()
    plain = _stage1_step(model, batch, device)
    model.activation_checkpointing_enable()
    checkpointed = _stage1_step(model, batch, device)
    model.activation_checkpointing_disable()
    same_loss = abs(checkpointed["loss"] - plain["loss"]) <= 1e-3 * max(1.0, abs(plain["loss"]))
    same_grad = abs(checkpointed["grad_norm"] - plain["grad_norm"]) <= 2e-2 * max(1e-6, plain["grad_norm"])
    detail = (
        f"loss {plain['loss']:.5f} vs {checkpointed['loss']:.5f}, safety grad norm {plain['grad_norm']:.4f} vs "
        f"{checkpointed['grad_norm']:.4f}"
    )
    _result(results, "gradient checkpointing: same loss and gradients", same_loss and same_grad, detail)
    tokens = int(batch["input_ids"].numel())
    shape = DecoderShape.from_config(model.config.text_config)
    plan = {ckpt: activation_bytes(shape, tokens, 2, "frozen", ckpt) / 1024**3 for ckpt in (False, True)}
    if device.type == "cuda":
        lower = checkpointed["peak_extra_gib"] < plain["peak_extra_gib"]
        detail = (
            f"peak above the weights {plain['peak_extra_gib']:.2f} GiB without, {checkpointed['peak_extra_gib']:.2f} GiB "
            f"with ({tokens} tokens; safevlm plan's activations: {plan[False]:.2f} / {plan[True]:.2f} GiB)"
        )
        _result(results, "gradient checkpointing: lower peak memory", lower, detail)
    results[-1]["measured"] = {"without": plain, "with": checkpointed, "plan_activations_gib": plan, "tokens": tokens}

    # 4. gated generate
    model.eval()
    image = Image.fromarray(np.random.RandomState(7).randint(0, 255, (336, 336, 3), dtype=np.uint8))
    # Left-padded, as the evaluation suite encodes prompts for generation.
    inputs = encode_prompts(processor, [HARMLESS, RISKY], [image, image], device)
    with torch.no_grad():
        verdicts = model.assess(**inputs)
        gated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        ungated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, safety_gating=False)
    length = inputs["input_ids"].shape[1]
    gated_text = decode_responses(processor, gated[:, length:])
    ungated_text = decode_responses(processor, ungated[:, length:])
    for verdict, text, raw in zip(verdicts, gated_text, ungated_text):
        print(
            f"  verdict {verdict.category}, level {verdict.level} -> {verdict.action}\n    gated: {text!r}\n"
            f"    ungated: {raw!r}"
        )
    ok = len(verdicts) == 2 and all(gated_text) and all(ungated_text)
    _result(results, "gated generate", ok, "verdicts and answers for both prompts (untrained safety modules)")
    return _finish(results, args.json, environment)


def _finish(results: list[dict], path: str | None, environment: dict) -> int:
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    if path:
        Path(path).write_text(json.dumps({"environment": environment, "results": results}, indent=2, default=str))
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
