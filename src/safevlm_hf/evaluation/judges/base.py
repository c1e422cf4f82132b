"""The judge interface: what a judge reads (:class:`JudgeInput`), what it answers (:class:`Judgement`), and what it
decides (:attr:`Judge.decides`: harm, refusal or both)."""

from __future__ import annotations

import abc
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Sequence


#: What a judge can decide. A *harm* judge says whether the answer is unsafe (attack success is computed from it);
#: a *refusal* judge says whether the answer refuses (refusal, over-refusal and non-refusal rates come from it).
HARM = "harm"
REFUSAL = "refusal"


@dataclass(frozen=True)
class JudgeInput:
    """One exchange to judge.

    Attributes:
        prompt: the user request (text shown to the model).
        response: the model's answer.
        category: benchmark category or SafeVLM risk type, used by rubric judges to pick the rubric.
        image: the image shown with the prompt (a path or a PIL image), for judges that read images (Llama Guard 3
            Vision); text judges ignore it.
    """

    prompt: str
    response: str
    category: str | None = None
    image: Any = None


@dataclass(frozen=True)
class Judgement:
    """A judge's decision on one :class:`JudgeInput`.

    Attributes:
        unsafe: True when the response complies with a harmful request or is harmful; ``None`` when unparseable.
            Refusal-only judges (:attr:`Judge.decides` without ``"harm"``) set it to ``not refused``, a non-refusal
            proxy kept for callers that read it; reports never call it attack success.
        refused: True when the response refuses; ``None`` when the judge does not tell (or its answer is unparseable).
        score: rubric score 1-10 (SafeVLM protocol, 10 = safest) when the judge gives one.
        probability: P(unsafe) (harm judges) or P(refusal) (refusal judges) when the judge exposes it.
        raw: the judge's raw answer (for rule-based judges: the rule that fired).
        parsed: False when the judge's answer could not be parsed (never counted as safe).
        categories: violated category codes when the judge names them (Llama Guard: ``("S1", "S10")``).
    """

    unsafe: bool | None
    refused: bool | None
    score: float | None = None
    probability: float | None = None
    raw: str = ""
    parsed: bool = True
    categories: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["categories"] is not None:
            data["categories"] = list(data["categories"])
        return data


class Judge(abc.ABC):
    """Interface of every judge: :meth:`describe` for reports, :meth:`judge` for a batch of exchanges.

    :attr:`decides` says which of :data:`HARM` and :data:`REFUSAL` the judge's answers carry; evaluation reports name
    each metric after the judge that produced it and never compute attack success from a judge that does not decide
    harm.
    """

    name: str = "judge"
    version: str = "1"
    decides: frozenset[str] = frozenset({HARM, REFUSAL})

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Name, version, model, full prompt template(s) and settings: everything a report must pin."""

    @abc.abstractmethod
    def judge(self, items: Sequence[JudgeInput]) -> list[Judgement]:
        """One :class:`Judgement` per item, same length and order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe().get('model', self.name)!r})"


class JudgeError(RuntimeError):
    """A judge could not be built or run; the message names the model, URL or setting at fault."""


class JudgeEndpointError(JudgeError):
    """The chat endpoint failed (unreachable after the retries, or an HTTP error); the message has the URL."""


def normalize_text(text: str) -> str:
    """Lower-case, Unicode-normalize (NFKC), drop apostrophes (straight or curly), replace other punctuation with
    spaces and collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"['\u2018\u2019\u02bc\u0060\u00b4]", "", text)
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


__all__ = [
    "HARM",
    "REFUSAL",
    "Judge",
    "JudgeEndpointError",
    "JudgeError",
    "JudgeInput",
    "Judgement",
    "normalize_text",
]
