"""The accelerate configs in examples/accelerate/ parse with accelerate's own config classes, become the plugins
`accelerate launch` gives each process, fit the model they are written for, and (DeepSpeed) pass DeepSpeed's own
config validation once `safevlm train` has filled the "auto" values."""

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from safevlm_hf.training import SafeVLMTrainingConfig


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def _launch_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE` gives every process it starts (accelerate's own
    option merging, as in `accelerate.commands.launch.launch_command`)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.fixture
def launched(monkeypatch):
    def apply(config_file: Path) -> dict[str, str]:
        monkeypatch.chdir(EXAMPLES.parents[1])  # the configs name their JSON relative to the repository root
        env = _launch_env(config_file)
        for key, value in env.items():
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.setenv(key, value)
        return env

    return apply


def test_every_example_config_parses_with_accelerate():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert [f.name for f in files] == ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"]
    kinds = {f.name: ClusterConfig.from_yaml_file(f).distributed_type for f in files}  # raises on unknown keys
    assert kinds == {
        "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
        "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
        "fsdp.yaml": DistributedType.FSDP,
    }


def test_fsdp_config_becomes_a_full_sharding_plugin_that_wraps_the_models_layers(launched, tiny_safevlm):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    env = launched(EXAMPLES / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    plugin = FullyShardedDataParallelPlugin()  # reads what the launcher exported, as each process does
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    model, _ = tiny_safevlm
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # raises if a named layer class is not in the model
    wrapped = [m for m in model.modules() if policy(m)]
    text, vision = model.config.text_config.num_hidden_layers, model.config.vision_config.num_hidden_layers
    assert len(wrapped) == text + vision


DEEPSPEED = [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)]


@pytest.mark.parametrize("name, stage", DEEPSPEED)
def test_deepspeed_configs_become_the_plugin_accelerate_launch_builds(launched, name, stage):
    from accelerate import DeepSpeedPlugin

    env = launched(EXAMPLES / f"{name}.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_CONFIG_FILE"].endswith(".json")
    plugin = DeepSpeedPlugin()  # reads the JSON the launcher points to, with accelerate's own parser
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag is (stage == 3)
    assert plugin.deepspeed_config["bf16"] == {"enabled": "auto"}  # safevlm train's --bf16 / recipe decides


@pytest.mark.parametrize("name, stage", DEEPSPEED)
def test_deepspeed_configs_pass_deepspeed_validation_once_filled_by_safevlm_train(launched, tmp_path, name, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed's own validation needs `pip install deepspeed`")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    env = launched(EXAMPLES / f"{name}.yaml")
    # What the Trainer does with it: the "auto" values are filled from the training options ...
    args = SafeVLMTrainingConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=8, use_cpu=True
    )
    filled = HfTrainerDeepSpeedConfig(json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text()))
    filled.trainer_config_process(args)
    assert filled.config["train_micro_batch_size_per_gpu"] == 2 and filled.config["gradient_accumulation_steps"] == 8
    assert filled.get_value("zero_optimization.stage") == stage
    # ... and DeepSpeed validates the result (one process: the global batch the Trainer computes at launch).
    checked = DeepSpeedConfig(dict(filled.config, train_batch_size=2 * 8))
    assert checked.zero_optimization_stage == stage and checked.gradient_accumulation_steps == 8
