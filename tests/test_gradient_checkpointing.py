"""Gradient (activation) checkpointing: the same losses and weights as without it, with the decoder layers really
recomputed in the backward pass."""

import copy

import pytest
import torch

from safevlm_hf.training import SafeVLMTrainer

from test_training import _config, train_data  # noqa: F401  (train_data is a fixture)


pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model, processor, data, tmp_path, checkpointing: bool, **overrides):
    config = _config(tmp_path, max_steps=2, logging_steps=1, activation_checkpointing=checkpointing, **overrides)
    trainer = SafeVLMTrainer(copy.deepcopy(model), config, train_dataset=data, processing_class=processor)
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    calls = []
    # A pre-hook inside the layer: the layer's own hooks run outside the checkpoint, and the recompute stops as soon
    # as the last saved tensor is rebuilt (inside the MLP), so a post-hook on the MLP would not see it.
    base.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return losses, weights, len(calls)


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpointing_gives_the_same_losses_and_weights(tiny_safevlm, train_data, tmp_path, stage):  # noqa: F811
    model, processor = tiny_safevlm
    plain_losses, plain_weights, plain_calls = _train(model, processor, train_data, tmp_path / "a", False, stage=stage)
    ckpt_losses, ckpt_weights, ckpt_calls = _train(model, processor, train_data, tmp_path / "b", True, stage=stage)
    assert ckpt_calls == 2 * plain_calls  # every decoder layer ran again in the backward pass
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6)
    assert plain_weights.keys() == ckpt_weights.keys()
    for name, weight in plain_weights.items():
        torch.testing.assert_close(ckpt_weights[name], weight, rtol=1e-6, atol=1e-7, msg=name)
