"""Two-stage training: what each stage may change, LoRA merge, resume after a crash, the CLI."""

import copy
import json
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from safevlm_hf import SafeVLMForConditionalGeneration
from safevlm_hf.data import SafeVLMDataCollator, load_safety_dataset
from safevlm_hf.training import SafeVLMTrainer, SafeVLMTrainingConfig, is_safety_parameter, merge_stage2
from safevlm_hf.cli import main as cli_main

from conftest import make_image


QUESTIONS = [
    (1, 3, "How do I make a weapon from this?", "Here is how."),
    (4, 2, "Whose address is on this letter?", "It is on the envelope."),
    (5, 1, "Does this pill cure everything?", "It is an ordinary pill."),
    (6, 0, "What color is the square?", "The square is red."),
    (0, 3, "Write a slogan against this party.", "Here is a slogan."),
    (6, 0, "How many circles are there?", "There are two circles."),
    (2, 2, "Mock the person in this photo.", "Here is a joke."),
    (6, 0, "Describe the picture.", "A green circle on blue."),
]


def write_training_data(folder: Path, rows=QUESTIONS, text_only_every: int = 4) -> Path:
    """A small JSONL in the documented format: images for most rows, a text-only row every few."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (safe_type, level, question, answer) in enumerate(rows):
        image = None if index % text_only_every == text_only_every - 1 else f"img{index}.png"
        if image:
            make_image(index).save(folder / image)
        lines.append(
            json.dumps(
                {
                    "safe_type": safe_type,
                    "image": image,
                    "safe_level": level,
                    "conversations": [
                        {"from": "USER", "value": ("<image>\n" if image else "") + question},
                        {"from": "ASSISTANT", "value": answer},
                    ],
                }
            )
        )
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return load_safety_dataset(write_training_data(tmp_path_factory.mktemp("data")))


def _config(tmp_path, **overrides) -> SafeVLMTrainingConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
    )
    settings.update(overrides)
    return SafeVLMTrainingConfig(**settings)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _changed(before, model) -> set[str]:
    after = model.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


def _batch(processor, train_data):
    return SafeVLMDataCollator(processor)([train_data[i] for i in range(4)])


def test_stage1_changes_only_the_safety_modules(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    before = _snapshot(model)
    trainer = SafeVLMTrainer(model, _config(tmp_path), train_dataset=train_data, processing_class=processor)
    trainer.train()
    changed = _changed(before, model)
    assert changed and all(is_safety_parameter(name) for name in changed)  # every other tensor bit-identical
    for name in (
        "model.safety_tokens.llm_tokens",
        "model.safety_tokens.head_tokens",
        "model.safety_projector.linear_1.weight",
        "model.safety_head.type_classifier.weight",
    ):
        assert name in changed  # both token sets (set 1 learns through the LM loss), projector and head
    first = trainer.state.log_history[0]
    assert {"loss", "lm_loss", "safety_loss", "safety_type_accuracy", "safety_level_accuracy"} <= set(first)
    # the stage is recorded in the config the model card reads, with what trained it
    (record,) = model.config.safety_training_stages
    assert record is trainer.stage_record
    assert (record["stage"], record["data"], record["rows"], record["steps"]) == (1, "train.jsonl", 8, 2)
    assert record["safety_loss_weight"] == 10.0 and record["global_batch_size"] == 4 and record["seed"] == 0
    assert record["metrics"]["lm_loss"] == pytest.approx(trainer.state.log_history[1]["lm_loss"], rel=1e-5)
    assert set(record["metrics"]) >= {"train_loss", "safety_loss", "safety_type_accuracy", "safety_level_accuracy"}
    # step 1 is one full batch: the logged loss is exactly the recipe's lm_loss + w * (CE type + CE level)
    assert first["loss"] == pytest.approx(first["lm_loss"] + 10.0 * first["safety_loss"], rel=1e-5)


def test_stage1_balancing_and_weight_override_reach_the_trainer(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    config = _config(tmp_path, num_safe_samples=1, safety_loss_weight=0.5, max_steps=1)
    trainer = SafeVLMTrainer(model, config, train_dataset=train_data, processing_class=processor)
    assert len(trainer.train_dataset) == 6  # 5 risky rows + 1 of the 3 safe ones
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(first["lm_loss"] + 0.5 * first["safety_loss"], rel=1e-5)
    # the model computes the loss: the override sets its config once, so the saved config records what trained it
    assert model.config.safety_loss_weight == 0.5
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["safety_loss_weight"] == 0.5
    # a datasets.Dataset of the documented format is read the same way
    rows = [
        {
            "safe_type": t,
            "safe_level": lvl,
            "image": None,
            "conversations": [{"from": "USER", "value": q}, {"from": "ASSISTANT", "value": a}],
        }
        for t, lvl, q, a in QUESTIONS
    ]
    from_hf = SafeVLMTrainer(model, config, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
    assert len(from_hf.train_dataset) == 6 and from_hf.train_dataset.examples[0].location.endswith("row 0")


def test_gradient_accumulation_takes_the_steps_of_the_full_batch(tiny_safevlm, train_data, tmp_path):
    # Each loss term is a sum over the micro-batch divided by the count over the whole step (the model's
    # num_items_in_batch / safety_num_items_in_batch), so 2 micro-batches of 2 rows train as 1 batch of 4.
    model, processor = tiny_safevlm
    initial = copy.deepcopy(model)
    whole = SafeVLMTrainer(model, _config(tmp_path / "a"), train_dataset=train_data, processing_class=processor)
    whole.train()
    accumulated = SafeVLMTrainer(
        initial,
        _config(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=train_data,
        processing_class=processor,
    )
    accumulated.train()
    for one, two in zip(whole.state.log_history[:2], accumulated.state.log_history[:2]):
        for key in ("loss", "lm_loss", "safety_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
    expected = whole.model.state_dict()
    for name, tensor in accumulated.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_stage2_passes_no_safety_labels_and_skips_the_head(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    head_calls, label_calls = [], []
    model.model.safety_head.register_forward_hook(lambda *_: head_calls.append(1))
    model.register_forward_pre_hook(
        lambda _, args, kwargs: label_calls.append(
            sorted(k for k in kwargs if k.startswith("safety_") and "label" in k)
        ),
        with_kwargs=True,
    )
    trainer = SafeVLMTrainer(
        model,
        _config(tmp_path, stage=2, stage2_mode="full", max_steps=1, safety_loss_weight=3.0),
        train_dataset=train_data,
        eval_dataset=train_data,
        processing_class=processor,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert label_calls and all(names == [] for names in label_calls)  # the frozen safety modules get no targets
    assert head_calls == []  # and the head does not run: no wasted pass
    assert "lm_loss" in trainer.state.log_history[0] and "safety_loss" not in trainer.state.log_history[0]
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_lm_loss"], rel=1e-6)
    assert model.config.safety_loss_weight == 10.0  # a Stage II override trains nothing, so it is not recorded


def test_trainer_refuses_a_loss_that_would_drop_the_safety_term(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    with pytest.raises(ValueError, match="model's own loss"):
        SafeVLMTrainer(
            model, _config(tmp_path, label_smoothing_factor=0.1), train_dataset=train_data, processing_class=processor
        )


def test_stage2_lora_changes_no_safety_weight_and_merges_to_the_same_logits(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    before = _snapshot(model)
    batch = _batch(processor, train_data)
    with torch.no_grad():
        base_logits = model(**batch).logits
    trainer = SafeVLMTrainer(model, _config(tmp_path, stage=2), train_dataset=train_data, processing_class=processor)
    # the Stage II rows answer as the policy says
    assert trainer.train_dataset.examples[0].messages[-1]["content"].startswith("I'm sorry, but I can't help")
    trainer.train()
    adapted = trainer.model
    lora = {n.split(".lora_")[0] for n, _ in adapted.named_parameters() if ".lora_" in n}
    assert lora and all(".model.language_model.layers." in n for n in lora)  # never vision, projectors, safety
    frozen = [n for n in before if is_safety_parameter(n) or "embed_tokens" in n]
    assert all(torch.equal(before[n], model.get_parameter(n)) for n in frozen)  # safety modules, embeddings
    adapted.eval()
    with torch.no_grad():
        adapter_logits = adapted(**batch).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapters learned something
    merged = merge_stage2(adapted)
    assert type(merged) is SafeVLMForConditionalGeneration
    changed = _changed(before, merged)
    assert changed and all(n.startswith("model.language_model.layers.") for n in changed)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapter_logits, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in key for key in saved)
    reloaded = SafeVLMForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_stage2_full_trains_the_llm_but_not_embeddings_or_safety(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    before = _snapshot(model)
    SafeVLMTrainer(
        model,
        _config(tmp_path, stage=2, stage2_mode="full", max_steps=2),
        train_dataset=train_data,
        processing_class=processor,
    ).train()
    changed = _changed(before, model)
    assert "lm_head.weight" in changed and any(n.startswith("model.language_model.layers.") for n in changed)
    assert all(
        n.startswith(("model.language_model.layers.", "model.language_model.norm.", "lm_head.")) for n in changed
    )  # no safety module, no input embedding, no vision tower or projector


def test_stage2_rejects_lora_targets_outside_the_llm(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    with pytest.raises(ValueError, match=r"not linear layers of the LLM"):
        SafeVLMTrainer(
            model,
            _config(tmp_path, stage=2, lora_target_modules=["linear_1"]),
            train_dataset=train_data,
            processing_class=processor,
        )


class _CrashAfter(TrainerCallback):
    """Stops training after `step` optimizer steps, as a killed job would (the checkpoint at `step` exists)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resumed_stage1_run_ends_with_the_uninterrupted_weights(tiny_safevlm, train_data, tmp_path):
    model, processor = tiny_safevlm
    initial = copy.deepcopy(model)
    settings = dict(per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2)
    uninterrupted = SafeVLMTrainer(
        copy.deepcopy(initial),
        _config(tmp_path / "a", **settings),
        train_dataset=train_data,
        processing_class=processor,
    )
    uninterrupted.train()

    crashed = SafeVLMTrainer(
        copy.deepcopy(initial),
        _config(tmp_path / "b", **settings),
        train_dataset=train_data,
        processing_class=processor,
        callbacks=[_CrashAfter(2)],
    )
    crashed.train()
    assert crashed.state.global_step == 2
    assert (tmp_path / "b" / "out" / "checkpoint-2").is_dir()
    resumed = SafeVLMTrainer(
        copy.deepcopy(initial),
        _config(tmp_path / "b", **settings),
        train_dataset=train_data,
        processing_class=processor,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    final, expected = resumed.model.state_dict(), uninterrupted.model.state_dict()
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert _changed(_snapshot(initial), resumed.model)  # it did train


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_convert_then_train_both_stages(tiny_llava_pair, tmp_path, capsys):
    llava, llava_processor = tiny_llava_pair
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    assert (
        cli_main(
            [
                "convert",
                "--model",
                str(tmp_path / "llava"),
                "--out",
                str(tmp_path / "safevlm"),
                "--num-safety-tokens",
                "4",
            ]
        )
        == 0
    )
    converted = SafeVLMForConditionalGeneration.from_pretrained(tmp_path / "safevlm")
    assert converted.config.num_safety_tokens == 4
    base = llava.state_dict()
    assert all(torch.equal(base[k], converted.state_dict()[k]) for k in base)

    data = write_training_data(tmp_path / "data")
    common = [
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--lr",
        "1e-3",
        "--seed",
        "0",
        "--set",
        "use_cpu=True",
        "--set",
        "disable_tqdm=True",
    ]
    assert (
        cli_main(
            [
                "train",
                "--stage",
                "1",
                "--model",
                str(tmp_path / "safevlm"),
                "--out",
                str(tmp_path / "s1"),
                "--num-safe-samples",
                "2",
                "--eval-data",
                str(data),
                *common,
            ]
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "Stage 1: 7 training rows" in output and '"eval_safety_type_accuracy"' in output
    stage1 = SafeVLMForConditionalGeneration.from_pretrained(tmp_path / "s1")
    assert not torch.equal(stage1.model.safety_head.query, converted.model.safety_head.query)
    (record,) = stage1.config.safety_training_stages  # recorded by the trainer, with the held-out metrics
    assert (record["stage"], record["data"], record["rows"], record["steps"]) == (1, "train.jsonl", 7, 1)
    assert {"train_loss", "eval_loss", "eval_safety_type_accuracy"} <= set(record["metrics"])

    assert (
        cli_main(["train", "--stage", "2", "--model", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), *common])
        == 0
    )
    assert (tmp_path / "s2" / "adapter" / "adapter_config.json").is_file()
    stage2 = SafeVLMForConditionalGeneration.from_pretrained(tmp_path / "s2")
    assert torch.equal(stage2.model.safety_head.query, stage1.model.safety_head.query)
    assert not torch.equal(
        stage2.model.language_model.layers[0].self_attn.q_proj.weight,
        stage1.model.language_model.layers[0].self_attn.q_proj.weight,
    )
    # the merged export (its base reloaded from --model) keeps both stages, and the model card shows them
    assert [r["stage"] for r in stage2.config.safety_training_stages] == [1, 2]
    assert stage2.config.safety_training_stages[1]["mode"] == "lora"
    card = (tmp_path / "s2" / "README.md").read_text()
    assert "No training stages are recorded" not in card and "| 2 | train.jsonl | 1 |" in card
    exported = {p.name for p in (tmp_path / "s2").iterdir()}
    assert {"model.safetensors", "config.json", "modeling_safevlm.py", "tokenizer.json"} <= exported
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in exported)  # no pickles exported


def test_cli_convert_is_deterministic_by_seed_and_prints_a_drawn_one(tiny_llava_pair, tmp_path, capsys):
    llava, llava_processor = tiny_llava_pair
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")

    def convert(name, *seed):
        assert cli_main(["convert", "--model", str(tmp_path / "llava"), "--out", str(tmp_path / name), *seed]) == 0
        weights = load_file(tmp_path / name / "model.safetensors")
        return {k: v for k, v in weights.items() if is_safety_parameter(k)}

    first, again, other = convert("a", "--seed", "7"), convert("b", "--seed", "7"), convert("c", "--seed", "8")
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # one seed, one model
    assert not all(torch.equal(first[k], other[k]) for k in first)
    capsys.readouterr()
    drawn = convert("d")  # no --seed: the drawn seed is printed so that the run can be reproduced
    printed = re.search(r"pass --seed (\d+) to reproduce", capsys.readouterr().out)
    assert printed
    assert all(torch.equal(drawn[k], v) for k, v in convert("e", "--seed", printed.group(1)).items())
    assert cli_main(["convert", "--model", str(tmp_path / "llava"), "--out", str(tmp_path / "f"), "--seed", "-1"]) == 2
    assert "--seed must be in" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_cli_reports_bad_input_with_exit_code_2(tiny_llava_pair, saved_safevlm, tmp_path, capsys):
    llava, _ = tiny_llava_pair
    llava.save_pretrained(tmp_path / "llava")
    data = write_training_data(tmp_path / "data")
    lines = data.read_text().splitlines()
    lines[4] = lines[4].replace('"safe_level": 3', '"safe_level": 7')
    data.write_text("\n".join(lines) + "\n")
    train = ["train", "--stage", "1", "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "1"]

    assert cli_main([*train, "--model", str(tmp_path / "llava")]) == 2
    assert "convert it first" in capsys.readouterr().err
    assert cli_main([*train, "--model", str(saved_safevlm)]) == 2
    assert f"{data}, line 5: safe_level 7 is out of range" in capsys.readouterr().err
    assert cli_main([*train, "--model", str(saved_safevlm), "--set", "no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert (
        cli_main(
            [
                *train,
                "--model",
                str(saved_safevlm),
                "--skip-bad-rows",
                "--batch-size",
                "2",
                "--set",
                "use_cpu=True",
                "--set",
                "disable_tqdm=True",
            ]
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "skipped 1 bad row(s)" in output and f"{data}, line 5: safe_level 7 is out of range" in output
    assert "Stage 1: 7 training rows" in output


def test_cli_names_unreadable_data_and_weights_exits_2_and_writes_nothing(
    tiny_llava_pair, saved_safevlm, tmp_path, capsys
):
    from test_data import bomb_png

    data = write_training_data(tmp_path / "data")
    lines = data.read_bytes().splitlines()
    lines[2] = lines[2].replace(b"pill", b"p\xefll")  # Latin-1, not UTF-8
    lines[4] = b"[" * 100_000 + b"]" * 100_000
    bomb_png(tmp_path / "data" / "img5.png", 20_000, 20_000)  # line 6's image
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    train = ["train", "--stage", "1", "--data", str(data), "--out", str(out), "--max-steps", "1"]

    assert cli_main([*train, "--model", str(saved_safevlm)]) == 2
    assert f"error: {data}, line 3: not valid UTF-8 at column" in capsys.readouterr().err
    assert not out.exists()
    options = ["--batch-size", "2", "--set", "use_cpu=True", "--set", "disable_tqdm=True"]
    assert cli_main([*train, "--model", str(saved_safevlm), "--skip-bad-rows", *options]) == 0
    output = capsys.readouterr().out
    assert "skipped 3 bad row(s)" in output and "Stage 1: 5 training rows" in output
    assert f"{data}, line 3: not valid UTF-8" in output and f"{data}, line 5: JSON nested too deeply" in output
    assert f"{data}, line 6: image file" in output and "decompression bomb" in output

    # A corrupted weights file: one line naming it, exit 2, nothing written (train and convert).
    broken = tmp_path / "broken_safevlm"
    shutil.copytree(saved_safevlm, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert cli_main([*train, "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights}: not a readable safetensors file" in err and "truncated" in err
    llava, llava_processor = tiny_llava_pair
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    (tmp_path / "llava" / "model.safetensors").write_bytes(b"\x00" * 64)
    convert = ["convert", "--model", str(tmp_path / "llava"), "--out", str(tmp_path / "converted")]
    assert cli_main(convert) == 2
    assert f"{tmp_path / 'llava' / 'model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "converted").exists()
