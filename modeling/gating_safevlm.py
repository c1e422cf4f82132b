# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""The logits processor that enforces SafeVLM verdicts during decoding.

Travels inside every SafeVLM checkpoint: imports only torch/transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from transformers.generation import LogitsProcessor


@dataclass(frozen=True)
class GatePlan:
    """What the gate enforces on one prompt row.

    Attributes:
        leads: the token sequence(s) the answer must start with. With two leads the model chooses between them
            (a ``"decide"`` verdict): at each step only the tokens that keep a lead possible are allowed, ranked by
            the model's own scores, until one lead is certain.
        ends: per lead, what follows it: ``"eos"`` (the answer ends right after the lead), ``"free"`` (the model
            decodes freely) or ``"budget"`` (the model may write ``budget`` more tokens, then EOS is forced).
        budget: tokens allowed after a ``"budget"`` lead.
    """

    leads: tuple[tuple[int, ...], ...]
    ends: tuple[str, ...]
    budget: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.leads) <= 2 or len(self.ends) != len(self.leads):
            raise ValueError(f"A gate plan has one or two leads, each with an end; got {self.leads} / {self.ends}.")
        if any(end not in ("eos", "free", "budget") for end in self.ends):
            raise ValueError(f"Gate plan ends are 'eos', 'free' or 'budget', got {self.ends}.")
        if "budget" in self.ends and self.budget < 0:
            raise ValueError(f"A 'budget' end needs budget >= 0, got {self.budget}.")
        if len(self.leads) == 2 and (not self.leads[0] or not self.leads[1] or self.leads[0] == self.leads[1]):
            raise ValueError("The two leads of a choice must be distinct and non-empty.")

    @classmethod
    def forced(cls, tokens: Sequence[int], end: str, budget: int = 0) -> "GatePlan":
        return cls(leads=(tuple(int(t) for t in tokens),), ends=(end,), budget=budget)

    def column(self, lead: int, eos_token_id: int | None) -> list[int]:
        """The plan of one lead as a token per step (-1 = free); its last entry repeats forever."""
        tokens = list(self.leads[lead])
        end = self.ends[lead]
        if end == "free":
            return tokens + [-1]
        if eos_token_id is None:
            raise ValueError("eos_token_id is required to end a refusal.")
        return tokens + [-1] * (self.budget if end == "budget" else 0) + [int(eos_token_id)]


class SafetyGateLogitsProcessor(LogitsProcessor):
    r"""
    Enforces, row by row, the answer a safety verdict demands (see [`GatePlan`]).

    * a forced lead is produced token by token, then EOS (template refusal), free decoding (caution) or at most
      `budget` free tokens and EOS (guided refusal);
    * a choice between two leads (a guided ``"decide"``) allows, at each step, only the tokens that keep a lead
      possible, ranked by the model's own scores, then enforces the chosen lead's end;
    * a row without a plan is left untouched.

    The position in the plan is the number of tokens generated so far (`input_ids` length minus the prompt length),
    and a choice reads each row's own tokens, so it holds for greedy search, sampling, beam search and
    `num_return_sequences > 1`: rows expanded by `generate` (`repeat_interleave` of each input row) share their input
    row's plan. At a forced step every other token gets `-inf` and the forced one `0` (a log-probability of 1), so
    temperature, top-k/top-p, renormalisation or beam scoring applied afterwards keep it.

    Args:
        plans (`Sequence[GatePlan | None]`): per input row, the plan (`None`: the row is not gated).
        eos_token_id (`int`, *optional*): required when any plan ends with EOS.
        prompt_length (`int`): length of the prompt in `input_ids` (0 when generating from `inputs_embeds` alone).
    """

    def __init__(self, plans: Sequence[GatePlan | None], eos_token_id: int | None, prompt_length: int):
        self.plans = list(plans)
        self.eos_token_id = eos_token_id
        self.prompt_length = int(prompt_length)
        # Single-lead rows: plan[row, step] is the token to force, -1 for "do not touch"; the last column repeats.
        columns = [plan.column(0, eos_token_id) if plan and len(plan.leads) == 1 else [-1] for plan in self.plans]
        width = max(len(column) for column in columns) if columns else 1
        self.plan = torch.full((len(columns), width), -1, dtype=torch.long)
        for row, column in enumerate(columns):
            self.plan[row, : len(column)] = torch.tensor(column, dtype=torch.long)
            self.plan[row, len(column) :] = column[-1]
        self.choice_rows = [row for row, plan in enumerate(self.plans) if plan and len(plan.leads) == 2]
        self.active = bool((self.plan >= 0).any()) or bool(self.choice_rows)

    @classmethod
    def from_forced(
        cls,
        forced_token_ids: Sequence[Sequence[int] | None],
        end_with_eos: Sequence[bool],
        eos_token_id: int | None,
        prompt_length: int,
    ) -> "SafetyGateLogitsProcessor":
        """Template-mode gate: per row, tokens to force, then EOS (`end_with_eos`) or free decoding."""
        if len(forced_token_ids) != len(end_with_eos):
            raise ValueError(
                f"forced_token_ids has {len(forced_token_ids)} rows but end_with_eos has {len(end_with_eos)}."
            )
        plans = [
            GatePlan.forced(tokens or [], "eos" if eos else "free") if (tokens or eos) else None
            for tokens, eos in zip(forced_token_ids, end_with_eos)
        ]
        return cls(plans, eos_token_id, prompt_length)

    def _expand(self, batch: int) -> int:
        rows = len(self.plans)
        if batch % rows:
            raise ValueError(
                f"SafetyGateLogitsProcessor was built for {rows} rows but got scores for {batch}; the batch must be "
                "the prompt batch expanded by an integer factor (beams / return sequences)."
            )
        return batch // rows

    def chosen_lead(self, row: int, generated: Sequence[int]) -> int | None:
        """For a choice row: which lead `generated` follows once only one is possible (None while both are)."""
        leads = self.plans[row].leads
        possible = [i for i, lead in enumerate(leads) if list(lead[: len(generated)]) == list(generated[: len(lead)])]
        if len(possible) == 1:
            return possible[0]
        if not possible:
            return None
        for i in possible:  # both still possible: certain once `generated` covers a whole lead
            if len(generated) >= len(leads[i]):
                return i
        return None

    def _choice_mask(self, row: int, generated: list[int]) -> tuple[list[int] | None, int | None]:
        """(allowed tokens, forced token) for a choice row at this step; (None, None) when decoding is free."""
        plan = self.plans[row]
        lead = self.chosen_lead(row, generated)
        if lead is None:
            step = len(generated)
            allowed = sorted({l[step] for l in plan.leads if step < len(l) and list(l[:step]) == generated[:step]})
            return (allowed or [int(self.eos_token_id)]), None
        column = plan.column(lead, self.eos_token_id)
        token = column[min(len(generated), len(column) - 1)]
        return None, (token if token >= 0 else None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.active:
            return scores
        expand = self._expand(scores.shape[0])
        step = max(input_ids.shape[-1] - self.prompt_length, 0)
        column = self.plan[:, min(step, self.plan.shape[1] - 1)]  # the plan stays on the CPU: no device sync here
        if not self.choice_rows and bool((column < 0).all()):
            return scores
        tokens = column.repeat_interleave(expand).to(scores.device)
        gated = tokens >= 0
        forced = torch.full_like(scores, float("-inf"))
        forced[gated, tokens[gated]] = 0.0
        scores = torch.where(gated[:, None], forced, scores)
        for row in self.choice_rows:
            for expanded in range(row * expand, (row + 1) * expand):
                generated = input_ids[expanded, self.prompt_length :].tolist()
                allowed, token = self._choice_mask(row, generated)
                if allowed is not None:
                    keep = torch.full_like(scores[expanded], float("-inf"))
                    keep[allowed] = scores[expanded, allowed]
                    scores[expanded] = keep
                elif token is not None:
                    scores[expanded] = float("-inf")
                    scores[expanded, token] = 0.0
        return scores

    def decisions(self, sequences: torch.LongTensor) -> dict[int, list[int | None]]:
        """For each choice row, the lead each of its returned sequences took (None if it was cut before certain)."""
        if not self.choice_rows:
            return {}
        expand = self._expand(sequences.shape[0])
        return {
            row: [
                self.chosen_lead(row, sequences[expanded, self.prompt_length :].tolist())
                for expanded in range(row * expand, (row + 1) * expand)
            ]
            for row in self.choice_rows
        }

    def enforce(self, sequences: torch.LongTensor, pad_token_id: int | None = None) -> torch.LongTensor:
        """Post-condition on finished `sequences`: every position a plan forces holds the forced token.

        The scores already force these tokens; this guards the outputs themselves. Beam search needs it: when every
        beam of a row is forced, the row's extra hypotheses score exactly transformers' `-1e9` beam sentinel at the
        first step and may be returned as padding instead of the forced token (`num_return_sequences == num_beams`,
        `max_new_tokens=1`). A choice row that follows neither lead is given the last lead (the refusal).
        """
        generated = sequences.shape[-1] - self.prompt_length
        if not self.active or generated <= 0:
            return sequences
        expand = self._expand(sequences.shape[0])
        sequences = sequences.clone()
        for row, plan in enumerate(self.plans):
            if plan is None:
                continue
            for expanded in range(row * expand, (row + 1) * expand):
                tokens = sequences[expanded, self.prompt_length :].tolist()
                lead = 0 if len(plan.leads) == 1 else self.chosen_lead(row, tokens)
                lead = len(plan.leads) - 1 if lead is None else lead
                lead_tokens = list(plan.leads[lead])
                tokens[: len(lead_tokens)] = lead_tokens[: len(tokens)]
                if plan.ends[lead] != "free":
                    # EOS at the latest right after the lead (refusal) or after the budget (guided refusal).
                    limit = len(lead_tokens) + (plan.budget if plan.ends[lead] == "budget" else 0)
                    ended = [
                        i for i in range(len(lead_tokens), min(limit, len(tokens))) if tokens[i] == self.eos_token_id
                    ]
                    stop = ended[0] if ended else (limit if limit < len(tokens) else None)
                    if stop is not None:
                        tokens[stop] = int(self.eos_token_id)
                        if pad_token_id is not None:  # after EOS a finished row holds padding only
                            tokens[stop + 1 :] = [int(pad_token_id)] * (len(tokens) - stop - 1)
                sequences[expanded, self.prompt_length :] = torch.tensor(tokens, dtype=sequences.dtype)
        return sequences


__all__ = ["GatePlan", "SafetyGateLogitsProcessor"]
