# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Layer-wise PPO (L-PPO): clip-PPO RLHF whose rollouts read image features from a chosen vision-encoder layer.

One PPO step:

1. draw a batch of prompts and the target layer `l` (one per run, or one per step from a set);
2. roll out: `policy.generate(..., do_sample=True)` with the LLM reading vision layer `l` (the model family's early
   exit, :mod:`~safevlm_hf.layerwise.early_exit`; SafeVLM: `safety_gating=False`, since the LLM itself is what is
   being trained), each row sampled from its own seeded random stream;
3. score the responses with the reward; compute the log-probabilities of the sampled tokens under the policy and the
   frozen reference (the initial policy: LoRA adapters disabled, or - when the whole LLM is trained - a frozen copy
   kept on the CPU and streamed to the GPU layer by layer), and the value head's estimates, all at layer `l`;
4. per-token rewards = `-kl_coef * KL_t` + the score on the last token; GAE advantages and returns;
5. `ppo_epochs` passes of mini-batch updates of the clipped surrogate + `vf_coef` x value loss - `entropy_coef` x
   entropy, with gradient clipping.

Only the LLM learns (LoRA adapters by default, via PEFT, targeted by the training package's
:func:`~safevlm_hf.training.llm_lora_config`) together with a small value head on its final hidden states; the vision
encoder, the projector(s) and SafeVLM's safety modules are frozen.

**Data parallel.** The loop runs on `accelerate`: under `accelerate launch` / `torchrun` each process rolls out its
share of the step's prompts, the rollout is gathered, and each process takes its share of every mini-batch, with
losses normalized over the whole mini-batch, so N processes take the same steps as one process with the same
`rollout_batch_size` and `mini_batch_size` (each a multiple of N). Sampling is seeded per prompt row, not per
process, for the same reason. Checkpoints are `accelerate`'s (`save_state`: optimizer, scheduler, every process's RNG
states) plus the trained weights only (adapters or LLM weights, and the value head); resuming reproduces the
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, get_scheduler, set_seed
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..training.stages import (
    LLM_PREFIX,
    apply_llm_lora,
    freeze_for_full_stage2,
    llm_lora_config,
    record_training_stage,
)
from .early_exit import early_exit_for
from ..prompting import decode_responses, encode_items, is_safevlm
from .icet import generate_at_layer, resolve_layers
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
from .prompts import check_items
from .rewards import check_rewards, describe_reward


CHECKPOINT_PREFIX = f"{PREFIX_CHECKPOINT_DIR}-"
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
    inputs: dict[str, Any]  # processor inputs of the prompts (left-padded)
    has_image: list[bool]
    responses: torch.Tensor  # sampled token ids, right-padded
    mask: torch.Tensor  # 1 up to and including each row's EOS
    scores: torch.Tensor  # (batch,)
    logprobs: torch.Tensor
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


def mean_update_statistics(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The approximate KL and clip fraction of a run's logged steps, each a mean per update: whether the policy moved at
    all. `nan` for an empty log. The one average the run's record and `safevlm lppo`'s summary both report."""
    return {
        key: sum(entry[key] for entry in history) / len(history) if history else float("nan")
        for key in ("approx_kl", "clip_fraction")
    }


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


def _stream_seed(*parts: int) -> int:
    """A seed for a random stream named by integers (stable across processes, unlike `hash` of strings)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class PolicyWithValueHead(nn.Module):
    """The trained policy and its value head as one module, so that data parallelism (DDP) wraps and syncs both."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.policy(**inputs, output_hidden_states=True, use_cache=False)
        return outputs.logits, self.value_head(outputs.hidden_states[-1])


class RowSeededSampler(LogitsProcessor):
    """Sample each row's next token from its own `torch.Generator` (seeded per prompt row and step).

    With the global random stream, a row's sample would depend on which other rows share its batch - and so on the
    number of processes. Returned as a one-hot distribution, so `generate(do_sample=True)` keeps the choice. Applies
    the temperature / top-k / top-p itself, the one place they are applied: transformers runs its own warpers after
    custom processors, on the one-hot choice, so the trainer passes `generate` neutral values for them.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_k: int, top_p: float):
        self.generators = list(generators)
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, chosen[:, None].to(scores.device), 0.0)


class LPPOTrainer:
    """Layer-wise PPO on LLaVA-1.5, LLaVA-NeXT, Llama 3.2 Vision or a SafeVLM (see the module docstring).

    Args:
        model: a `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
            `MllamaForConditionalGeneration` or a SafeVLM. It is modified in place: LoRA adapters are
            injected (the trainer's `policy` is the PEFT wrapper), or its LLM is trained directly. The trainer moves
            it to its process's device.
        processor: its processor (with a chat template).
        config: an :class:`LPPOConfig`.
        train_items: the training prompts (objects with `.prompt` and `.image`, e.g. `PromptItem`/`BenchmarkItem`).
        reward: `callable(prompts, responses, items) -> list[float]` (see :mod:`~safevlm_hf.layerwise.rewards`).
        eval_items: held-out prompts; when given, `train()` scores the policy's greedy answers to them (mean reward at
            the first target layer) before the first step and after the last, into `eval_history`: the same prompts
            before and after, unlike the rollout reward, whose batches hold different prompts.
        data_name: where the training prompts came from (e.g. the prompt file or benchmark specs), for the record a
            SafeVLM keeps of its training: at the end of `train()` the run is appended to the model's
            `config.safety_training_stages` (stage `"l-ppo"`, data, steps, layers, metrics), which its model card
            shows. Default: the prompts' benchmark names, or their count.

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
        eval_items: Sequence[Any] | None = None,
        data_name: str | None = None,
    ):
        self.config = config
        self.processor = processor
        self.items = check_items(train_items, "L-PPO training prompt set")
        self.eval_items = check_items(eval_items, "L-PPO held-out prompt set") if eval_items is not None else None
        if not callable(reward):
            raise TypeError(
                f"reward must be callable(prompts, responses, items) -> list[float], got {type(reward).__name__}."
            )
        self.reward = reward
        # How this model family's LLM is made to read vision layer l (hooks or kwargs on the model's own modules, so
        # it holds through the PEFT and DDP wrappers); built once, for every rollout, scoring and update.
        self.early_exit = early_exit_for(model)
        self.num_layers = self.early_exit.num_layers
        self.layers = resolve_layers(config.layers, self.num_layers)
        self.is_safevlm = is_safevlm(model)
        sources = sorted({str(item.source) for item in self.items if getattr(item, "source", None)})
        self.data_name = data_name or ", ".join(sources) or f"{len(self.items)} prompts"
        self.stage_record: dict[str, Any] | None = None  # this run's entry in a SafeVLM's safety_training_stages
        self.output_dir = Path(config.output_dir)
        # Without a GPU, several processes (torchrun / accelerate launch) talk over gloo only when told to use the CPU.
        self.accelerator = Accelerator(cpu=config.use_cpu or not torch.cuda.is_available())
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ValueError(
                f"L-PPO runs data-parallel (DDP) only, but accelerate was launched with "
                f"{self.accelerator.distributed_type.value}: its rollouts generate with the whole policy on each GPU. "
                "Launch without a DeepSpeed/FSDP config (e.g. `accelerate launch --multi_gpu`), and use LoRA, "
                "gradient checkpointing and an offloaded reference to fit memory."
            )
        self.device = self.accelerator.device
        processes = self.accelerator.num_processes
        for name in ("rollout_batch_size", "mini_batch_size"):
            if getattr(config, name) % processes:
                raise ValueError(
                    f"LPPOConfig.{name}={getattr(config, name)} is not a multiple of the {processes} processes; each "
                    "process takes an equal share of every batch."
                )
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
        model.requires_grad_(False)
        if config.use_lora:
            lora = llm_lora_config(
                model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
            )
            self.policy = apply_llm_lora(model, lora)
            self.reference = None  # the policy with its adapters disabled: no second copy of the model
            self.reference_early_exit = self.early_exit
        else:
            self.reference = self._frozen_reference(model)
            # The copy needs an early exit of its own: a family's exit may hook the modules of the model it was built
            # for (mllama's does), and the policy's hooks would leave the reference reading its default layer.
            self.reference_early_exit = early_exit_for(self.reference)
            self.policy = model
            if self.is_safevlm:  # Stage II's rule: the input embeddings stay frozen, since the safety head reads them
                freeze_for_full_stage2(model)
            else:
                for name, parameter in model.named_parameters():
                    if name.startswith((LLM_PREFIX, "lm_head.")):
                        parameter.requires_grad_(True)
        if config.activation_checkpointing:
            # On the model itself: PEFT's wrapper forwards the call, and the recompute runs only in train() mode, so
            # rollouts keep their KV cache.
            (self.policy.get_base_model() if config.use_lora else self.policy).activation_checkpointing_enable()
        self.value_head = ValueHead(model.config.text_config.hidden_size)
        policy_parameters = [p for p in self.policy.parameters() if p.requires_grad]
        if not policy_parameters:
            raise ValueError("No trainable LLM parameter was found; check lora_target_modules / the model's layout.")
        value_head_lr = config.value_head_learning_rate or config.learning_rate
        optimizer = torch.optim.AdamW(
            [
                {"params": policy_parameters, "lr": config.learning_rate},
                {"params": list(self.value_head.parameters()), "lr": value_head_lr},
            ],
            weight_decay=config.weight_decay,
        )
        # `prepare` moves the model to this process's device and, with several processes, wraps it for DDP.
        self.model, self.optimizer = self.accelerator.prepare(
            PolicyWithValueHead(self.policy, self.value_head), optimizer
        )
        # Not prepared: a prepared scheduler steps once per process; this one steps once per PPO step.
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.accelerator.register_save_state_pre_hook(self._save_trained_weights)
        self.accelerator.register_load_state_pre_hook(self._load_trained_weights)
        self.step = 0
        self.log_history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ the policy
    def _frozen_reference(self, model: nn.Module) -> nn.Module:
        """The initial policy for the KL term when the whole LLM trains: a frozen copy, kept on the CPU and streamed to
        the device one module at a time (accelerate's `cpu_offload`) unless `offload_reference=False`."""
        model.to("cpu")  # copy on the CPU: never two full copies on the GPU, not even for a moment
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        if self.config.offload_reference:
            from accelerate import cpu_offload

            # The vision encoder is streamed in whole: some (Llama 3.2 Vision's) read a submodule's weight outside
            # that submodule's call (to pick the input device), which per-module offloading leaves on `meta`.
            vision_encoder = type(self.early_exit.vision_encoder()).__name__  # the copy's is of the same class
            return cpu_offload(reference, execution_device=self.device, preload_module_classes=[vision_encoder])
        return reference.to(self.device)

    def _reference_context(self):
        # With LoRA the reference is the policy itself with its adapters switched off (no second copy in memory).
        return self.policy.disable_adapter() if self.reference is None else contextlib.nullcontext()

    def _at_layer(self, model: Any, layer: int, inputs: dict[str, Any], generate: bool = False, **kwargs: Any) -> Any:
        """Run ``model`` - a forward pass, or `generate` for rollouts - with its LLM reading image features from vision
        layer ``layer``: the one place where the target layer is applied."""
        if generate:
            return generate_at_layer(model, self.processor, inputs, layer, early_exit=self.early_exit, **kwargs)
        early_exit = self.reference_early_exit if model is self.reference else self.early_exit
        with early_exit.at(layer) as exit_kwargs:
            return model(**inputs, **exit_kwargs, **kwargs)

    def _sequence_inputs(self, rollout_inputs: dict[str, Any], responses: torch.Tensor, mask: torch.Tensor):
        """Forward inputs of prompt + response, with the position ids generate() derived from the attention mask."""
        input_ids = torch.cat([rollout_inputs["input_ids"], responses], dim=1)
        prompt_mask = rollout_inputs["attention_mask"]
        attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        inputs = {k: v for k, v in rollout_inputs.items() if k not in ("input_ids", "attention_mask")}
        inputs = self.early_exit.extend_token_inputs(inputs, input_ids.shape[1])  # e.g. mllama's cross-attn mask
        inputs.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.is_safevlm:
            inputs["compute_safety"] = False  # the LLM alone is being scored; the safety head is not needed
        return inputs

    def _response_logits(self, logits: torch.Tensor, prompt_length: int, length: int) -> torch.Tensor:
        """Temperature-scaled logits at the response positions, with the banned tokens masked out."""
        logits = logits[:, prompt_length - 1 : prompt_length - 1 + length].float() / self.config.temperature
        if self.banned_token_ids:
            logits[..., self.banned_token_ids] = torch.finfo(logits.dtype).min
        return logits

    def _score(
        self, model: nn.Module, inputs: dict[str, Any], responses: torch.Tensor, mask: torch.Tensor, layer: int
    ):
        """Logits (and, for the policy with its value head, values) of the response positions."""
        length, prompt_length = responses.shape[1], inputs["input_ids"].shape[1]
        output = self._at_layer(model, layer, self._sequence_inputs(inputs, responses, mask))
        if isinstance(output, tuple):  # PolicyWithValueHead
            logits, values = output
            return self._response_logits(logits, prompt_length, length), values[
                :, prompt_length - 1 : prompt_length - 1 + length
            ]
        return self._response_logits(output.logits, prompt_length, length), None

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

    def _local_rows(self, count: int) -> range:
        """This process's contiguous share of `count` rows."""
        share = count // self.accelerator.num_processes
        return range(self.accelerator.process_index * share, (self.accelerator.process_index + 1) * share)

    # -------------------------------------------------------------------------------------------------- rollouts
    def _gather_rows(self, tensor: torch.Tensor, pad: float = 0) -> torch.Tensor:
        """Every process's rows, in global row order (responses are padded to the longest first)."""
        if self.accelerator.num_processes == 1:
            return tensor
        if tensor.dim() > 1:
            tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad)
        return self.accelerator.gather(tensor)

    @torch.no_grad()
    def rollout(self, items: Sequence[Any], layer: int, step: int = 0) -> Rollout:
        """Sample responses at `layer`, score them and compute log-probabilities, values, KL and advantages.

        Each process samples its share of `items`; the returned rollout holds every row. Row `i` of step `step` is
        sampled from a generator seeded with `(seed, step, i)`.
        """
        config = self.config
        self.policy.eval()
        inputs = encode_items(self.processor, items, self.device)  # every row, one padding: as on one process
        has_image = [getattr(item, "image", None) is not None for item in items]
        rows = self._local_rows(len(items))
        local = _select_rows(inputs, rows, has_image, self.early_exit.image_indexed_inputs)
        generators = [torch.Generator().manual_seed(_stream_seed(config.seed, step, row)) for row in rows]
        responses = self._at_layer(
            self.policy,
            layer,
            local,
            generate=True,
            max_new_tokens=config.max_new_tokens,
            gating=False if self.is_safevlm else None,
            do_sample=True,
            # The sampler applies temperature / top-k / top-p and draws the token; neutral values keep generate()
            # (and the model's generation_config) from adding warpers of its own after that draw.
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            suppress_tokens=self.banned_token_ids or None,
            logits_processor=[RowSeededSampler(generators, config.temperature, config.top_k, config.top_p)],
        )
        mask = response_mask(responses, self.eos_token_id)
        responses = responses.masked_fill(mask == 0, self.pad_token_id)
        texts = decode_responses(self.processor, responses)
        local_items = [items[row] for row in rows]
        scores = torch.tensor(
            check_rewards(
                self.reward([item.prompt for item in local_items], texts, local_items), len(rows), "the reward"
            ),
            dtype=torch.float32,
        ).to(self.device)
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)

        model = self.accelerator.unwrap_model(self.model)
        logits, values = self._score(model, local, responses, mask, layer)
        values = values * mask  # no value estimate after a row's EOS
        logprobs = logprobs_from_logits(logits, responses)
        with self._reference_context():
            reference = self.reference if self.reference is not None else self.policy
            ref_logits, _ = self._score(reference, local, responses, mask, layer)
        ref_logprobs = logprobs_from_logits(ref_logits, responses)
        rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, config.kl_coef, config.kl_estimator)
        advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)

        gathered = {
            "responses": self._gather_rows(responses, pad=self.pad_token_id),
            **{
                name: self._gather_rows(tensor)
                for name, tensor in dict(
                    mask=mask,
                    scores=scores,
                    logprobs=logprobs,
                    values=values,
                    kl=kl,
                    advantages=advantages,
                    returns=returns,
                ).items()
            },
        }
        if config.whiten_advantages:  # over the whole batch, as on one process
            gathered["advantages"] = masked_whiten(gathered["advantages"], gathered["mask"])
        return Rollout(layer=layer, inputs=inputs, has_image=has_image, **gathered)

    # --------------------------------------------------------------------------------------------------- updates
    def _global_mean(self, local_sum: torch.Tensor) -> float:
        """Sum of a per-process value over every process."""
        if self.accelerator.num_processes == 1:
            return float(local_sum)
        return float(self.accelerator.reduce(local_sum.detach().reshape(1), reduction="sum"))

    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of mini-batch clipped-PPO updates over one rollout; returns mean diagnostics.

        Mini-batches are drawn from a permutation seeded by the step and epoch; each process takes its share of a
        mini-batch, and every loss term is a token mean over the whole mini-batch (so the data-parallel gradient equals
        the single-process one).
        """
        config = self.config
        self.model.train()
        names = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy")
        stats: dict[str, list[float]] = {name: [] for name in names}
        rows = rollout.responses.shape[0]
        processes = self.accelerator.num_processes
        stopped_early = False
        for epoch in range(config.ppo_epochs):
            if stopped_early:
                break
            generator = torch.Generator().manual_seed(_stream_seed(config.seed, self.step, epoch, -1))
            order = torch.randperm(rows, generator=generator).tolist()
            for start in range(0, rows, config.mini_batch_size):
                mini_batch = order[start : start + config.mini_batch_size]
                batch = [mini_batch[i] for i in self._local_rows(len(mini_batch))]
                mask, responses = rollout.mask[batch], rollout.responses[batch]
                # This process's share of the mini-batch's tokens; DDP averages over processes, hence x processes.
                share = mask.sum() / rollout.mask[mini_batch].sum() * processes
                inputs = _select_rows(rollout.inputs, batch, rollout.has_image, self.early_exit.image_indexed_inputs)
                logits, values = self._score(self.model, inputs, responses, mask, rollout.layer)
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
                self.accelerator.backward(loss * share)
                if config.max_grad_norm is not None:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                for key, value in (
                    ("policy_loss", policy.loss),
                    ("value_loss", v_loss),
                    ("clip_fraction", policy.clip_fraction),
                    ("value_clip_fraction", v_clip),
                    ("approx_kl", policy.approx_kl),
                    ("entropy", entropy),
                ):
                    stats[key].append(self._global_mean(value.detach() * share / processes))
                if config.target_kl is not None and stats["approx_kl"][-1] > 1.5 * config.target_kl:
                    stopped_early = True  # the policy moved too far from the one that sampled the rollout
                    break
        self.scheduler.step()
        self.model.eval()
        summary = {key: sum(values) / len(values) for key, values in stats.items()}
        summary["updates"] = len(stats["policy_loss"])
        return summary

    def train_step(self) -> dict[str, Any]:
        """Run PPO step `self.step` (rollout + updates) and return its log entry."""
        layer = self.layer_for_step(self.step)
        items = [self.items[i] for i in self.batch_indices(self.step)]
        rollout = self.rollout(items, layer, self.step)
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
        main = self.accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from_checkpoint:
            checkpoint = (
                get_last_checkpoint(str(self.output_dir)) if resume_from_checkpoint is True else resume_from_checkpoint
            )
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
        if self.eval_items is not None and not self.eval_history:
            self.eval_history.append(self._evaluation_entry())
        if main:
            self._rewrite_log()
        progress = tqdm(
            total=config.max_steps, initial=self.step, desc="L-PPO", disable=not (config.show_progress and main)
        )
        try:
            while self.step < config.max_steps:
                entry = self.train_step()
                if self.step % config.logging_steps == 0 or self.step == config.max_steps:
                    self.log_history.append(entry)
                    if main:
                        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as log:
                            log.write(json.dumps(entry) + "\n")
                progress.update(1)
                progress.set_postfix(layer=entry["layer"], reward=f"{entry['reward']:.3f}", kl=f"{entry['kl']:.3f}")
                if self.step == config.max_steps and self.eval_items is not None:
                    self.eval_history.append(self._evaluation_entry())
                if (config.save_steps and self.step % config.save_steps == 0) or self.step == config.max_steps:
                    self.save_checkpoint()
        finally:
            progress.close()
        if self.is_safevlm:  # only SafeVLM configs keep (and model cards show) a training history
            self.stage_record = record_training_stage(self.policy, self._stage_entry())
        return self.log_history

    def _stage_entry(self) -> dict[str, Any]:
        config, history = self.config, self.log_history
        metrics: dict[str, Any] = {}
        if history:
            metrics["reward_last_step"] = round(history[-1]["reward"], 6)
            for key, value in mean_update_statistics(history).items():
                metrics[f"mean_{key}"] = round(value, 9)
        if len(self.eval_history) >= 2:  # the same held-out prompts before and after
            metrics["heldout_reward_before"] = round(self.eval_history[0]["reward"], 6)
            metrics["heldout_reward_after"] = round(self.eval_history[-1]["reward"], 6)
            metrics["heldout_prompts"] = self.eval_history[0]["num_prompts"]
        return {
            "stage": "l-ppo",
            "data": self.data_name,
            "rows": len(self.items),
            "steps": self.step,
            "layers": list(self.layers),
            "mode": "lora" if config.use_lora else "full",
            "reward": describe_reward(self.reward),
            "learning_rate": config.learning_rate,
            "kl_coef": config.kl_coef,
            "seed": config.seed,
            "metrics": metrics,
        }

    def _rewrite_log(self) -> None:
        """Make the JSONL log match the in-memory history (drops steps logged after the checkpoint resumed from)."""
        with open(self.output_dir / LOG_FILE, "w", encoding="utf-8") as log:
            for entry in self.log_history:
                log.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------------------------------------ evaluation
    def _evaluation_entry(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "layer": self.layers[0],
            "num_prompts": len(self.eval_items),
            "reward": self.mean_reward(self.eval_items),
        }

    @torch.no_grad()
    def mean_reward(
        self, items: Sequence[Any] | None = None, layer: int | None = None, *, batch_size: int = 16
    ) -> float:
        """Mean reward of the current policy's greedy answers on `items` (default: the training prompts) at `layer`
        (default: the first target layer). With several processes, each answers its share of the items."""
        items = check_items(items if items is not None else self.items)
        layer = self.layers[0] if layer is None else resolve_layers(layer, self.num_layers)[0]
        self.policy.eval()
        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        share = items[index * len(items) // processes : (index + 1) * len(items) // processes]
        scores: list[float] = []
        for start in range(0, len(share), batch_size):
            chunk = share[start : start + batch_size]
            tokens = self._at_layer(
                self.policy,
                layer,
                encode_items(self.processor, chunk, self.device),
                generate=True,
                max_new_tokens=self.config.max_new_tokens,
                gating=False if self.is_safevlm else None,
                do_sample=False,
                suppress_tokens=self.banned_token_ids or None,
            )
            texts = decode_responses(self.processor, tokens)
            rewards = self.reward([item.prompt for item in chunk], texts, list(chunk))
            scores.extend(check_rewards(rewards, len(chunk), "the reward"))
        if processes > 1:
            scores = gather_object(scores)
        return sum(scores) / len(scores)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-<step>/`: accelerate's state (optimizer, scheduler, every process's RNG
        states), the trained weights (adapters or LLM weights, and the value head) and the trainer state (step, log
        history, config). The state file is written last: its presence marks a complete checkpoint."""
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.save_state(str(path))
        if self.accelerator.is_main_process:
            state = {
                "step": self.step,
                "log_history": self.log_history,
                "eval_history": self.eval_history,
                "layers": self.layers,
                "config": self.config.to_dict(),
                "reward": describe_reward(self.reward),
                "num_prompts": len(self.items),
            }
            (path / STATE_FILE).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()
        return path

    def _save_trained_weights(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        """accelerate `save_state` hook: write only what trains (not the frozen model), on the main process."""
        folder = Path(output_dir)
        if self.accelerator.is_main_process:
            if self.config.use_lora:
                self.policy.save_pretrained(folder / ADAPTER_DIR)
            else:
                trained = {
                    n: p.detach().cpu().contiguous() for n, p in self.policy.named_parameters() if p.requires_grad
                }
                save_file(trained, str(folder / LLM_WEIGHTS_FILE))
            self._save_value_head(folder)
        weights.clear()  # accelerate would otherwise save the whole model, frozen weights included

    def _load_trained_weights(self, models: list[nn.Module], input_dir: str) -> None:
        """accelerate `load_state` hook: restore the trained weights written by :meth:`_save_trained_weights`."""
        path = Path(input_dir)
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
            parameters = dict(self.policy.named_parameters())
            with torch.no_grad():
                for name, tensor in load_file(str(weights), device=str(self.device)).items():
                    if name not in parameters:
                        raise ValueError(f"{weights} holds {name!r}, which this model does not have.")
                    parameters[name].copy_(tensor)
        self.value_head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE), device=str(self.device)))
        models.clear()  # restored above: accelerate has no model file to load

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
            raise FileNotFoundError(
                f"{path} is not a complete L-PPO checkpoint (no {STATE_FILE}); delete it to resume from an earlier one."
            )
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if state["layers"] != self.layers:
            raise ValueError(
                f"Checkpoint {path} trained layers {state['layers']}, but this trainer targets {self.layers}; resume "
                "with the same `layers`."
            )
        self.accelerator.load_state(str(path))
        self.step = int(state["step"])
        self.log_history = list(state["log_history"])
        self.eval_history = list(state.get("eval_history", []))

    def save_model(self, path: str | os.PathLike, merge: bool = True) -> Path:
        """Save the trained policy for use: with LoRA, the adapters (`adapter/`) and, if `merge`, a plain checkpoint
        of the merged model; without LoRA, the model. The processor, the value head and the config go beside it.
        Only the main process writes.

        Merging works on a copy, so the trainer stays usable (this needs memory for a second copy of the model).
        """
        path = Path(path)
        if self.accelerator.is_main_process:
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
        self.accelerator.wait_for_everyone()
        return path


__all__ = [
    "LPPOTrainer",
    "PolicyWithValueHead",
    "Rollout",
    "RowSeededSampler",
    "ValueHead",
    "mean_update_statistics",
    "response_mask",
]
