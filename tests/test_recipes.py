"""Training recipes: the shipped PSA-VLM recipe carries the published numbers, flags override it, users' own files
work the same way, and bad recipes fail with the file and the key."""

import json

import pytest

from safevlm_hf.cli import main as cli_main
from safevlm_hf.training import RecipeError, SafeVLMTrainingConfig, list_recipes, load_recipe
from safevlm_hf.training.cli import training_settings

from test_training import QUESTIONS, write_training_data


def _train_args(*extra: str) -> list[str]:
    return ["train", "--stage", "1", "--model", "M", "--data", "D", "--out", "O", *extra]


def _settings(argv: list[str]) -> dict:
    from safevlm_hf.cli import build_parser

    return training_settings(build_parser().parse_args(argv))


def test_psa_vlm_recipe_holds_the_published_hyperparameters():
    recipe = load_recipe("psa-vlm")
    # Yingshui-Tan/PSA-VLM train.py (commit 9c08d48): both stages' TrainingArguments and the Stage II LoraConfig.
    stage1 = recipe.training_config(1, "out", use_cpu=True)
    assert (stage1.stage, stage1.learning_rate, stage1.num_train_epochs, stage1.bf16) == (1, 1e-5, 3, True)
    assert (stage1.per_device_train_batch_size, stage1.gradient_accumulation_steps, stage1.warmup_steps) == (2, 8, 20)
    stage2 = recipe.training_config(2, "out", use_cpu=True)
    assert (stage2.stage2_mode, stage2.lora_r, stage2.lora_alpha, stage2.lora_dropout) == ("lora", 256, 16, 0.05)
    assert (stage2.learning_rate, stage2.num_train_epochs, stage2.warmup_steps) == (1e-5, 3, 300)
    assert recipe.launch == {"accelerate_config": "deepspeed_zero2.yaml", "num_processes": 8}
    assert "psa-vlm" in [r.name for r in list_recipes()]
    # The same from the config class, for Python users.
    assert SafeVLMTrainingConfig.from_recipe("psa-vlm", stage=2, output_dir="out", use_cpu=True).lora_r == 256


def test_cli_flags_override_the_recipe_and_the_recipe_overrides_the_defaults():
    plain = _settings(_train_args())
    assert (plain["learning_rate"], plain["num_train_epochs"], plain["per_device_train_batch_size"]) == (1e-4, 1.0, 8)
    recipe = _settings(_train_args("--recipe", "psa-vlm"))
    assert (recipe["learning_rate"], recipe["num_train_epochs"], recipe["per_device_train_batch_size"]) == (1e-5, 3, 2)
    assert recipe["bf16"] is True and recipe["seed"] == 256
    mixed = _settings(_train_args("--recipe", "psa-vlm", "--lr", "3e-5", "--no-bf16", "--set", "warmup_steps=5"))
    assert (mixed["learning_rate"], mixed["bf16"], mixed["warmup_steps"]) == (3e-5, False, "5")
    assert mixed["num_train_epochs"] == 3  # untouched recipe values stay
    stage2 = _settings(
        [
            "train",
            "--stage",
            "2",
            "--model",
            "M",
            "--data",
            "D",
            "--out",
            "O",
            "--recipe",
            "psa-vlm",
            "--lora-r",
            "64",
            "--gradient-checkpointing",
        ]
    )
    assert (stage2["lora_r"], stage2["lora_alpha"], stage2["activation_checkpointing"]) == (64, 16, True)


def test_a_copied_and_edited_recipe_file_trains(saved_safevlm, tmp_path, capsys):
    data = write_training_data(tmp_path / "data", rows=QUESTIONS[:4])
    recipe = tmp_path / "my-recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "name": "mine",
                "stage1": {
                    "learning_rate": 2e-3,
                    "max_steps": 1,
                    "per_device_train_batch_size": 4,
                    "use_cpu": True,
                    "disable_tqdm": True,
                    "activation_checkpointing": True,
                },
            }
        )
    )
    out = tmp_path / "out"
    argv = ["train", "--stage", "1", "--model", str(saved_safevlm), "--data", str(data), "--out", str(out)]
    assert cli_main([*argv, "--recipe", str(recipe), "--dtype", "bfloat16"]) == 0
    args = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert args["global_step"] == 1 and args["train_batch_size"] == 4
    assert "Saved the stage 1 model" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # --dtype reached the weights


def test_recipe_listing_and_errors_name_the_file_and_the_key(tmp_path, capsys):
    assert cli_main(["train", "--recipe"]) == 0
    listing = capsys.readouterr().out
    assert "psa-vlm:" in listing and "lora_r=256" in listing and "psa-vlm.yaml" in listing
    assert cli_main(["train", "--list-recipes"]) == 0
    assert "learning_rate=1e-05" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  learnig_rate: 1.0e-5\n")
    with pytest.raises(
        RecipeError, match=r"bad\.yaml: stage1: 'learnig_rate' is not .* Did you mean \['learning_rate'\]"
    ):
        load_recipe(bad)
    bad.write_text("stage2:\n  lora_r: many\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: stage2: argument --lora_r.*invalid int value: 'many'"):
        load_recipe(bad)
    bad.write_text("stage1:\n  output_dir: here\n")
    with pytest.raises(RecipeError, match="'output_dir' is set by the run"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"unknown recipe 'psa'; shipped recipes: \[.*'psa-vlm'"):
        load_recipe("psa")
    assert cli_main(_train_args("--recipe", str(tmp_path / "missing.yaml"))) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert cli_main(["train", "--stage", "1"]) == 2
    assert "needs --model, --data, --out" in capsys.readouterr().err


def test_plan_reads_its_recipe_once_and_a_config_parses_its_settings_once(monkeypatch, capsys):
    from safevlm_hf.training import recipes

    calls = {"read": 0, "parser": 0}

    def counted(name, original):
        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(recipes, "_read", counted("read", recipes._read))
    monkeypatch.setattr(recipes, "_parser", counted("parser", recipes._parser))
    assert cli_main(["plan", "--model", "llava-1.5-7b", "--stage", "1", "--recipe", "psa-vlm"]) == 0
    assert "zero2" in capsys.readouterr().out  # the launch block picked the sharding of the chosen row
    assert calls["read"] == 1  # one file read gives both the stage settings and the launch block
    recipe = load_recipe("psa-vlm")
    calls["parser"] = 0
    assert recipe.training_config(2, "out", use_cpu=True).lora_r == 256
    assert calls["parser"] == 1  # the settings are typed by one parse, which also checks them


def test_building_a_config_names_the_origin_once_in_each_error():
    from safevlm_hf.training import build_training_config

    run = {"stage": 2, "output_dir": "out"}
    for settings, message in (
        ({"lora_target_modules": {"q_proj": 1}}, "'lora_target_modules' must be a scalar or a list, got a mapping."),
        ({"lora_r": "many"}, "argument --lora_r/--lora-r: invalid int value: 'many'"),
        ({"learnig_rate": 1}, "'learnig_rate' is not a SafeVLMTrainingConfig / TrainingArguments field."),
    ):
        with pytest.raises(RecipeError) as error:
            build_training_config({**run, **settings}, origin="my recipe")
        assert str(error.value).startswith(f"my recipe: {message}")
