"""L-PPO trainer: learning on a learnable reward, layer-conditioned rollouts, frozen modules, logging, checkpoints and
exact resume, rewards (callable, HF reward model, SafeVLM safety head), export, and clear errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_image
from safetensors.torch import load_file
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from safevlm_hf.layerwise import (
    CallableReward,
    HFRewardModel,
    LPPOConfig,
    LPPOTrainer,
    PromptItem,
    RefusalReward,
    SafetyHeadReward,
)
from safevlm_hf.layerwise.early_exit import ImageEncoderEarlyExit
from safevlm_hf.layerwise.lppo_trainer import _stream_seed, mean_update_statistics, response_mask
from safevlm_hf.prompting import encode_items
from safevlm_hf.tiny import build_tiny_mllama, build_tiny_reward_model


REFUSAL = "I'm sorry, but I can't help with this request."


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def peaked_llava(tiny_llava_pair):
    """The tiny LLaVA with a realistically peaked next-token distribution.

    Its random lm_head gives logits within about +-1 (near-uniform sampling over ~600 tokens), which no LoRA on the
    LLM can sharpen; a trained model's output layer is far larger. Scaling it makes sampling - and PPO - meaningful.
    """
    model, processor = tiny_llava_pair
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model, processor


def training_items(count: int = 8) -> list[PromptItem]:
    # Rows with and without an image, so rollouts and updates handle mixed batches.
    return [PromptItem(f"Tell me about picture number {i}", make_image(i) if i % 4 else None) for i in range(count)]


def starts_with_vowel(prompts, responses, items):
    """A learnable reward: 1 when the answer starts with a vowel (a fifth of the tiny vocabulary or so)."""
    return [1.0 if response[:1].lower() in "aeiou" else 0.0 for response in responses]


def config(tmp_path, **overrides) -> LPPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "lppo"),
        layers=1,
        max_steps=2,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        max_new_tokens=2,
        learning_rate=3e-3,
        lora_r=4,
        lora_alpha=8,
        kl_coef=0.01,
        seed=0,
        show_progress=False,
    )
    settings.update(overrides)
    return LPPOConfig(**settings)


# -------------------------------------------------------------------------------------------------- learning
def test_tiny_lppo_run_improves_mean_reward_on_its_training_prompts(peaked_llava, tmp_path):
    model, processor = peaked_llava
    trainer = LPPOTrainer(
        model,
        processor,
        config(tmp_path, max_steps=12, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=4, lora_r=8, lora_alpha=32),
        training_items(),
        starts_with_vowel,
    )
    before = trainer.mean_reward()
    history = trainer.train()
    after = trainer.mean_reward()
    assert before <= 0.25
    assert after >= before + 0.5  # greedy answers at the trained layer
    first, last = [h["reward"] for h in history[:3]], [h["reward"] for h in history[-3:]]
    assert sum(last) / 3 >= sum(first) / 3 + 0.3  # and the sampled rollouts' reward
    assert history[-1]["entropy"] < history[0]["entropy"]  # the policy sharpened


# --------------------------------------------------------------------------------------------- the rollouts
def test_rollouts_use_the_target_layer_and_safevlm_trains_ungated_with_its_modules_frozen(tiny_safevlm, tmp_path):
    model, processor = tiny_safevlm
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    calls = []
    original_generate = model.generate

    def recording_generate(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("vision_feature_layer", "safety_gating", "do_sample")})
        return original_generate(*args, **kwargs)

    model.generate = recording_generate
    settings = config(tmp_path, layers="1-2", layer_sampling="cycle", max_steps=3)
    trainer = LPPOTrainer(model, processor, settings, training_items(4), starts_with_vowel)
    history = trainer.train()
    assert [h["layer"] for h in history] == [1, 2, 1]
    assert calls == [{"vision_feature_layer": layer, "safety_gating": False, "do_sample": True} for layer in (1, 2, 1)]

    adapters = {name for name, p in trainer.policy.named_parameters() if "lora_" in name}
    assert adapters and all(".language_model." in name for name in adapters)  # LoRA sits on the LLM only
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue
        # vision tower, projector, safety modules and the base LLM weights are untouched
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(parameter, before[original]), name
    lora_b = [p for name, p in trainer.policy.named_parameters() if "lora_B" in name]
    assert any(bool(p.abs().sum() > 0) for p in lora_b)  # the adapters did learn


def test_rollout_draws_each_token_once_from_the_tempered_filtered_distribution(peaked_llava, tmp_path):
    """Every sampled token is the row generator's next draw from softmax(logits / T) after top-k and top-p, with the
    logits the log-probabilities are scored on: the sampling settings are applied exactly once, in one place."""
    model, processor = peaked_llava
    settings = config(tmp_path, rollout_batch_size=8, max_new_tokens=6, temperature=2.0, top_k=40, top_p=0.95)
    trainer = LPPOTrainer(model, processor, settings, training_items(8), starts_with_vowel)
    items, step, layer = training_items(8), 3, 1
    rollout = trainer.rollout(items, layer, step)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        logits, _ = trainer._score(policy, rollout.inputs, rollout.responses, rollout.mask, layer)  # already / T
    filters = [TopKLogitsWarper(40), TopPLogitsWarper(0.95)]
    drawn = 0
    for row in range(len(items)):
        generator = torch.Generator().manual_seed(_stream_seed(settings.seed, step, row))
        for position in range(int(rollout.mask[row].sum())):
            scores = logits[row, position][None]
            for warper in filters:
                scores = warper(None, scores)
            expected = torch.multinomial(torch.softmax(scores, dim=-1)[0], 1, generator=generator)
            assert int(rollout.responses[row, position]) == int(expected), (row, position)
            drawn += 1
    assert drawn >= 16


def test_trainer_builds_the_early_exit_once_for_rollouts_scoring_and_evaluation(peaked_llava, tmp_path, monkeypatch):
    model, processor = peaked_llava
    built = []
    init = ImageEncoderEarlyExit.__init__
    monkeypatch.setattr(ImageEncoderEarlyExit, "__init__", lambda self, m: (built.append(m), init(self, m))[1])
    trainer = LPPOTrainer(
        model, processor, config(tmp_path, max_steps=1), training_items(4), starts_with_vowel, training_items(2)
    )
    trainer.train()
    assert len(trainer.eval_history) == 2 and len(built) == 1


def test_random_layer_sampling_is_seeded_and_stays_in_the_set(peaked_llava, tmp_path):
    model, processor = peaked_llava
    trainer = LPPOTrainer(model, processor, config(tmp_path, layers=[1, 3, 4]), training_items(4), starts_with_vowel)
    draws = [trainer.layer_for_step(step) for step in range(30)]
    assert set(draws) == {1, 3, 4}
    assert draws == [trainer.layer_for_step(step) for step in range(30)]
    # every prompt is visited once per pass over the set, in a fresh seeded order each pass
    passes = [trainer.batch_indices(step) for step in range(4)]
    assert all(sorted(rows) == [0, 1, 2, 3] for rows in passes)
    assert len({tuple(rows) for rows in passes}) > 1


def test_mean_update_statistics_average_each_logged_step_and_are_nan_without_one():
    history = [{"approx_kl": 0.1, "clip_fraction": 0.0}, {"approx_kl": 0.3, "clip_fraction": 0.5}]
    assert mean_update_statistics(history) == pytest.approx({"approx_kl": 0.2, "clip_fraction": 0.25})
    assert all(math.isnan(value) for value in mean_update_statistics([]).values())


def test_response_mask_stops_after_the_first_eos():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 3, 3, 3]])
    assert response_mask(responses, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert response_mask(responses, [7, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


# ------------------------------------------------------------------------------------ logging and checkpoints
def test_log_checkpoint_and_resume_reproduce_the_uninterrupted_run(peaked_llava, tmp_path):
    model, processor = peaked_llava
    items = training_items(4)
    settings = dict(max_steps=4, save_steps=2, ppo_epochs=2)

    uninterrupted = LPPOTrainer(
        copy.deepcopy(model), processor, config(tmp_path / "a", **settings), items, starts_with_vowel
    )
    full_history = uninterrupted.train()

    calls = 0

    def crashing_reward(prompts, responses, its):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("simulated crash during step 3")
        return starts_with_vowel(prompts, responses, its)

    crashed = LPPOTrainer(copy.deepcopy(model), processor, config(tmp_path / "b", **settings), items, crashing_reward)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    output = tmp_path / "b" / "lppo"
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    checkpoint = output / "checkpoint-2"
    # accelerate's state (optimizer, scheduler, RNG) and the trained weights only: not the frozen model
    files = ("adapter/adapter_model.safetensors", "value_head.safetensors", "optimizer.bin", "random_states_0.pkl")
    for name in files + ("custom_checkpoint_0.pkl", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    assert not list(checkpoint.glob("model*.safetensors"))

    resumed = LPPOTrainer(
        copy.deepcopy(model), processor, config(tmp_path / "b", **settings), items, starts_with_vowel
    )
    resumed_history = resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 4
    assert resumed_history == full_history
    for (name, a), (_, b) in zip(uninterrupted.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(uninterrupted.value_head.summary.weight, resumed.value_head.summary.weight)

    log = [json.loads(line) for line in (output / "lppo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    for key in ("reward", "kl", "clip_fraction", "value_loss", "entropy", "layer", "learning_rate"):
        assert all(key in entry for entry in log), key


def test_full_llm_training_keeps_vision_and_projector_frozen_and_checkpoints_the_llm(peaked_llava, tmp_path):
    model, processor = peaked_llava
    initial = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def answer_length(prompts, responses, items):  # varies between rows, so the first step has a gradient
        return [float(len(response)) for response in responses]

    settings = dict(use_lora=False, max_steps=1, learning_rate=1e-3)
    trainer = LPPOTrainer(model, processor, config(tmp_path, **settings), training_items(4), answer_length)
    trainer.train()
    for name, parameter in model.named_parameters():
        if not (name.startswith("model.language_model.") or name.startswith("lm_head.")):
            assert torch.equal(parameter, before[name]), name
    llm = [(n, p) for n, p in model.named_parameters() if n.startswith("model.language_model.")]
    assert any(not torch.equal(p, before[n]) for n, p in llm)
    # The reference stays the initial policy, offloaded: no weight of its own in memory but a CPU copy it streams
    # in for each forward (accelerate's cpu_offload), never a second copy on the device.
    assert all(parameter.device.type == "meta" for parameter in trainer.reference.parameters())
    inputs = encode_items(processor, training_items(2))
    with torch.no_grad():
        torch.testing.assert_close(trainer.reference(**inputs).logits, initial(**inputs).logits, rtol=0, atol=0)
    checkpoint = tmp_path / "lppo" / "checkpoint-1"
    saved = load_file(str(checkpoint / "llm_weights.safetensors"))
    assert saved and all(n.startswith(("model.language_model.", "lm_head.")) for n in saved)

    restored_config = config(tmp_path / "restored", **settings)
    restored = LPPOTrainer(initial, processor, restored_config, training_items(4), answer_length)
    restored.load_checkpoint(checkpoint)
    assert restored.step == 1
    for (name, a), (_, b) in zip(model.named_parameters(), restored.policy.named_parameters()):
        assert torch.equal(a, b), name


def test_full_llm_training_of_a_safevlm_offloads_its_reference_and_keeps_what_the_head_reads(tiny_safevlm, tmp_path):
    """Full mode on a SafeVLM: the offloaded reference still runs (its safety tokens are read through a module call,
    which the offload hooks see), and the input embeddings stay frozen, as in Stage II, since the head reads them."""
    model, processor = tiny_safevlm
    model = copy.deepcopy(model)
    inputs = encode_items(processor, training_items(2))
    with torch.no_grad():
        verdict_before = model.predict_safety(**inputs).level_probs
    embeddings = model.get_input_embeddings().weight.detach().clone()

    def answer_length(prompts, responses, items):
        return [float(len(response)) for response in responses]

    trainer = LPPOTrainer(
        model,
        processor,
        config(tmp_path, use_lora=False, max_steps=1, learning_rate=1e-3),
        training_items(4),
        answer_length,
    )
    trainer.train()
    assert all(parameter.device.type == "meta" for parameter in trainer.reference.parameters())
    llm = [(n, p) for n, p in model.named_parameters() if n.startswith("model.language_model.layers.")]
    assert any(p.requires_grad for _, p in llm)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    with torch.no_grad():
        torch.testing.assert_close(model.predict_safety(**inputs).level_probs, verdict_before, rtol=0, atol=0)


def test_save_model_merges_the_adapters_into_a_loadable_checkpoint(peaked_llava, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = peaked_llava
    trainer = LPPOTrainer(model, processor, config(tmp_path, max_steps=1), training_items(4), starts_with_vowel)
    trainer.train()
    path = trainer.save_model(tmp_path / "final")
    assert (path / "adapter" / "adapter_config.json").is_file() and (path / "value_head.safetensors").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = encode_items(processor, training_items(2))
    with torch.no_grad():
        expected = trainer.policy(**inputs, vision_feature_layer=1).logits
        actual = merged(**inputs, vision_feature_layer=1).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- rewards
def test_safety_head_reward_follows_the_documented_formula(tiny_safevlm):
    model, processor = tiny_safevlm
    items = training_items(2)
    reward = SafetyHeadReward(model, processor, "string")
    with torch.no_grad():  # the head is sure every prompt is level 3 (the policy refuses it)
        model.model.safety_head.level_classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    assert reward.refusal_probability(items) == pytest.approx([1.0, 1.0])
    assert reward([i.prompt for i in items], [REFUSAL, "Sure, here it is."], items) == pytest.approx([1.0, -1.0])
    with torch.no_grad():  # ... and now sure that it is level 0 (answered)
        model.model.safety_head.level_classifier.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    assert reward([i.prompt for i in items], [REFUSAL, "Sure, here it is."], items) == pytest.approx([-1.0, 1.0])


def test_refusal_and_callable_rewards_check_their_inputs_and_outputs():
    items = [PromptItem("risky", None, expected="refuse"), PromptItem("safe", None, expected="answer")]
    assert RefusalReward("string")(["risky", "safe"], [REFUSAL, REFUSAL], items) == [1.0, -1.0]
    with pytest.raises(ValueError, match="expected"):
        RefusalReward("string")(["x"], ["y"], [PromptItem("x", None)])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 responses"):
        CallableReward(lambda p, r, i: [0.0])(["a", "b"], ["a", "b"], items)
    with pytest.raises(TypeError, match="must be a float"):
        CallableReward(lambda p, r, i: ["high", 1.0])(["a", "b"], ["a", "b"], items)


def test_hf_reward_model_gives_one_scalar_per_row_and_rejects_other_outputs(tiny_llava_pair, tmp_path):
    tokenizer = tiny_llava_pair[1].tokenizer
    scalar = build_tiny_reward_model(tokenizer, 1)
    scalar.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = HFRewardModel(str(tmp_path / "rm"))
    scores = reward(["a question", "another one"], ["an answer", "a much longer answer here"], [])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] != scores[1]
    with pytest.raises(ValueError, match="not a scalar per row"):
        HFRewardModel(build_tiny_reward_model(tokenizer, 2), tokenizer)


def test_bad_trainer_input_is_a_clear_error(peaked_llava, tmp_path):
    model, processor = peaked_llava
    with pytest.raises(ValueError, match="prompt set is empty"):
        LPPOTrainer(copy.deepcopy(model), processor, config(tmp_path), [], starts_with_vowel)
    with pytest.raises(ValueError, match=r"Vision layer 9 is outside the vision encoder.*1\.\.4"):
        LPPOTrainer(copy.deepcopy(model), processor, config(tmp_path, layers=9), training_items(2), starts_with_vowel)
    with pytest.raises(ValueError, match="mini_batch_size"):
        config(tmp_path, mini_batch_size=8)
    trainer = LPPOTrainer(copy.deepcopy(model), processor, config(tmp_path), training_items(4), lambda p, r, i: [1.0])
    with pytest.raises(ValueError, match="returned 1 rewards for 4 responses"):
        trainer.train()
    with pytest.raises(ValueError, match="needs a SafeVLM"):
        SafetyHeadReward(model, processor)


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_full_llm_reference_reads_the_same_vision_layer_as_the_policy(family, peaked_llava, tmp_path):
    """The frozen, offloaded copy is scored at the rollout's layer too: before any update it is the policy, so the first
    step's KL is zero. (mllama's early exit hooks the model it is built for, so the copy needs its own; and its vision
    model reads a submodule's weight outside that submodule's call, so offloading streams the encoder in whole.)"""
    if family == "llava":
        model, processor = peaked_llava
    else:
        model, processor = build_tiny_mllama()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)  # peaked, as for peaked_llava: sampled answers are then not all padding

    def answer_length(prompts, responses, items):
        return [float(len(response)) for response in responses]

    settings = dict(use_lora=False, max_steps=1, learning_rate=1e-3, max_new_tokens=4)  # reference offloaded
    trainer = LPPOTrainer(model, processor, config(tmp_path, **settings), training_items(4), answer_length)
    assert trainer.layers == [1] and trainer.early_exit.default_layer != 1
    (entry,) = trainer.train()
    assert all(parameter.device.type == "meta" for parameter in trainer.reference.parameters())
    assert entry["response_length"] > 0
    assert abs(entry["kl"]) < 1e-6, entry["kl"]
