"""The shared-prefix tree of a batch of prompts: a pure structure over token ids (no model).

Prompts are split into a tree of shared prefixes (the rules and payoff table are identical across the prompts
of a game); each node is run once by the engine (:mod:`lit_moral.policy`) and its key/value cache reused by
every prompt below it. Prompts under different adapters never share a node (LoRA changes keys and values),
except in the frozen trunk of a partial-LoRA model, which no adapter touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Level:
    """One level of the tree: per node, its tokens, its parent row in the level above (-1 at the top), the adapter
    it runs under, and where its tokens come from (``(prompt index, start offset)`` of one prompt through it)."""

    tokens: list[list[int]] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    adapter: list[str] = field(default_factory=list)
    source: list[tuple[int, int]] = field(default_factory=list)


def _lcp(seqs: Sequence[Sequence[int]], start: int) -> int:
    """Length of the common prefix of ``seqs[i][start:]``."""
    first = seqs[0]
    n = min(len(s) for s in seqs) - start
    for k in range(n):
        t = first[start + k]
        if any(s[start + k] != t for s in seqs[1:]):
            return k
    return n


def build_prompt_tree(prompts: Sequence[tuple[str, Sequence[int]]], levels: int) -> tuple[list[Level], list[int]]:
    """Split unique (adapter, tokens) prompts into ``levels`` levels of shared prefixes.

    Every prompt becomes one path of exactly ``levels`` nodes, each holding at least one token, so
    the key/value cache can be extended level by level. A node is shared by all prompts below it;
    prompts under different adapters never share a node (LoRA changes keys and values). Prompts
    must be longer than ``levels`` tokens.

    Returns:
        ``(levels, leaf)``: the levels and, for each prompt, its row in the last level.
    """
    out = [Level() for _ in range(levels)]
    leaf = [0] * len(prompts)

    def add(depth: int, tokens: Sequence[int], parent: int, adapter: str, source: tuple[int, int]) -> int:
        out[depth].tokens.append(list(tokens))
        out[depth].parent.append(parent)
        out[depth].adapter.append(adapter)
        out[depth].source.append(source)
        return len(out[depth].tokens) - 1

    def build(idx: list[int], start: int, depth: int, parent: int, adapter: str) -> None:
        seqs = [prompts[i][1] for i in idx]
        remaining = levels - depth
        if remaining == 1:
            for i, s in zip(idx, seqs):
                leaf[i] = add(depth, s[start:], parent, adapter, (i, start))
            return
        # Leave at least one token for each level below this one.
        take = min(_lcp(seqs, start), min(len(s) for s in seqs) - start - (remaining - 1))
        if len(idx) == 1 or take < 1:
            for i, s in zip(idx, seqs):
                cut = len(s) - (remaining - 1)
                build([i], cut, depth + 1, add(depth, s[start:cut], parent, adapter, (i, start)), adapter)
            return
        row = add(depth, seqs[0][start:start + take], parent, adapter, (idx[0], start))
        if remaining == 2:
            build(idx, start + take, depth + 1, row, adapter)
            return
        groups: dict[int, list[int]] = {}
        for i, s in zip(idx, seqs):
            groups.setdefault(s[start + take], []).append(i)
        for members in groups.values():
            build(members, start + take, depth + 1, row, adapter)

    by_adapter: dict[str, list[int]] = {}
    for i, (a, _) in enumerate(prompts):
        by_adapter.setdefault(a, []).append(i)
    for a, idx in by_adapter.items():
        build(idx, 0, 0, -1, a)
    return out, leaf


def auto_levels(prompts: Sequence[tuple[str, Sequence[int]]], max_levels: int = 8) -> int:
    """The smallest tree depth that reaches the fewest tokens to run (each level is one more pass)."""
    shortest = min(len(t) for _, t in prompts)
    best, best_tokens = 1, sum(len(t) for _, t in prompts)
    for lv in range(2, min(max_levels, shortest) + 1):
        levels, _ = build_prompt_tree(prompts, lv)
        tokens = sum(len(t) for level in levels for t in level.tokens)
        if tokens < best_tokens:
            best, best_tokens = lv, tokens
    return best
