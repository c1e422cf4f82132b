# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The logits processor that enforces SafeVLM verdicts during decoding.

Travels inside every SafeVLM checkpoint: imports only torch/transformers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from transformers.generation import LogitsProcessor


class SafetyGateLogitsProcessor(LogitsProcessor):
    r"""
    Forces, row by row, the token sequence a safety verdict demands.

    * a refused row gets exactly its refusal message, then EOS (and EOS again for as long as decoding goes on);
    * a cautioned row gets its caution prefix, then decodes freely;
    * an answered row is left untouched.

    The position in the forced sequence is the number of tokens generated so far (`input_ids` length minus the prompt
    length), so it holds for greedy search, sampling, beam search and `num_return_sequences > 1`: rows expanded by
    `generate` (`repeat_interleave` of each input row) share their input row's plan. At a forced step every other token
    gets `-inf` and the forced one `0` (a log-probability of 1), so any temperature, top-k/top-p, renormalisation or
    beam scoring applied afterwards keeps it. [`SafeVLMForConditionalGeneration`] places this processor after every
    other one, so no user processor, `suppress_tokens`, `bad_words_ids` or `min_new_tokens` can undo it.

    Args:
        forced_token_ids (`Sequence[Sequence[int] | None]`):
            Per input row, the token ids to force (`None` or empty: the row is not gated).
        end_with_eos (`Sequence[bool]`):
            Per input row, whether EOS is forced once the sequence is done (refusals) or decoding continues (caution).
        eos_token_id (`int`, *optional*):
            Required when any row ends with EOS.
        prompt_length (`int`):
            Length of the prompt in `input_ids` (0 when generating from `inputs_embeds` with a decoder-only model).
    """

    def __init__(
        self,
        forced_token_ids: Sequence[Sequence[int] | None],
        end_with_eos: Sequence[bool],
        eos_token_id: int | None,
        prompt_length: int,
    ):
        if len(forced_token_ids) != len(end_with_eos):
            raise ValueError(
                f"forced_token_ids has {len(forced_token_ids)} rows but end_with_eos has {len(end_with_eos)}."
            )
        if any(end_with_eos) and eos_token_id is None:
            raise ValueError("eos_token_id is required to end a refusal.")
        sequences = [list(seq or []) for seq in forced_token_ids]
        width = max([len(seq) for seq in sequences] + [0]) + 1
        # plan[row, step]: the token to force at that step, -1 for "do not touch". The last column repeats forever.
        plan = torch.full((len(sequences), width), -1, dtype=torch.long)
        for row, (seq, eos_after) in enumerate(zip(sequences, end_with_eos)):
            if seq:
                plan[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            if eos_after:
                plan[row, len(seq) :] = int(eos_token_id)
        self.plan = plan
        # How many leading steps of each row are forced (a refusal's single EOS included).
        self.forced_lengths = torch.tensor([len(seq) + int(bool(e)) for seq, e in zip(sequences, end_with_eos)])
        self.prompt_length = int(prompt_length)
        self.active = bool((plan >= 0).any())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.active:
            return scores
        rows = self.plan.shape[0]
        if scores.shape[0] % rows:
            raise ValueError(
                f"SafetyGateLogitsProcessor was built for {rows} rows but got scores for {scores.shape[0]}; the batch "
                "must be the prompt batch expanded by an integer factor (beams / return sequences)."
            )
        step = max(input_ids.shape[-1] - self.prompt_length, 0)
        column = self.plan[:, min(step, self.plan.shape[1] - 1)]  # the plan stays on the CPU: no device sync here
        if bool((column < 0).all()):
            return scores
        tokens = column.repeat_interleave(scores.shape[0] // rows).to(scores.device)
        gated = tokens >= 0
        forced = torch.full_like(scores, float("-inf"))
        forced[gated, tokens[gated]] = 0.0
        return torch.where(gated[:, None], forced, scores)

    def enforce(self, sequences: torch.LongTensor) -> torch.LongTensor:
        """Post-condition on finished `sequences`: every forced position holds the forced token.

        The scores already force these tokens; this guards the outputs themselves. Beam search needs it: when every
        beam of a row is forced, the row's extra hypotheses score exactly transformers' `-1e9` beam sentinel at the
        first step and may be returned as padding instead of the forced token (`num_return_sequences == num_beams`,
        `max_new_tokens=1`).
        """
        generated = sequences.shape[-1] - self.prompt_length
        if not self.active or generated <= 0:
            return sequences
        steps = min(generated, self.plan.shape[1])
        plan = self.plan[:, :steps]
        mask = (torch.arange(steps)[None, :] < self.forced_lengths[:, None]) & (plan >= 0)
        expand = sequences.shape[0] // self.plan.shape[0]
        plan = plan.repeat_interleave(expand, dim=0).to(sequences.device)
        mask = mask.repeat_interleave(expand, dim=0).to(sequences.device)
        window = sequences[:, self.prompt_length : self.prompt_length + steps]
        sequences = sequences.clone()
        sequences[:, self.prompt_length : self.prompt_length + steps] = torch.where(mask, plan, window)
        return sequences


__all__ = ["SafetyGateLogitsProcessor"]
