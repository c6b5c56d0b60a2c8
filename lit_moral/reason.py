"""The "reason first, then act" answer format (``action_mode: reason``, docs/reason.md): pure text functions.

The prompt's format line asks for brief reasoning and a final line ``Action: <label>``. The answer is legal iff,
after dropping trailing blank lines and trailing whitespace, its last line is the only ``Action:`` line and names
one of the two action strings exactly. Anything else is illegal, in one of three categories:

- ``no_action``: no ``Action:`` line ends the answer (none at all, cut off at ``max_new_tokens``, or text after it);
- ``unknown_label``: the final ``Action:`` line names something other than the two labels;
- ``multiple_actions``: more than one ``Action:`` line.

The labels may appear anywhere in the reasoning. Two descriptive measures of the reasoning (the text before the
final action line) are logged per agent: whether it mentions the other player's previous move, and whether it
uses a word of :data:`MORAL_WORDS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from lit_moral.games import ILLEGAL, C, D

LEGAL = "legal"
ILLEGAL_KINDS = ("no_action", "unknown_label", "multiple_actions")
ACTION_PREFIX = "Action:"
# An action line: optional leading whitespace, then the prefix (case-sensitive, as the format line spells it).
_ACTION_LINE = re.compile(r"^\s*" + re.escape(ACTION_PREFIX) + r"(.*)$")

# Moral vocabulary (the reasoning "uses moral vocabulary" if it contains one of these as a word, any case; a
# trailing * matches any ending). Our list: words of fairness, harm/care, trust/betrayal, duty and the common good,
# as in the moral-foundations word lists, without game words such as "cooperate" or "points" that every IPD
# answer uses whatever its reasoning, and without everyday words with a common non-moral sense ("just", "right",
# "good", "bad", "kind").
MORAL_WORDS = (
    "moral*", "immoral*", "ethic*", "unethical", "fair", "fairly", "fairness", "unfair*", "justice",
    "unjust*", "wrong*", "evil", "harm*", "hurt*", "caring", "kindness",
    "cruel*", "trust*", "distrust*", "betray*", "loyal*", "honest*", "dishonest*", "cheat*", "exploit*",
    "selfish*", "selfless*", "altruis*", "duty", "duties", "obligat*", "responsib*", "respect*", "deserv*",
    "guilt*", "shame*", "virtue*", "integrity", "reciproc*", "welfare", "well-being", "wellbeing", "greater good",
    "common good", "mutual*", "owe",
)
_MORAL = re.compile(r"\b(?:" + "|".join(re.escape(w).replace(r"\*", r"\w*") + ("" if w.endswith("*") else r"\b")
                                        for w in MORAL_WORDS) + r")", re.IGNORECASE)
# Words that make a sentence about the other player or the previous round (the prompt calls the other player A).
_OTHER = re.compile(r"\b(?:A|A's|opponent\w*|other (?:agent|player)|they|them|their|last round|previous round|"
                    r"last time|before)\b")


def format_line(options: Sequence[str]) -> str:
    """The prompt's format line for the reason mode, with the two labels in the order shown."""
    return (f"Think about your two options briefly (a few sentences), then end your answer with a final line "
            f"'{ACTION_PREFIX} {options[0]}' or '{ACTION_PREFIX} {options[1]}'.")


def _lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def parse_reasoned(text: str, actions: Sequence[str]) -> tuple[int, str]:
    """``(action code, kind)`` of one answer: ``(C or D, "legal")`` or ``(ILLEGAL, one of ILLEGAL_KINDS)``.

    Args:
        text: the decoded answer (special tokens dropped).
        actions: the two action strings, C first.
    """
    lines = _lines(text)
    found = [i for i, ln in enumerate(lines) if _ACTION_LINE.match(ln)]
    if len(found) > 1:
        return ILLEGAL, "multiple_actions"
    if not found or found[0] != len(lines) - 1:
        return ILLEGAL, "no_action"
    label = _ACTION_LINE.match(lines[-1]).group(1).strip()
    if label == actions[0]:
        return C, LEGAL
    if label == actions[1]:
        return D, LEGAL
    return ILLEGAL, "unknown_label"


def completed_action_line(text: str) -> bool:
    """Whether ``text`` holds a finished ``Action:`` line (one a newline has ended).

    Generation stops there: whatever follows cannot make the answer legal (more text gives ``no_action``, another
    ``Action:`` line ``multiple_actions``), so the parse of the answer cut there is the answer's only legal reading.
    """
    return any(_ACTION_LINE.match(ln) for ln in text.replace("\r\n", "\n").split("\n")[:-1])


def action_line_stop(tokenizer) -> Callable[[Sequence[int]], bool]:
    """A ``generate(stop=...)`` rule: the decoded answer (special tokens dropped) holds a completed action line.

    A line completes only when a newline arrives, so the whole answer is decoded only at steps whose new token
    holds one (each step of generation calls this for every row still going).
    """
    def stop(ids: Sequence[int]) -> bool:
        if not ids or "\n" not in tokenizer.decode([ids[-1]], skip_special_tokens=True):
            return False
        return completed_action_line(tokenizer.decode(list(ids), skip_special_tokens=True))
    return stop


def reasoning_of(text: str) -> str:
    """The reasoning: the answer without its ``Action:`` lines."""
    return "\n".join(ln for ln in _lines(text) if not _ACTION_LINE.match(ln))


def uses_moral_vocabulary(text: str) -> bool:
    """Whether the reasoning of ``text`` contains a word of :data:`MORAL_WORDS` (case-insensitive)."""
    return _MORAL.search(reasoning_of(text)) is not None


def mentions_previous_move(text: str, actions: Sequence[str], prev_other: int) -> bool:
    """Whether the reasoning mentions the other player's previous move: one of its sentences names that move's
    label and refers to the other player or the previous round (A, the opponent, they, last round, ...)."""
    label = actions[prev_other]
    for sentence in re.split(r"(?<=[.!?])\s+|\n", reasoning_of(text)):
        if label in sentence and _OTHER.search(sentence.replace(label, " ")):
            return True
    return False


def answer_stats(texts: Sequence[str], actions: Sequence[str], prev_other: Sequence[int]) -> dict[str, float]:
    """Shares over answers: each illegal kind (``illegal_<kind>``), ``mentions_prev_move`` and ``moral_vocab``."""
    n = max(len(texts), 1)
    kinds = [parse_reasoned(t, actions)[1] for t in texts]
    out = {f"illegal_{k}": sum(x == k for x in kinds) / n for k in ILLEGAL_KINDS}
    out["mentions_prev_move"] = sum(mentions_previous_move(t, actions, int(p)) for t, p in zip(texts, prev_other)) / n
    out["moral_vocab"] = sum(uses_moral_vocabulary(t) for t in texts) / n
    return out


__all__ = ["ILLEGAL_KINDS", "LEGAL", "MORAL_WORDS", "answer_stats", "format_line", "mentions_previous_move",
           "parse_reasoned", "reasoning_of", "uses_moral_vocabulary"]
