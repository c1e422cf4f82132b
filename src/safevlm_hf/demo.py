"""`safevlm demo`: the whole SafeVLM recipe, offline, on a CPU, in a few minutes.

1. build a tiny LLaVA offline (tokenizer trained with `tokenizers`, CLIP image processor built in code);
2. synthesize a labelled image-text safety dataset (all 6 risk types + safe, all 4 levels; the risk is carried by
   the image in some rows and by the text in others) in the documented JSONL format;
3. convert the LLaVA to SafeVLM, run Stage I (safety modules) and Stage II (LLM, LoRA) with `SafeVLMTrainer`;
4. measure held-out head accuracy, save the checkpoint, reload it with `trust_remote_code=True`, measure gating on
   held-out prompts in both response modes (template: the policy's refusal, forced; guided: the model's own refusal
   after the policy's lead, within its budget) and show a few gated conversations.

Stage II is trained for guided responses (the verdict's hint in context, as in the SafeVLM reference code); the
sexual-content rows carry their sub-category, so the head learns it and the PEGI adult profile relaxes it alone.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import synthetic
from .data import load_safety_json
from .data.examples import NO_SUBCATEGORY, load_image
from .evaluation import evaluate_head
from .modeling.modeling_safevlm import SafeVLMForConditionalGeneration
from .modeling.processing_safevlm import SafeVLMProcessor
from .prompting import encode_prompts
from .tiny import TinyLlavaSpec, build_tiny_llava
from .training import SafeVLMTrainer, SafeVLMTrainingConfig, merge_stage2


@dataclass
class DemoSettings:
    """Sizes and schedule of the demo (defaults: about 2-4 minutes on 2 CPU cores)."""

    out_dir: str = "demo_output"
    seed: int = 0
    train_repeats: int = 10  # rounds of template cells in training (37 rows per round)
    test_repeats: int = 4  # rounds held out (unseen images and slot values)
    num_safety_tokens: int = 16
    text_hidden_size: int = 96
    stage1_epochs: float = 18
    stage1_learning_rate: float = 1e-3
    stage2_epochs: float = 8
    stage2_learning_rate: float = 3e-3
    batch_size: int = 16
    max_new_tokens: int = 64
    show: int = 5  # conversations printed at the end


@dataclass
class DemoResult:
    """What the demo measured (also written to `<out_dir>/summary.json`)."""

    head_type_accuracy: float
    head_level_accuracy: float
    level3_refusal_rate: float
    safe_answer_rate: float
    guided_refusal_rate: float
    guided_reason_rate: float
    subcategory_accuracy: float
    pegi_actions: dict[str, str]
    num_train_rows: int
    num_test_rows: int
    checkpoint: str
    remote_code_class: str
    seconds: float
    conversations: list[dict[str, Any]] = field(default_factory=list)


def _is_refusal(record: dict[str, Any]) -> bool:
    """A refusal verdict whose forced message really is the answer (the message is cut at max_new_tokens)."""
    message, answer = record["verdict"]["message"].strip(), record["answer"].strip()
    return record["verdict"]["action"] == "refuse" and bool(answer) and message.startswith(answer[: len(message)])


# The remote check is a script, not a module of the package: it must run where `safevlm_hf` cannot be imported, so that
# only the code inside the checkpoint runs. It ships as package data (the hyphen in `remote-check.py` makes it
# unimportable) rather than as a string in this file, so that it stays a real file that linters and readers see;
# `importlib.resources` finds it in a wheel, an editable install or a zip (`as_file` extracts it when needed), and
# `python -I` runs it isolated from PYTHONPATH, the user site and the script's own folder.
REMOTE_CHECK_SCRIPT = "scripts/remote-check.py"


def remote_gating(
    checkpoint: Path,
    data: Path,
    levels,
    max_new_tokens: int,
    batch_size: int,
    response: str | None = None,
) -> dict[str, Any]:
    """Run the remote check script on `checkpoint` in a fresh, isolated process where `safevlm_hf` cannot be imported;
    returns its JSON output (`class`: the loaded model class, `records`: verdict and answer per row)."""
    arguments = [str(checkpoint), str(data), "--levels", *map(str, levels)]
    arguments += ["--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch_size)]
    arguments += ["--response", response] if response else []
    with importlib.resources.as_file(importlib.resources.files("safevlm_hf").joinpath(REMOTE_CHECK_SCRIPT)) as script:
        run = subprocess.run([sys.executable, "-I", str(script), *arguments], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"Loading {checkpoint} with trust_remote_code failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _rate(values) -> float:
    values = list(values)
    return sum(bool(v) for v in values) / max(len(values), 1)


def _refusal_lead(policy, record: dict[str, Any]) -> str:
    verdict = record["verdict"]
    return policy.lead("refuse", verdict["category"], verdict["level"], "", None, verdict["subcategory"]).strip()


def _names_reason(policy, record: dict[str, Any]) -> bool:
    verdict = record["verdict"]
    reason = policy.reason(verdict["category"], verdict["subcategory"]).rstrip(".")
    return reason.lower() in record["answer"].lower()


def _assess(model, processor, examples: list[Any]) -> list[Any]:
    """Verdicts for held-out examples (first user turn + image), through the classify-only path."""
    verdicts = []
    for start in range(0, len(examples), 16):
        batch = examples[start : start + 16]
        prompts = [e.messages[0]["content"] for e in batch]
        images = [None if e.image is None else load_image(e.image, e.location) for e in batch]
        verdicts += model.assess(**encode_prompts(processor, prompts, images))
    return verdicts


def _train(model, processor, dataset, args: SafeVLMTrainingConfig):
    trainer = SafeVLMTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    return trainer.model


def run_demo(settings: DemoSettings | None = None) -> DemoResult:
    """Run the whole demo; prints progress and a summary, returns the measured numbers."""
    settings = settings or DemoSettings()
    start = time.time()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    print("[1/6] Synthesizing the labelled image-text safety dataset ...")
    train_path = synthetic.write_jsonl(
        synthetic.make_rows(settings.train_repeats, settings.seed, False), out / "train.jsonl"
    )
    test_path = synthetic.write_jsonl(
        synthetic.make_rows(settings.test_repeats, settings.seed + 1, True), out / "test.jsonl"
    )
    train, test = load_safety_json(train_path), load_safety_json(test_path)
    print(f"      {len(train)} training rows, {len(test)} held-out rows -> {train_path}")

    print("[2/6] Building a tiny LLaVA offline and converting it to SafeVLM ...")
    spec = TinyLlavaSpec(corpus=synthetic.corpus(), text_hidden_size=settings.text_hidden_size, seed=settings.seed)
    llava, llava_processor = build_tiny_llava(spec)
    model = SafeVLMForConditionalGeneration.from_llava(llava, num_safety_tokens=settings.num_safety_tokens)
    processor = SafeVLMProcessor.from_llava_processor(llava_processor, num_safety_tokens=settings.num_safety_tokens)

    common = dict(
        per_device_train_batch_size=settings.batch_size,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=False,
    )
    print("[3/6] Stage I: training the safety projector, safety tokens and safety head (backbone frozen) ...")
    stage1 = SafeVLMTrainingConfig(
        output_dir=str(out / "stage1"),
        stage=1,
        num_train_epochs=settings.stage1_epochs,
        learning_rate=settings.stage1_learning_rate,
        **common,
    )
    model = _train(model, processor, train, stage1)
    head = evaluate_head(model, processor, test.examples, batch_size=settings.batch_size)
    type_accuracy, level_accuracy = head["type"]["accuracy"], head["level"]["accuracy"]
    print(f"      held-out head accuracy: type {type_accuracy:.3f}, level {level_accuracy:.3f}")

    print("[4/6] Stage II: LoRA on the LLM, answers conditioned on the verdict's hint (safety modules frozen) ...")
    stage2 = SafeVLMTrainingConfig(
        output_dir=str(out / "stage2"),
        stage=2,
        stage2_mode="lora",
        stage2_response="guided",
        num_train_epochs=settings.stage2_epochs,
        learning_rate=settings.stage2_learning_rate,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        **common,
    )
    # Every row: in guided mode the LLM writes its refusals and cautions itself, so it must learn all of them.
    model = merge_stage2(_train(model, processor, train, stage2)).eval()
    # The trainers recorded both stages in the config (the model card lists them); add what the demo measured.
    model.config.safety_training_stages[0].setdefault("metrics", {}).update(
        heldout_type_accuracy=round(type_accuracy, 4), heldout_level_accuracy=round(level_accuracy, 4)
    )

    print("[5/6] Saving the checkpoint ...")
    checkpoint = out / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)

    print(
        "[6/6] Reloading it with trust_remote_code=True in a process without safevlm_hf; gated generation on "
        "held-out prompts ..."
    )
    remote = remote_gating(
        checkpoint, test_path, levels=(0, 1, 3), max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size
    )
    remote_class = remote["class"]
    records_level3 = [r for r in remote["records"] if r["label"]["safe_level"] == 3]
    records_safe = [r for r in remote["records"] if r["label"]["safe_level"] == 0]
    records_caution = [r for r in remote["records"] if r["verdict"]["action"] == "caution"]
    refusal_rate = _rate(_is_refusal(r) for r in records_level3)
    answer_rate = _rate(r["verdict"]["action"] != "refuse" for r in records_safe)

    guided = remote_gating(
        checkpoint,
        test_path,
        levels=(3,),
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        response="guided",
    )
    policy = model.safety_policy()
    guided_level3 = [r for r in guided["records"] if r["label"]["safe_level"] == 3]
    guided_refused = [r for r in guided_level3 if r["answer"].startswith(_refusal_lead(policy, r))]
    guided_refusal_rate = len(guided_refused) / max(len(guided_level3), 1)  # a subset's share: no list search per row
    # A guided refusal explains itself: the model's words after the lead name the verdict's reason.
    guided_reason_rate = _rate(_names_reason(policy, r) for r in guided_refused)

    # Sub-category: every held-out "Illegal Risk" row, sexual content or not (a false alarm counts as an error).
    illegal = [e for e in test.examples if e.safe_type == 1]
    predicted = [v.subcategory for v in _assess(model, processor, illegal)]
    expected = [e.safe_subcategory if e.safe_subcategory != NO_SUBCATEGORY else None for e in illegal]
    subcategory_accuracy = _rate(p == e for p, e in zip(predicted, expected))
    pegi_actions = {
        name: policy.action("Illegal Risk", 2, "adult_eu_pegi", subcategory)
        for name, subcategory in (("sexual content", "Illegal Risk/Sexual content"), ("other illegal", None))
    }

    # a few of each: safe images answered, a careful answer, refusals with their reasons
    shown = records_safe[:2] + records_caution[:1] + records_level3[: max(1, settings.show - 3)]
    print("\nGated conversations (checkpoint loaded with trust_remote_code=True, safevlm_hf not importable):")
    for record in shown:
        verdict = record["verdict"]
        print(f"  USER: <image> {record['prompt']}")
        print(f"    verdict: {verdict['category']}, level {verdict['level']} -> {verdict['action']}")
        print(f"  ASSISTANT: {record['answer']}\n")

    result = DemoResult(
        head_type_accuracy=type_accuracy,
        head_level_accuracy=level_accuracy,
        level3_refusal_rate=refusal_rate,
        safe_answer_rate=answer_rate,
        guided_refusal_rate=guided_refusal_rate,
        guided_reason_rate=guided_reason_rate,
        subcategory_accuracy=subcategory_accuracy,
        pegi_actions=pegi_actions,
        num_train_rows=len(train),
        num_test_rows=len(test),
        checkpoint=str(checkpoint),
        remote_code_class=remote_class,
        seconds=time.time() - start,
        conversations=shown + guided_refused[:2],
    )
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=2))
    print("Summary")
    print(f"  held-out safety-head accuracy after Stage I: type {type_accuracy:.3f}, level {level_accuracy:.3f}")
    print(f"  held-out risky level-3 prompts refused:      {refusal_rate:.1%} ({len(records_level3)} prompts)")
    print(f"  held-out safe prompts answered:              {answer_rate:.1%} ({len(records_safe)} prompts)")
    print(f"  guided mode, level-3 prompts refused:        {guided_refusal_rate:.1%} ({len(guided_level3)} prompts)")
    print(f"  guided refusals that state their reason:     {guided_reason_rate:.1%} ({len(guided_refused)} refusals)")
    for record in guided_refused[:2]:
        print(f"    e.g. USER: {record['prompt']}\n         ASSISTANT: {record['answer']}")
    print(f"  held-out illegal-risk prompts, sub-category: {subcategory_accuracy:.1%} right ({len(illegal)} prompts)")
    print(f"  adult_eu_pegi at level 2: {pegi_actions}")
    print(f"  checkpoint: {checkpoint} (reloaded as {remote_class})")
    print(f"  total time: {result.seconds:.0f} s")
    return result


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `demo` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="Run the offline end-to-end demo (tiny model, synthetic data, Stage I + II, gated chat).",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", default="demo_output", help="Output folder (data, checkpoint, summary.json).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default: 0).")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    run_demo(DemoSettings(out_dir=args.out, seed=args.seed))
    return 0


__all__ = ["DemoResult", "DemoSettings", "register", "run", "run_demo"]
