"""Shared offline fixtures: a tiny SafeVLM (built once per session), its processor, images and a saved checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from safevlm_hf.tiny import TinyLlavaSpec, build_tiny_llava, build_tiny_safevlm


torch.set_num_threads(2)


def make_image(seed: int = 0, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


def chat_prompt(processor, text: str, image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


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


@pytest.fixture(scope="session")
def saved_safevlm(_tiny_safevlm_pair, tmp_path_factory):
    model, processor = _tiny_safevlm_pair
    path = tmp_path_factory.mktemp("safevlm_ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


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
