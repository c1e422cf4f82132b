# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""Row-wise gated generation: what each prompt row costs once its verdict is known.

* a refused row (template mode) never enters the LLM: its answer, the refusal message and EOS, is written directly;
* a fixed lead (the caution prefix, a guided lead) is appended to the prompt and prefilled in one pass;
* a guided hint is appended as context (never returned);
* what is left to enforce while decoding (a refusal budget, a choice between two leads) stays with the gate.

The rows that still need the LLM are prefilled and decoded together (one `generate` call per lead length, so that
each row keeps its own token budget), and the results are merged back in the caller's row order and layout.

Travels inside every SafeVLM checkpoint: imports only torch/transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .gating_safevlm import GatePlan


@dataclass
class RowPlan:
    """How `generate` serves one prompt row after its verdict.

    Attributes:
        output: the complete answer when the row never enters the LLM (a template refusal: message + EOS).
        context: tokens appended to the prompt as context only (a guided hint); never returned.
        lead: tokens appended to the prompt, prefilled, and returned as the start of the answer.
        gate: what the gate still enforces on the tokens decoded after the lead (a budget, a choice).
    """

    output: list[int] | None = None
    context: list[int] = field(default_factory=list)
    lead: list[int] = field(default_factory=list)
    gate: GatePlan | None = None

    @property
    def runs_llm(self) -> bool:
        return self.output is None


class _AfterPrompt:
    """A streamer proxy that drops the first `put` (the prompt of a sub-call, which the caller already streamed)."""

    def __init__(self, streamer: Any):
        self.streamer, self.started = streamer, False

    def put(self, value: torch.Tensor) -> None:
        if self.started:
            self.streamer.put(value)
        self.started = True

    def end(self) -> None:
        self.streamer.end()


def real_tokens(input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's prompt tokens without padding."""
    if attention_mask is None:
        return input_ids.tolist()
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]


def left_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of token lists, left-padded as decoder-only generation expects."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long, device=device)
            mask[index, width - len(row) :] = 1
    return ids, mask


def images_by_row(placeholders_per_row: Sequence[int], features: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Assign per-image LLM features to rows in order, by the placeholders each image fills."""
    rows: list[list[torch.Tensor]] = []
    index = 0
    for remaining in placeholders_per_row:
        row = []
        while remaining > 0:
            row.append(features[index])
            remaining -= len(features[index])
            index += 1
        rows.append(row)
    return rows


def forced_scores(token: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The distribution the gate gives a forced step: log-probability 0 for `token`, -inf for every other."""
    scores = torch.full((vocab_size,), float("-inf"), device=device)
    scores[token] = 0.0
    return scores


@dataclass(frozen=True)
class OutputLayout:
    """The caller's output: sequences per prompt row, padding, EOS, and which per-step tensors it asked for."""

    expand: int
    pad_token_id: int
    eos_token_id: int | None
    vocab_size: int
    want_scores: bool
    want_logits: bool

    @property
    def wants_steps(self) -> bool:
        return self.want_scores or self.want_logits


@dataclass
class RowResult:
    """One returned sequence's answer tokens and, when asked for, its per-step scores and logits."""

    tokens: list[int]
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def run_rows(
    plans: Sequence[RowPlan],
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    llm_images: list[list[torch.Tensor]],
    generate: Callable[..., Any],
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    layout: OutputLayout,
    make_gate: Callable[[list[GatePlan | None], int], Any],
    streamer: Any = None,
) -> tuple[list[RowResult], list[Any]]:
    """Serve every row by its plan; returns one `RowResult` per returned sequence (input row x `expand`).

    `generate(input_ids=, attention_mask=, image_features=, max_new_tokens=, min_new_tokens=, gate=, streamer=)`
    runs transformers' generation on a sub-batch and returns its raw output; each sub-batch groups the rows whose
    leads have the same length, so that `max_new_tokens` / `min_new_tokens` count from the caller's prompt as before.
    """
    device = input_ids.device
    expand, pad_token_id, vocab_size = layout.expand, layout.pad_token_id, layout.vocab_size
    prompts = real_tokens(input_ids, attention_mask)
    results: list[RowResult | None] = [None] * (len(plans) * expand)
    outputs: list[Any] = []

    def forced_steps(tokens: Sequence[int]) -> list[torch.Tensor]:
        return [forced_scores(token, vocab_size, device) for token in tokens] if layout.wants_steps else []

    def write_fixed(row: int, tokens: list[int]) -> None:
        """A row whose whole answer is known without the LLM (a template refusal, or a lead filling the budget)."""
        if streamer is not None:
            streamer.put(input_ids.cpu())
            if tokens:
                streamer.put(torch.tensor(tokens))
            streamer.end()
        steps = forced_steps(tokens)
        for copy_ in range(expand):
            results[row * expand + copy_] = RowResult(list(tokens), list(steps), list(steps))

    for row, plan in enumerate(plans):
        if not plan.runs_llm:
            write_fixed(row, plan.output[:max_new_tokens])

    groups: dict[int, list[int]] = {}
    for row, plan in enumerate(plans):
        if plan.runs_llm:
            groups.setdefault(len(plan.lead), []).append(row)
    for lead_length, rows in sorted(groups.items()):
        budget = max_new_tokens - lead_length
        if budget <= 0:  # the lead alone fills the answer
            for row in rows:
                write_fixed(row, plans[row].lead[:max_new_tokens])
            continue
        sub_prompts = [prompts[row] + plans[row].context + plans[row].lead for row in rows]
        sub_ids, sub_mask = left_pad(sub_prompts, pad_token_id, device)
        sub_streamer = None
        if streamer is not None:  # batch 1: the caller sees its prompt, then the lead, then the decoded tokens
            streamer.put(input_ids.cpu())
            if plans[rows[0]].lead:
                streamer.put(torch.tensor(plans[rows[0]].lead))
            sub_streamer = _AfterPrompt(streamer)
        gate = make_gate([plans[row].gate for row in rows], sub_ids.shape[1])
        output = generate(
            input_ids=sub_ids,
            attention_mask=sub_mask,
            image_features=[feature for row in rows for feature in llm_images[row]],
            max_new_tokens=budget,
            min_new_tokens=max(min_new_tokens - lead_length, 0),
            gate=gate,
            streamer=sub_streamer,
        )
        outputs.append((rows, gate, output))
        sequences = output if isinstance(output, torch.Tensor) else output["sequences"]
        decoded = sequences[:, sub_ids.shape[1] :]
        for index, row in enumerate(rows):
            lead = plans[row].lead
            lead_steps = forced_steps(lead)
            for copy_ in range(expand):
                position = index * expand + copy_
                tokens = _until_end(decoded[position].tolist(), layout.eos_token_id, pad_token_id)
                result = RowResult(list(lead) + tokens, list(lead_steps), list(lead_steps))
                if layout.want_scores:
                    result.scores += [step[position] for step in output["scores"][: len(tokens)]]
                if layout.want_logits:
                    result.logits += [step[position] for step in output["logits"][: len(tokens)]]
                results[row * expand + copy_] = result
    return results, outputs


def _until_end(tokens: list[int], eos_token_id: int | None, pad_token_id: int) -> list[int]:
    """The tokens a row generated: up to and including its EOS (the rest is the batch's padding)."""
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    while tokens and tokens[-1] == pad_token_id and pad_token_id != eos_token_id:
        tokens = tokens[:-1]
    return tokens


def assemble(
    input_ids: torch.LongTensor, results: Sequence[RowResult], layout: OutputLayout
) -> tuple[torch.LongTensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
    """The caller's layout: each prompt row (as given, padding included) followed by its answer, right-padded.

    Steps where a row's token was fixed without the LLM, or after the row ended, carry the forced distribution
    (log-probability 0 for the token returned there, EOS or padding after the end; -inf elsewhere).
    """
    width = max(len(result.tokens) for result in results)
    prompts = input_ids.repeat_interleave(layout.expand, dim=0)
    answer = torch.full((len(results), width), int(layout.pad_token_id), dtype=torch.long, device=input_ids.device)
    for index, result in enumerate(results):
        if result.tokens:
            answer[index, : len(result.tokens)] = torch.tensor(result.tokens, device=input_ids.device)
    sequences = torch.cat([prompts, answer], dim=1)
    device = input_ids.device
    filler, vocab_size = int(layout.pad_token_id), layout.vocab_size

    def stacked(per_row: Sequence[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        steps = []
        for step in range(width):
            column = []
            for result, rows in zip(results, per_row):
                if step < len(rows):
                    column.append(rows[step].to(device))
                else:
                    column.append(forced_scores(filler, vocab_size, device))
            steps.append(torch.stack(column))
        return tuple(steps)

    scores = stacked([result.scores for result in results]) if layout.want_scores else None
    logits = stacked([result.logits for result in results]) if layout.want_logits else None
    return sequences, scores, logits
