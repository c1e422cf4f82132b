# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Layer-wise PPO (L-PPO): clip-PPO RLHF whose rollouts read image features from a chosen vision-encoder layer.

One PPO step:

1. draw a batch of prompts and the target layer `l` (one per run, or one per step from a set);
2. roll out: `policy.generate(..., vision_feature_layer=l, do_sample=True)` (SafeVLM: `safety_gating=False`, since
   the LLM itself is what is being trained);
3. score the responses with the reward; compute the log-probabilities of the sampled tokens under the policy and the
   frozen reference (the initial policy: LoRA adapters disabled, or a frozen copy when the whole LLM is trained), and
   the value head's estimates, all with the LLM reading layer `l`;
4. per-token rewards = `-kl_coef * KL_t` + the score on the last token; GAE advantages and returns;
5. `ppo_epochs` passes of mini-batch updates of the clipped surrogate + `vf_coef` x value loss - `entropy_coef` x
   entropy, with gradient clipping.

Only the LLM learns (LoRA adapters by default, via PEFT) together with a small value head on its final hidden states;
the vision encoder, the projector(s) and SafeVLM's safety modules are frozen. Checkpoints hold the adapters (or LLM
weights), the value head, the optimizer and scheduler, the RNG states and the step, and resuming from one reproduces
the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from .early_exit import early_exit_for
from .icet import decode_responses, generate_at_layer, is_safevlm, resolve_layers, vision_encoder_depth
from .lppo_config import LPPOConfig
from .ppo_math import (
    clipped_policy_loss,
    compute_gae,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    value_loss,
)
from .prompts import check_items, encode_items
from .rewards import check_rewards, describe_reward


CHECKPOINT_PREFIX = "checkpoint-"
LOG_FILE = "lppo_log.jsonl"
STATE_FILE = "trainer_state.json"
VALUE_HEAD_FILE = "value_head.safetensors"
LLM_WEIGHTS_FILE = "llm_weights.safetensors"
ADAPTER_DIR = "adapter"


class ValueHead(nn.Module):
    """`V(s_t)`: a linear map from the LLM's final hidden state at each position to a scalar (kept in float32).

    Zero-initialised, so the first value estimates are 0 and the first advantages are the plain returns.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.float()).squeeze(-1)


@dataclass
class Rollout:
    """One rollout batch, everything the PPO updates need (tensors are `(batch, response_length)` unless noted)."""

    layer: int
    items: list[Any]
    inputs: dict[str, Any]  # processor inputs of the prompts (left-padded)
    has_image: list[bool]
    responses: torch.Tensor  # sampled token ids, right-padded
    mask: torch.Tensor  # 1 up to and including each row's EOS
    texts: list[str]
    scores: torch.Tensor  # (batch,)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def response_mask(responses: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """1 for every generated token up to and including the first EOS of its row, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(responses, dtype=torch.float32)
    eos_ids = torch.tensor(list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    is_eos = torch.isin(responses, eos_ids.to(responses.device))
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before position t
    return (eos_before == 0).float()


def _select_rows(
    inputs: dict[str, Any], rows: Sequence[int], has_image: Sequence[bool], image_keys: Sequence[str]
) -> dict[str, Any]:
    """The processor inputs of some prompt rows (`image_keys` are indexed by the rows that have an image)."""
    image_index, count = {}, 0
    for row, flag in enumerate(has_image):
        if flag:
            image_index[row] = count
            count += 1
    selected: dict[str, Any] = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            selected[key] = value
        elif key in image_keys:
            images = [image_index[r] for r in rows if r in image_index]
            if images:
                selected[key] = value[images]
        else:
            selected[key] = value[list(rows)]
    return selected


def _latest_checkpoint(output_dir: Path) -> Path | None:
    steps = [
        (int(match.group(1)), path)
        for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if (match := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)) and (path / STATE_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


class LPPOTrainer:
    """Layer-wise PPO on a LLaVA-style model or a SafeVLM (see the module docstring for the algorithm).

    Args:
        model: a `LlavaForConditionalGeneration`-style model or a SafeVLM. It is modified in place: LoRA adapters are
            injected (the trainer's `policy` is the PEFT wrapper), or its LLM is trained directly.
        processor: its processor (with a chat template).
        config: an :class:`LPPOConfig`.
        train_items: the training prompts (objects with `.prompt` and `.image`, e.g. `PromptItem`/`BenchmarkItem`).
        reward: `callable(prompts, responses, items) -> list[float]` (see :mod:`~safevlm_hf.layerwise.rewards`).

    Example:

    ```python
    >>> from safevlm_hf.layerwise import LPPOConfig, LPPOTrainer, RefusalReward
    >>> trainer = LPPOTrainer(model, processor, LPPOConfig(output_dir="out", layers=8), items, RefusalReward("string"))
    >>> history = trainer.train()
    >>> trainer.save_model("out/final")
    ```
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: LPPOConfig,
        train_items: Sequence[Any],
        reward: Callable[[Sequence[str], Sequence[str], Sequence[Any]], Sequence[float]],
    ):
        self.config = config
        self.processor = processor
        self.items = check_items(train_items, "L-PPO training prompt set")
        if not callable(reward):
            raise TypeError(
                f"reward must be callable(prompts, responses, items) -> list[float], got {type(reward).__name__}."
            )
        self.reward = reward
        self.num_layers = vision_encoder_depth(model)
        self.layers = resolve_layers(config.layers, self.num_layers)
        self.is_safevlm = is_safevlm(model)
        self.output_dir = Path(config.output_dir)
        self.device = next(model.parameters()).device
        tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_token_id = model.generation_config.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        # The image placeholder must never be sampled: a response containing it would no longer match the number of
        # image features. It is banned both in generate() and in the log-probabilities, so both use one distribution.
        image_token_id = getattr(model.config, "image_token_id", None)
        vocabulary = model.get_output_embeddings().weight.shape[0]  # Llama 3.2 Vision's image token has no logit
        self.banned_token_ids = [image_token_id] if image_token_id is not None and image_token_id < vocabulary else []

        set_seed(config.seed)  # LoRA and value-head initialisation are part of the run's seeded state
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if config.use_lora:
            self.policy = self._wrap_with_lora(model)
            self.reference = None  # the policy with its adapters disabled
        else:
            self.reference = copy.deepcopy(model).eval()
            self.policy = model
            for name, parameter in model.named_parameters():
                if self._is_llm_parameter(name):
                    parameter.requires_grad_(True)
        hidden_size = model.config.text_config.hidden_size
        self.value_head = ValueHead(hidden_size).to(self.device)
        policy_parameters = [p for p in self.policy.parameters() if p.requires_grad]
        if not policy_parameters:
            raise ValueError("No trainable LLM parameter was found; check lora_target_modules / the model's layout.")
        value_head_lr = config.value_head_learning_rate or config.learning_rate
        self.optimizer = torch.optim.AdamW(
            [
                {"params": policy_parameters, "lr": config.learning_rate},
                {"params": list(self.value_head.parameters()), "lr": value_head_lr},
            ],
            weight_decay=config.weight_decay,
        )
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.step = 0
        self.log_history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ the policy
    @staticmethod
    def _is_llm_parameter(name: str) -> bool:
        name = name.removeprefix("base_model.model.")
        return name.startswith("model.language_model.") or name.startswith("lm_head.")

    def _wrap_with_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        wanted = self.config.lora_target_modules
        targets = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and name.startswith("model.language_model.")
            and (wanted is None or name.rsplit(".", 1)[-1] in wanted)
        ]
        if not targets:
            raise ValueError(
                f"No linear layer of the LLM (model.language_model.*) matches lora_target_modules={wanted!r}; "
                "use short layer names such as ['q_proj', 'v_proj'], or None for every linear layer of the LLM."
            )
        lora_config = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=targets,  # full module names: never the vision tower, the projector(s) or safety modules
            bias="none",
        )
        return get_peft_model(model, lora_config)

    def _reference_context(self):
        # With LoRA the reference is the policy itself with its adapters switched off (no second copy in memory).
        return self.policy.disable_adapter() if self.reference is None else contextlib.nullcontext()

    def _forward(
        self,
        model: Any,
        rollout_inputs: dict[str, Any],
        responses: torch.Tensor,
        mask: torch.Tensor,
        layer: int,
        with_values: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (temperature-scaled) of the response positions and, optionally, the value estimates there."""
        input_ids = torch.cat([rollout_inputs["input_ids"], responses], dim=1)
        prompt_mask = rollout_inputs["attention_mask"]
        attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
        # The same position ids generate() derives from the attention mask (left padding does not shift positions).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        early_exit = early_exit_for(model)
        extra = {k: v for k, v in rollout_inputs.items() if k not in ("input_ids", "attention_mask")}
        extra = early_exit.extend_token_inputs(extra, input_ids.shape[1])  # e.g. mllama's cross-attention mask
        if self.is_safevlm:
            extra["compute_safety"] = False  # the LLM alone is being scored; the safety head is not needed
        with early_exit.at(layer) as exit_kwargs:  # the LLM reads vision layer `layer`, as in the rollout
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=with_values,
                use_cache=False,
                **exit_kwargs,
                **extra,
            )
        prompt_length = rollout_inputs["input_ids"].shape[1]
        length = responses.shape[1]
        logits = outputs.logits[:, prompt_length - 1 : prompt_length - 1 + length].float() / self.config.temperature
        if self.banned_token_ids:
            logits[..., self.banned_token_ids] = torch.finfo(logits.dtype).min
        values = None
        if with_values:
            values = self.value_head(outputs.hidden_states[-1][:, prompt_length - 1 : prompt_length - 1 + length])
        return logits, values

    # ------------------------------------------------------------------------------------------------- schedule
    def batch_indices(self, step: int) -> list[int]:
        """The prompt rows of PPO step `step` (0-based): successive seeded permutations of the prompt set."""
        size, total = self.config.rollout_batch_size, len(self.items)
        rows = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, total)
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            rows.append(int(torch.randperm(total, generator=generator)[offset]))
        return rows

    def layer_for_step(self, step: int) -> int:
        """The vision layer of PPO step `step`: the only one, the next in order (`cycle`) or a seeded draw."""
        if len(self.layers) == 1:
            return self.layers[0]
        if self.config.layer_sampling == "cycle":
            return self.layers[step % len(self.layers)]
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + step)
        return self.layers[int(torch.randint(len(self.layers), (1,), generator=generator))]

    # -------------------------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def rollout(self, items: Sequence[Any], layer: int) -> Rollout:
        """Sample responses at `layer`, score them and compute log-probabilities, values, KL and advantages."""
        config = self.config
        self.policy.eval()
        inputs = encode_items(self.processor, items, self.device)
        has_image = [getattr(item, "image", None) is not None for item in items]
        responses = generate_at_layer(
            self.policy,
            self.processor,
            inputs,
            layer,
            max_new_tokens=config.max_new_tokens,
            gating=False if self.is_safevlm else None,
            do_sample=True,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            suppress_tokens=self.banned_token_ids or None,
        )
        mask = response_mask(responses, self.eos_token_id)
        responses = responses.masked_fill(mask == 0, self.pad_token_id)
        texts = decode_responses(self.processor, responses)
        prompts = [item.prompt for item in items]
        scores = torch.tensor(
            check_rewards(self.reward(prompts, texts, list(items)), len(items), "the reward"), dtype=torch.float32
        ).to(self.device)
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)

        logits, values = self._forward(self.policy, inputs, responses, mask, layer, with_values=True)
        logprobs = logprobs_from_logits(logits, responses)
        with self._reference_context():
            reference = self.reference if self.reference is not None else self.policy
            ref_logits, _ = self._forward(reference, inputs, responses, mask, layer, with_values=False)
        ref_logprobs = logprobs_from_logits(ref_logits, responses)
        rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, config.kl_coef, config.kl_estimator)
        advantages, returns = compute_gae(rewards, values * mask, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return Rollout(
            layer=layer,
            items=list(items),
            inputs=inputs,
            has_image=has_image,
            responses=responses,
            mask=mask,
            texts=texts,
            scores=scores,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values * mask,
            kl=kl,
            advantages=advantages,
            returns=returns,
        )

    # --------------------------------------------------------------------------------------------------- updates
    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of mini-batch clipped-PPO updates over one rollout; returns mean diagnostics."""
        config = self.config
        self.policy.train()
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        names = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy")
        stats: dict[str, list[float]] = {name: [] for name in names}
        rows = rollout.responses.shape[0]
        stopped_early = False
        for _ in range(config.ppo_epochs):
            if stopped_early:
                break
            order = torch.randperm(rows).tolist()
            for start in range(0, rows, config.mini_batch_size):
                batch = order[start : start + config.mini_batch_size]
                mask, responses = rollout.mask[batch], rollout.responses[batch]
                image_keys = early_exit_for(self.policy).image_indexed_inputs
                inputs = _select_rows(rollout.inputs, batch, rollout.has_image, image_keys)
                logits, values = self._forward(self.policy, inputs, responses, mask, rollout.layer, with_values=True)
                logprobs = logprobs_from_logits(logits, responses)
                policy = clipped_policy_loss(
                    logprobs, rollout.logprobs[batch], rollout.advantages[batch], mask, config.clip_eps
                )
                v_loss, v_clip = value_loss(
                    values, rollout.values[batch], rollout.returns[batch], mask, config.value_clip
                )
                entropy = masked_mean(entropy_from_logits(logits), mask)
                loss = policy.loss + config.vf_coef * v_loss - config.entropy_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                self.optimizer.step()
                for key, value in (
                    ("policy_loss", policy.loss),
                    ("value_loss", v_loss),
                    ("clip_fraction", policy.clip_fraction),
                    ("value_clip_fraction", v_clip),
                    ("approx_kl", policy.approx_kl),
                    ("entropy", entropy),
                ):
                    stats[key].append(float(value.detach()))
                if config.target_kl is not None and float(policy.approx_kl) > 1.5 * config.target_kl:
                    stopped_early = True  # the policy moved too far from the one that sampled the rollout
                    break
        self.scheduler.step()
        self.policy.eval()
        summary = {key: sum(values) / len(values) for key, values in stats.items()}
        summary["updates"] = len(stats["policy_loss"])
        return summary

    def train_step(self) -> dict[str, Any]:
        """Run PPO step `self.step` (rollout + updates) and return its log entry."""
        layer = self.layer_for_step(self.step)
        items = [self.items[i] for i in self.batch_indices(self.step)]
        rollout = self.rollout(items, layer)
        update = self.ppo_update(rollout)
        self.step += 1
        sequence_kl = (rollout.kl * rollout.mask).sum(-1)
        return {
            "step": self.step,
            "layer": layer,
            "reward": float(rollout.scores.mean()),
            "reward_std": float(rollout.scores.std(unbiased=False)),
            "kl": float(sequence_kl.mean()),
            "non_score_reward": float(-self.config.kl_coef * sequence_kl.mean()),
            "clip_fraction": update["clip_fraction"],
            "value_loss": update["value_loss"],
            "value_clip_fraction": update["value_clip_fraction"],
            "entropy": update["entropy"],
            "policy_loss": update["policy_loss"],
            "approx_kl": update["approx_kl"],
            "updates": update["updates"],
            "response_length": float(rollout.mask.sum(-1).mean()),
            "learning_rate": self.scheduler.get_last_lr()[0],
        }

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> list[dict[str, Any]]:
        """Train to `config.max_steps`; returns the log history (one entry per logged step).

        `resume_from_checkpoint=True` resumes from the newest checkpoint in `output_dir` (starting fresh when there is
        none); a path resumes from that checkpoint.
        """
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from_checkpoint:
            checkpoint = (
                _latest_checkpoint(self.output_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            )
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
            elif resume_from_checkpoint is not True:
                raise FileNotFoundError(f"Checkpoint {resume_from_checkpoint} does not exist.")
        self._rewrite_log()
        progress = tqdm(total=config.max_steps, initial=self.step, desc="L-PPO", disable=not config.show_progress)
        try:
            while self.step < config.max_steps:
                entry = self.train_step()
                if self.step % config.logging_steps == 0 or self.step == config.max_steps:
                    self.log_history.append(entry)
                    with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as log:
                        log.write(json.dumps(entry) + "\n")
                progress.update(1)
                progress.set_postfix(layer=entry["layer"], reward=f"{entry['reward']:.3f}", kl=f"{entry['kl']:.3f}")
                if (config.save_steps and self.step % config.save_steps == 0) or self.step == config.max_steps:
                    self.save_checkpoint()
        finally:
            progress.close()
        return self.log_history

    def _rewrite_log(self) -> None:
        """Make the JSONL log match the in-memory history (drops steps logged after the checkpoint resumed from)."""
        with open(self.output_dir / LOG_FILE, "w", encoding="utf-8") as log:
            for entry in self.log_history:
                log.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def mean_reward(
        self, items: Sequence[Any] | None = None, layer: int | None = None, *, batch_size: int = 16
    ) -> float:
        """Mean reward of the current policy's greedy answers on `items` (default: the training prompts) at `layer`
        (default: the first target layer)."""
        items = check_items(items if items is not None else self.items)
        layer = self.layers[0] if layer is None else resolve_layers(layer, self.num_layers)[0]
        self.policy.eval()
        scores: list[float] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inputs = encode_items(self.processor, chunk, self.device)
            tokens = generate_at_layer(
                self.policy,
                self.processor,
                inputs,
                layer,
                max_new_tokens=self.config.max_new_tokens,
                gating=False if self.is_safevlm else None,
                do_sample=False,
                suppress_tokens=self.banned_token_ids or None,
            )
            texts = decode_responses(self.processor, tokens)
            rewards = self.reward([item.prompt for item in chunk], texts, list(chunk))
            scores.extend(check_rewards(rewards, len(chunk), "the reward"))
        return sum(scores) / len(scores)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.policy.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-<step>/`: adapters (or LLM weights), value head, optimizer, scheduler, RNG
        states and the trainer state (step, log history, config)."""
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        path.mkdir(parents=True, exist_ok=True)
        if self.config.use_lora:
            self.policy.save_pretrained(path / ADAPTER_DIR)
        else:
            save_file(self._trainable_state(), str(path / LLM_WEIGHTS_FILE))
        self._save_value_head(path)
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, path / "rng_state.pth")
        state = {
            "step": self.step,
            "log_history": self.log_history,
            "layers": self.layers,
            "config": self.config.to_dict(),
            "reward": describe_reward(self.reward),
            "num_prompts": len(self.items),
        }
        (path / STATE_FILE).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
        self._rotate_checkpoints()
        return path

    def _save_value_head(self, folder: Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.value_head.state_dict().items()}
        save_file(state, str(folder / VALUE_HEAD_FILE))

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if limit is None:
            return
        checkpoints = sorted(
            (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
            for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        )
        for _, old in checkpoints[:-limit]:
            shutil.rmtree(old)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (the trainer must be built with the same config)."""
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an L-PPO checkpoint (no {STATE_FILE}).")
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if state["layers"] != self.layers:
            raise ValueError(
                f"Checkpoint {path} trained layers {state['layers']}, but this trainer targets {self.layers}; resume "
                "with the same `layers`."
            )
        if self.config.use_lora:
            from peft import set_peft_model_state_dict

            adapter_file = path / ADAPTER_DIR / "adapter_model.safetensors"
            if not adapter_file.is_file():
                raise FileNotFoundError(f"{adapter_file} is missing; was the checkpoint written with use_lora=False?")
            result = set_peft_model_state_dict(self.policy, load_file(str(adapter_file), device=str(self.device)))
            if result.unexpected_keys:
                raise ValueError(
                    f"Adapter weights in {adapter_file} do not fit this model: {result.unexpected_keys[:5]}."
                )
        else:
            weights = path / LLM_WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} is missing; was the checkpoint written with use_lora=True?")
            saved = load_file(str(weights), device=str(self.device))
            parameters = dict(self.policy.named_parameters())
            with torch.no_grad():
                for name, tensor in saved.items():
                    if name not in parameters:
                        raise ValueError(f"{weights} holds {name!r}, which this model does not have.")
                    parameters[name].copy_(tensor)
        self.value_head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng_state.pth", weights_only=False)  # our own file: python/numpy states are pickled
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self.log_history = list(state["log_history"])

    def save_model(self, path: str | os.PathLike, merge: bool = True) -> Path:
        """Save the trained policy for use: with LoRA, the adapters (`adapter/`) and, if `merge`, a plain checkpoint
        of the merged model; without LoRA, the model. The processor, the value head and the config go beside it.

        Merging works on a copy, so the trainer stays usable (this needs memory for a second copy of the model).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.config.use_lora:
            self.policy.save_pretrained(path / ADAPTER_DIR)
            if merge:
                copy.deepcopy(self.policy).merge_and_unload().save_pretrained(path)
        else:
            self.policy.save_pretrained(path)
        if hasattr(self.processor, "save_pretrained") and (merge or not self.config.use_lora):
            self.processor.save_pretrained(path)
        self._save_value_head(path)
        self.config.to_json_file(path / "lppo_config.json")
        return path


__all__ = ["LPPOTrainer", "Rollout", "ValueHead", "response_mask"]
