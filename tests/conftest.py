"""Shared offline fixtures: a tiny SafeVLM (built once per session), its processor, images and a saved checkpoint."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safevlm_hf.prompting import chat_text
from safevlm_hf.tiny import TinyLlavaSpec, build_tiny_llava, build_tiny_safevlm


torch.set_num_threads(2)


def make_image(seed: int = 0, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


# The part every remote-code script shares (they run in a subprocess where safevlm_hf cannot be imported, given `path`
# and `prompts`): the checkpoint loaded with its own code only, and one batch of the prompts with two seeded images.
REMOTE_LOAD_AND_ENCODE = textwrap.dedent(
    """
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    images = [Image.fromarray(np.random.RandomState(s).randint(0, 255, (40, 40, 3), dtype=np.uint8)) for s in (0, 1)]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    """
)


def chat_prompt(processor, text: str, image: bool = True) -> str:
    """One user turn (with an image placeholder by default) in the processor's chat template."""
    return chat_text(processor, text, image)


@pytest.fixture(scope="session")
def tiny_llava_pair():
    return build_tiny_llava(TinyLlavaSpec())


@pytest.fixture(scope="session")
def _tiny_safevlm_pair():
    return build_tiny_safevlm(TinyLlavaSpec(), num_safety_tokens=4)


@pytest.fixture
def tiny_safevlm(_tiny_safevlm_pair):
    """A fresh copy per test, so tests may train or edit weights freely."""
    model, processor = _tiny_safevlm_pair
    fresh = copy.deepcopy(model)
    fresh.set_safety_tokenizer(processor.tokenizer)
    return fresh.eval(), processor


def save_checkpoint(model, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved_llava(tiny_llava_pair, tmp_path_factory):
    return save_checkpoint(*tiny_llava_pair, tmp_path_factory.mktemp("llava_ckpt"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m safevlm_hf.cli ARGS` on this machine's CPU (gloo); fails the test with the
    tail of its output if it fails."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "safevlm_hf.cli"]
    return run_command([*launch, *args])


def run_command(command: list[str]) -> subprocess.CompletedProcess:
    """Run a launcher in a subprocess (one thread per process, the tests folder importable)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def saved_safevlm(_tiny_safevlm_pair, tmp_path_factory):
    return save_checkpoint(*_tiny_safevlm_pair, tmp_path_factory.mktemp("safevlm_ckpt"))


@pytest.fixture
def single_thread():
    """One torch thread for the test: tiny models gain nothing from two, and a shared CPU thrashes with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    return [make_image(seed) for seed in range(4)]
