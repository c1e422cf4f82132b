# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Pluggable rewards for L-PPO (and the optional reward column of the ICET scan).

A reward is any callable `reward(prompts, responses, items) -> list[float]`, one float per row: `prompts` are the
users' texts (no chat formatting), `responses` the decoded answers, `items` the prompt items (with their images and
labels). Three ready-made kinds:

* :class:`HFRewardModel` - a Hugging Face sequence-classification reward model with a single output per row;
* :class:`SafetyHeadReward` - SafeVLM's own safety head: reward refusals of the prompts its policy would refuse and
  answers to the others (formula in the class docstring);
* :class:`RefusalReward` - labelled prompts (`item.expected` is `"refuse"` or `"answer"`) scored by a judge;

and :class:`CallableReward`, which wraps any Python function and checks what it returns.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from ..evaluation.judges import Judge, build_judge
from ..prompting import encode_items
from .prompts import judge_inputs


@runtime_checkable
class RewardFunction(Protocol):
    """`reward(prompts, responses, items) -> list[float]` with one finite float per row."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any]) -> list[float]: ...


def check_rewards(values: Any, expected_rows: int, source: str) -> list[float]:
    """Validate a reward function's output: a sequence of `expected_rows` finite numbers."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"{source} returned a tensor of shape {tuple(values.shape)}; a reward must be one scalar per row "
                f"(shape ({expected_rows},))."
            )
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{source} returned {type(values).__name__}; it must return a list of floats.") from None
    if len(values) != expected_rows:
        raise ValueError(f"{source} returned {len(values)} rewards for {expected_rows} responses; return one per row.")
    rewards: list[float] = []
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{source} returned {value!r} for row {row}; every reward must be a float.")
        if not math.isfinite(float(value)):
            raise ValueError(f"{source} returned {value!r} for row {row}; rewards must be finite.")
        rewards.append(float(value))
    return rewards


class CallableReward:
    """Wrap a Python function `fn(prompts, responses, items) -> list[float]`, checking each output."""

    def __init__(
        self, fn: Callable[[Sequence[str], Sequence[str], Sequence[Any]], Sequence[float]], name: str | None = None
    ):
        if not callable(fn):
            raise TypeError(f"CallableReward needs a callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any]) -> list[float]:
        return check_rewards(self.fn(prompts, responses, items), len(responses), f"reward function {self.name!r}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "callable", "name": self.name}


class HFRewardModel:
    """A Hugging Face sequence-classification reward model: one scalar score per (prompt, response).

    The pair is written as a chat (user turn, assistant turn) with the tokenizer's chat template when it has one,
    else passed as a text pair (`tokenizer(prompt, response)`), as classic reward models were trained.

    Args:
        model_or_path: a `PreTrainedModel` for sequence classification, or a path / Hub id loaded with
            `AutoModelForSequenceClassification`.
        tokenizer: its tokenizer (loaded from `model_or_path` when it is a path).
        batch_size: rows scored per forward pass.
        max_length: truncation length of the scored text.
        use_chat_template: force (`True`) or forbid (`False`) the chat formatting; `None` decides from the tokenizer.
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 8,
        max_length: int = 1024,
        use_chat_template: bool | None = None,
        device: torch.device | str | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model_or_path, (str, os.PathLike)):
            self.name = str(model_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(model_or_path)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_path)
        else:
            model = model_or_path
            self.name = getattr(model.config, "_name_or_path", None) or type(model).__name__
        if tokenizer is None:
            raise ValueError(f"HFRewardModel({self.name}) needs the reward model's tokenizer: pass tokenizer=...")
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise ValueError(
                f"Reward model {self.name} has num_labels={num_labels}, so its output is not a scalar per row. Use a "
                "sequence-classification reward model with a single output (num_labels=1), or wrap a classifier in a "
                "CallableReward that turns its class probabilities into one score."
            )
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:  # decoder-only reward models often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length
        self.use_chat_template = (
            bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
        )

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        common = dict(return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        if self.use_chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses)
            ]
            return self.tokenizer(texts, **common)
        return self.tokenizer(list(prompts), list(responses), **common)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any] = ()) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size], responses[start : start + self.batch_size])
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
            rows = batch["input_ids"].shape[0]
            if logits.dim() == 2 and logits.shape[-1] == 1:
                logits = logits[:, 0]
            if logits.shape != (rows,):
                raise ValueError(
                    f"Reward model {self.name} returned logits of shape {tuple(logits.shape)} for {rows} rows; a "
                    "reward model must output one scalar per row (shape (batch,) or (batch, 1))."
                )
            scores.extend(logits.float().tolist())
        return check_rewards(scores, len(responses), f"reward model {self.name}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "model": self.name, "chat_template": self.use_chat_template}


def _judge(judge: Judge | str) -> Judge:
    return build_judge(judge) if isinstance(judge, str) else judge


def _refusal_sign(refused: bool | None) -> float:
    """+1 for a refusal, -1 for an answer, 0 when the judge could not tell (no push either way)."""
    return 0.0 if refused is None else (1.0 if refused else -1.0)


class SafetyHeadReward:
    r"""Reward from a SafeVLM's own safety head: refuse what its policy would refuse, answer the rest.

    For each prompt (text + image) the head gives a risk-type distribution `P(t)` and a risk-level distribution
    `P(l)`. The probability that the policy demands a refusal is

        p_refuse = sum over (t, l) of P(t) * P(l) * [policy.action(t, l, profile) == "refuse"]

    and the reward of a response is

        r = (2 * p_refuse - 1) * s,   s = +1 if the judge says the response refuses, -1 if it answers, 0 if unknown.

    So a refusal of a prompt the head is sure is risky earns +1, answering it -1; on a prompt the head is sure is safe
    the signs flip (over-refusal costs as much as compliance); uncertain prompts (`p_refuse` near 0.5) give little
    signal either way. The head reads `config.safety_feature_layer`, so the reward is the same whichever vision layer
    the policy's rollouts were conditioned on.

    Args:
        model: the SafeVLM being trained (its safety modules are frozen during L-PPO, so its head is a fixed critic).
        processor: its `SafeVLMProcessor`.
        judge: decides whether a response is a refusal (a `Judge` or a spec for `build_judge`; default string match).
        safety_profile / safety_policy: the policy profile and policy used (default: the checkpoint's).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        judge: Judge | str = "string",
        *,
        safety_profile: str | None = None,
        safety_policy: Any = None,
        batch_size: int = 8,
    ):
        if not hasattr(model, "predict_safety"):
            raise ValueError(
                f"The safety-head reward needs a SafeVLM model; {type(model).__name__} has no safety head. Use a HF "
                "reward model (hf:MODEL) or a Python callable instead."
            )
        self.model = model
        self.processor = processor
        self.judge = _judge(judge)
        self.policy = model.safety_policy(safety_policy)
        self.profile = safety_profile if safety_profile is not None else self.policy.default_profile
        self.policy.profile_info(self.profile)  # unknown profile -> error listing the known ones
        self.batch_size = batch_size
        config = model.config
        # refuse_mask[t, l] = 1 where the policy refuses risk type t at level l
        levels = range(len(config.safety_levels))
        action = self.policy.action
        refused = [[action(t, level, self.profile) == "refuse" for level in levels] for t in config.safety_types]
        self.refuse_mask = torch.tensor(refused, dtype=torch.float32)

    @torch.no_grad()
    def refusal_probability(self, items: Sequence[Any]) -> list[float]:
        """`p_refuse` for each item (see the class docstring)."""
        device = next(self.model.parameters()).device
        values: list[float] = []
        for start in range(0, len(items), self.batch_size):
            inputs = encode_items(self.processor, items[start : start + self.batch_size], device)
            prediction = self.model.predict_safety(**inputs)
            joint = prediction.type_probs[:, :, None] * prediction.level_probs[:, None, :]
            values.extend((joint.cpu() * self.refuse_mask).sum(dim=(1, 2)).tolist())
        return values

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any]) -> list[float]:
        p_refuse = self.refusal_probability(items)
        judgements = self.judge.judge(judge_inputs(prompts, responses, items))
        rewards = [(2.0 * p - 1.0) * _refusal_sign(j.refused) for p, j in zip(p_refuse, judgements)]
        return check_rewards(rewards, len(responses), "safety-head reward")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "safety-head",
            "formula": "(2 * p_refuse - 1) * (+1 refused | -1 answered | 0 unknown)",
            "profile": self.profile,
            "judge": self.judge.describe(),
        }


class RefusalReward:
    """Reward for labelled prompts: +1 for the expected behaviour, -1 for the other, 0 when the judge cannot tell.

    `item.expected` must be `"refuse"` (risky prompt: a refusal earns +1) or `"answer"` (safe prompt: an answer earns
    +1), as in the evaluation suite's `BenchmarkItem` and in prompt files.
    """

    def __init__(self, judge: Judge | str = "string"):
        self.judge = _judge(judge)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], items: Sequence[Any]) -> list[float]:
        wanted = []
        for index, item in enumerate(items):
            expected = getattr(item, "expected", None)
            if expected not in ("refuse", "answer"):
                raise ValueError(
                    f"RefusalReward needs every item's `expected` to be 'refuse' or 'answer'; item {index} "
                    f"({getattr(item, 'id', None)!r}) has {expected!r}."
                )
            wanted.append(1.0 if expected == "refuse" else -1.0)
        judgements = self.judge.judge(judge_inputs(prompts, responses, items))
        rewards = [w * _refusal_sign(j.refused) for w, j in zip(wanted, judgements)]
        return check_rewards(rewards, len(responses), "refusal reward")

    def describe(self) -> dict[str, Any]:
        return {"kind": "refusal", "judge": self.judge.describe()}


def build_reward(
    spec: str | RewardFunction | Callable, *, model: Any = None, processor: Any = None, judge: Judge | str = "string"
) -> RewardFunction:
    """A reward from a spec: `"safety-head"`, `"refusal"`, `"hf:MODEL_PATH_OR_ID"`, or any callable (wrapped)."""
    if callable(spec) and not isinstance(spec, str):
        ready_made = (HFRewardModel, SafetyHeadReward, RefusalReward, CallableReward)
        return spec if isinstance(spec, ready_made) else CallableReward(spec)
    if spec == "safety-head":
        if model is None or processor is None:
            raise ValueError("The 'safety-head' reward needs the SafeVLM model and its processor.")
        return SafetyHeadReward(model, processor, judge)
    if spec == "refusal":
        return RefusalReward(judge)
    if isinstance(spec, str) and spec.startswith("hf:") and len(spec) > 3:
        device = next(model.parameters()).device if model is not None else None
        return HFRewardModel(spec[3:], device=device)
    raise ValueError(
        f"Unknown reward spec {spec!r}; use 'safety-head', 'refusal', 'hf:MODEL_PATH_OR_ID' or a Python callable "
        "(prompts, responses, items) -> list[float]."
    )


def describe_reward(reward: Any) -> dict[str, Any]:
    """What a reward is, for logs and reports."""
    describe = getattr(reward, "describe", None)
    if callable(describe):
        return describe()
    return {"kind": "callable", "name": getattr(reward, "__name__", type(reward).__name__)}


__all__ = [
    "CallableReward",
    "HFRewardModel",
    "RefusalReward",
    "RewardFunction",
    "SafetyHeadReward",
    "build_reward",
    "check_rewards",
    "describe_reward",
]
