"""Instruction templates for the seven common-sense datasets of Drag-and-Drop (DnD).

Each record of the task registry becomes a :class:`Prompted` item: the prompt text (wrapped in the
tokenizer's chat template when it has one, so the answer is the assistant's first words), one answer
string per option and the gold option index.

* multiple choice (ARC-e/-c, OpenBookQA, HellaSwag, PIQA, WinoGrande): options are listed with letters
  ``A``, ``B``, ...; the answer strings are the letters.
* BoolQ (``superglue/boolq``, a classification task with ``text`` = passage, ``text_pair`` = question,
  label 1 = True): answers ``yes`` / ``no``; option 0 = ``no`` (label False), option 1 = ``yes``.

Without a chat template the prompt ends with ``"\\nAnswer:"`` and the answer strings get a leading
space (``" A"``, ``" yes"``).
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LETTERS = string.ascii_uppercase
YES_NO = ("no", "yes")  # index = BoolQ label (0 = False, 1 = True)

DATASETS = ("commonsense/arc_easy", "commonsense/arc_challenge", "superglue/boolq", "commonsense/hellaswag",
            "commonsense/piqa", "commonsense/winogrande", "commonsense/openbookqa")
SHORT_NAMES = {"arc_easy": "commonsense/arc_easy", "arc-e": "commonsense/arc_easy",
               "arc_challenge": "commonsense/arc_challenge", "arc-c": "commonsense/arc_challenge",
               "boolq": "superglue/boolq", "hellaswag": "commonsense/hellaswag", "piqa": "commonsense/piqa",
               "winogrande": "commonsense/winogrande", "openbookqa": "commonsense/openbookqa",
               "obqa": "commonsense/openbookqa"}

_INSTRUCTIONS = {
    "commonsense/arc_easy": "Answer the following science question.",
    "commonsense/arc_challenge": "Answer the following science question.",
    "commonsense/openbookqa": "Answer the following science question.",
    "commonsense/hellaswag": "Choose the most plausible ending of the text.",
    "commonsense/piqa": "Choose the better solution to reach the goal.",
    "commonsense/winogrande": "Choose the option that correctly fills the blank (_) in the sentence.",
}
_LEADS = {"commonsense/hellaswag": "Text", "commonsense/piqa": "Goal", "commonsense/winogrande": "Sentence"}


@dataclass(frozen=True)
class Prompted:
    """One templated example.

    Attributes:
        prompt: full prompt text (chat-templated if the tokenizer has a template; ready to tokenize
            without extra special tokens when ``chat`` is True).
        options: answer string of each option (what the model should emit right after ``prompt``).
        gold: index of the correct option (``-1`` if the record is unlabeled).
        chat: whether the chat template was applied.
        kind: ``"letter"`` (multiple choice) or ``"yesno"`` (BoolQ); selects the generation parser.
    """

    prompt: str
    options: tuple[str, ...]
    gold: int
    chat: bool
    kind: str


def canonical_name(name: str) -> str:
    """Map a short name (``arc_easy``, ``boolq``, ...) to its registry name; registry names pass through."""
    return SHORT_NAMES.get(name.strip().lower(), name.strip())


def user_message(name: str, record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str]:
    """The plain instruction text of one record, its bare answer strings and the parser kind."""
    name = canonical_name(name)
    if name == "superglue/boolq":
        question = str(record["text_pair"]).strip()
        if not question.endswith("?"):
            question += "?"
        msg = (f"Read the passage and answer the question with yes or no.\n\nPassage: {str(record['text']).strip()}\n"
               f"Question: {question}\nAnswer with yes or no.")
        return msg, YES_NO, "yesno"
    choices = [str(c).strip() for c in record["choices"]]
    letters = LETTERS[:len(choices)]
    instr = _INSTRUCTIONS.get(name, "Answer the following multiple-choice question.")
    lead = _LEADS.get(name, "Question")
    lines = [instr, "", f"{lead}: {str(record['text']).strip()}"]
    lines += [f"{L}. {c}" for L, c in zip(letters, choices)]
    lines.append(f"Answer with the letter of the correct option ({', '.join(letters)}).")
    return "\n".join(lines), tuple(letters), "letter"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_example(name: str, record: Mapping[str, Any], tokenizer: Any | None = None) -> Prompted:
    """Template one registry record of dataset ``name`` for ``tokenizer``.

    Returns:
        :class:`Prompted` with prompt text, answer strings per option and gold index.
    """
    msg, answers, kind = user_message(name, record)
    label = record.get("label")
    gold = int(label) if label is not None else -1
    if tokenizer is not None and has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                               add_generation_prompt=True)
        return Prompted(prompt, tuple(answers), gold, True, kind)
    return Prompted(msg + "\nAnswer:", tuple(" " + a for a in answers), gold, False, kind)


def format_dataset(name: str, records: list[Mapping[str, Any]], tokenizer: Any | None = None) -> list[Prompted]:
    """:func:`format_example` over a list of records."""
    return [format_example(name, r, tokenizer) for r in records]
