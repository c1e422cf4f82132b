"""A 2-process Stage I run (torchrun, gloo on CPU) takes the same steps as one process with the same global batch.

One test, a few tiny steps: it starts two Python processes, so it is the slowest training test, and it stays in the
default suite because multi-process launch is a supported way to train.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safevlm_hf.cli import main as cli_main

from test_training import QUESTIONS, write_training_data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.distributed
def test_two_process_stage1_matches_one_process(saved_safevlm, tmp_path):
    # 4 rows (one text-only) and a global batch of 4: every step sees the same rows either way.
    data = write_training_data(tmp_path / "data", rows=QUESTIONS[:4])
    common = [
        "train",
        "--stage",
        "1",
        "--model",
        str(saved_safevlm),
        "--data",
        str(data),
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--seed",
        "0",
        "--logging-steps",
        "1",
        "--set",
        "use_cpu=True",
        "--set",
        "disable_tqdm=True",
    ]

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "safevlm_hf.cli",
    ]
    run = subprocess.run(
        [*launch, *common, "--out", str(tmp_path / "two"), "--batch-size", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
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
