"""Multi-process training on CPU (gloo) takes the same steps as one process with the same global batch: plain
data-parallel (torchrun) and the sharded engines of examples/accelerate/ (DeepSpeed ZeRO-2 for Stage I, ZeRO-3 for
Stage II LoRA, launched by `accelerate launch` with the shipped configs).

Each test starts two Python processes (a few tiny steps, ~30 s); they stay in the default suite because
multi-process launch is a supported way to train. The DeepSpeed tests need `pip install deepspeed` (skipped without
it); DeepSpeed compiles its shared-memory CPU communication op on first use (~2 min, cached afterwards). FSDP cannot
run here: accelerate enables FSDP only on GPUs (on a CPU-only machine it silently runs plain DDP), so its config is
checked by tests/test_accelerate_configs.py instead.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safevlm_hf.cli import main as cli_main

from conftest import free_port, run_command, run_torchrun
from test_training import QUESTIONS, write_training_data


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def _losses(out: Path, step: int = 3) -> list[float]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _train_args(model: Path, data: Path, stage: int, steps: int, *extra: str) -> list[str]:
    """`safevlm train` options shared by the one- and two-process runs of a test (not the batch size)."""
    return [
        "train",
        "--stage",
        str(stage),
        "--model",
        str(model),
        "--data",
        str(data),
        "--max-steps",
        str(steps),
        "--lr",
        "1e-3",
        "--seed",
        "0",
        "--logging-steps",
        "1",
        "--set",
        "disable_tqdm=True",
        *extra,
    ]


def _assert_same_models(two: Path, one: Path) -> None:
    """Loaded back (the on-disk key layout may differ between save paths), every weight agrees."""
    from safevlm_hf import SafeVLMForConditionalGeneration

    a = SafeVLMForConditionalGeneration.from_pretrained(two).state_dict()
    b = SafeVLMForConditionalGeneration.from_pretrained(one).state_dict()
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.distributed
def test_two_process_stage1_matches_one_process(saved_safevlm, tmp_path):
    # 4 rows (one text-only) and a global batch of 4: every step sees the same rows either way.
    data = write_training_data(tmp_path / "data", rows=QUESTIONS[:4])
    common = _train_args(saved_safevlm, data, 1, 3, "--set", "use_cpu=True")

    run = run_torchrun([*common, "--out", str(tmp_path / "two"), "--batch-size", "2"])
    assert run.stdout.count("Saved the stage 1 model") == 1  # the main process reports and exports, once
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (tmp_path / "two" / "checkpoint-3" / "rng_state_1.pth").is_file()  # both processes took part

    assert cli_main([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0

    # Same loss at every step: each term is normalized over the global batch, not per process.
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    initial = load_file(saved_safevlm / "model.safetensors")
    assert set(one) == set(two)
    trained = [k for k in one if not torch.equal(one[k], initial[k])]
    assert trained and all(k.startswith("model.safety_") for k in trained)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)


def _accelerate_launch(config: str) -> list[str]:
    """`accelerate launch` with a shipped config, made to fit a CPU-only machine (2 processes, no bf16)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(EXAMPLES / config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "safevlm_hf.cli",
    ]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "config, stage, options",
    [
        ("deepspeed_zero2.yaml", 1, []),
        # dropout 0: its masks come from each process's own random stream, which a single process cannot reproduce
        ("deepspeed_zero3.yaml", 2, ["--lora-r", "4", "--lora-dropout", "0"]),
    ],
)
def test_deepspeed_on_two_cpu_processes_matches_one_process(
    saved_safevlm, tmp_path, monkeypatch, config, stage, options
):
    pytest.importorskip("deepspeed", reason="the DeepSpeed engine needs `pip install deepspeed`")
    data = write_training_data(tmp_path / "data", rows=QUESTIONS[:4])
    common = _train_args(saved_safevlm, data, stage, 2, *options)
    monkeypatch.chdir(EXAMPLES.parents[1])  # the configs name their DeepSpeed JSON relative to the repository root
    # DeepSpeed's default CPU backend is oneCCL; gloo ships with torch.
    run = run_command(
        [
            *_accelerate_launch(config),
            *common,
            "--out",
            str(tmp_path / "two"),
            "--batch-size",
            "2",
            "--set",
            "ddp_backend=gloo",
        ]
    )
    assert run.stdout.count(f"Saved the stage {stage} model") == 1
    shards = sorted(p.name for p in (tmp_path / "two" / "checkpoint-2" / "global_step2").glob("*optim_states.pt"))
    # the optimizer state is split over the two processes (ZeRO), not replicated
    assert shards == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]

    assert cli_main([*common, "--out", str(tmp_path / "one"), "--batch-size", "4", "--set", "use_cpu=True"]) == 0
    assert _losses(tmp_path / "two", step=2) == pytest.approx(_losses(tmp_path / "one", step=2), rel=1e-5)
    _assert_same_models(tmp_path / "two", tmp_path / "one")
