"""A refusal costs a verdict, not a generation: refused rows skip the LLM, caution prefixes are prefilled.

Each result is compared with the gate-only path (every row decoded, the gate forcing tokens), which generate() still
takes when an argument needs every row in one batch; here `output_hidden_states=True` selects it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from conftest import chat_prompt, make_image


REFUSE_ALL = {"levels": {"0": "refuse", "1": "refuse", "2": "refuse", "3": "refuse"}}
CAUTION_ALL = {"levels": {"0": "caution", "1": "caution", "2": "caution", "3": "refuse"}}
TEXTS = ["hi", "describe this picture in great detail please", "what is in the image?", "tell me more"]


def _batch(processor, count=4):
    prompts = [chat_prompt(processor, text) for text in TEXTS[:count]]
    images = [make_image(i) for i in range(count)]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


class LLMCalls:
    """Counts the LLM's forward passes and the rows and tokens each one reads."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self.handle = model.model.language_model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        embeds = output.last_hidden_state
        self.calls.append((embeds.shape[0], embeds.shape[1]))

    def close(self):
        self.handle.remove()


def _gate_only(**kwargs):
    return {**kwargs, "output_hidden_states": True}


@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"do_sample": True, "temperature": 1.3},
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_return_sequences": 2},
        {"min_new_tokens": 30},
    ],
)
def test_an_all_refused_batch_runs_no_llm_forward_and_matches_the_gate(tiny_safevlm, mode):
    model, processor = tiny_safevlm
    inputs = _batch(processor)
    calls = LLMCalls(model)
    torch.manual_seed(0)
    fast = model.generate(**inputs, max_new_tokens=40, safety_policy=REFUSE_ALL, **mode)
    assert calls.calls == []  # not one LLM forward: the verdict alone decides
    calls.close()
    torch.manual_seed(0)
    gated = model.generate(**inputs, max_new_tokens=40, safety_policy=REFUSE_ALL, **_gate_only(**mode))
    assert torch.equal(fast, gated)


def test_only_answered_rows_enter_the_llm_and_rows_keep_their_order(tiny_safevlm):
    model, processor = tiny_safevlm
    inputs = _batch(processor)
    verdicts = model.assess(**inputs)
    policy = {"levels": {"0": "answer", "1": "answer", "2": "answer", "3": "refuse"}}
    # Answer rows 0 and 2 (level 0), refuse rows 1 and 3 (level 3): make the head say so.
    head = model.model.safety_head
    with torch.no_grad():
        pooled = []
        handle = head.norm.register_forward_hook(lambda m, i, o: pooled.append(o.detach()))
        model.predict_safety(**inputs)
        handle.remove()
        x = pooled[0]
        target = torch.tensor([0, 3, 0, 3])
        solution = torch.linalg.lstsq(
            torch.cat([x, torch.ones(4, 1)], 1), torch.nn.functional.one_hot(target, 4).float() * 20 - 10
        ).solution
        head.level_classifier.weight.copy_(solution[:-1].T)
        head.level_classifier.bias.copy_(solution[-1])
    assert [v.level for v in model.assess(**inputs)] == [0, 3, 0, 3], verdicts
    calls = LLMCalls(model)
    fast = model.generate(**inputs, max_new_tokens=12, safety_policy=policy)
    assert {rows for rows, _ in calls.calls} == {2}  # only the two answered rows, prefill and every decode step
    calls.close()
    gated = model.generate(**inputs, max_new_tokens=12, safety_policy=policy, **_gate_only())
    assert torch.equal(fast, gated)


def _level(model, level: int) -> None:
    """Make the head give every row `level` (the level classifier's weights zeroed, its bias one-hot)."""
    with torch.no_grad():
        classifier = model.model.safety_head.level_classifier
        classifier.weight.zero_()
        classifier.bias.fill_(-10.0)
        classifier.bias[level] = 10.0


def test_a_caution_prefix_is_prefilled_in_one_pass_and_decoding_matches_the_gate(tiny_safevlm):
    model, processor = tiny_safevlm
    _level(model, 1)
    inputs = _batch(processor, 2)
    calls = LLMCalls(model)
    fast = model.generate(**inputs, max_new_tokens=50, safety_policy=CAUTION_ALL)
    calls.close()
    gated = model.generate(**inputs, max_new_tokens=50, safety_policy=CAUTION_ALL, **_gate_only())
    assert torch.equal(fast, gated)  # token for token under greedy decoding
    prefix = processor.tokenizer.encode(
        model.assess(**inputs, safety_policy=CAUTION_ALL)[0].message, add_special_tokens=False
    )
    # One prefill that already holds the prefix, then one-token steps: no step per prefix token.
    assert calls.calls[0][1] >= inputs["input_ids"].shape[1] + len(prefix)
    assert all(length == 1 for _, length in calls.calls[1:])
    assert len(calls.calls) <= 50 - len(prefix)


def test_return_dict_scores_carry_the_forced_distribution_for_refused_rows(tiny_safevlm):
    model, processor = tiny_safevlm
    inputs = _batch(processor, 2)
    out = model.generate(
        **inputs, max_new_tokens=8, safety_policy=REFUSE_ALL, return_dict_in_generate=True, output_scores=True
    )
    generated = out.sequences[:, inputs["input_ids"].shape[1] :]
    assert len(out.scores) == generated.shape[1]
    for step, scores in enumerate(out.scores):
        assert scores.shape == (2, model.config.text_config.vocab_size)
        assert torch.equal(scores.argmax(-1), generated[:, step])
        assert bool((scores.max(-1).values == 0).all()) and bool(
            torch.isinf(scores).sum(-1).eq(scores.shape[1] - 1).all()
        )
    assert [v.action for v in out.safety_verdicts] == ["refuse", "refuse"]


class Collect:
    """A streamer that records what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("policy", [REFUSE_ALL, CAUTION_ALL])
def test_a_streamer_sees_the_prompt_then_exactly_the_answer(tiny_safevlm, policy):
    model, processor = tiny_safevlm
    _level(model, 1)
    inputs = _batch(processor, 1)
    streamer = Collect()
    out = model.generate(**inputs, max_new_tokens=30, safety_policy=policy, streamer=streamer)
    assert streamer.ended and streamer.puts[0] == inputs["input_ids"][0].tolist()
    streamed = [token for put in streamer.puts[1:] for token in put]
    generated = out[0, inputs["input_ids"].shape[1] :].tolist()
    pad = processor.tokenizer.pad_token_id
    assert streamed == [t for t in generated if t != pad] or streamed == generated


class StopAfter(StoppingCriteria):
    """Stops every row after `steps` generated tokens (a user criterion; it sees the rows that run the LLM)."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool)


def test_stopping_criteria_apply_to_the_rows_that_run_and_refusals_stay_whole(tiny_safevlm):
    model, processor = tiny_safevlm
    inputs = _batch(processor, 2)
    _level(model, 0)
    policy = {"levels": {"0": "answer", "1": "answer", "2": "answer", "3": "refuse"}}
    stop = StopAfter(3)
    answered = model.generate(
        **inputs, max_new_tokens=20, safety_policy=policy, stopping_criteria=StoppingCriteriaList([stop])
    )
    assert answered.shape[1] - inputs["input_ids"].shape[1] == 3 and stop.calls == 3
    refused = model.generate(
        **inputs, max_new_tokens=60, safety_policy=REFUSE_ALL, stopping_criteria=StoppingCriteriaList([StopAfter(3)])
    )
    message = processor.tokenizer.encode(
        model.assess(**inputs, safety_policy=REFUSE_ALL)[0].message, add_special_tokens=False
    )
    assert refused[0, inputs["input_ids"].shape[1] :].tolist()[: len(message)] == message
