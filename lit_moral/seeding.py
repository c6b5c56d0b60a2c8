"""One seed, many independent random streams.

Every random purpose draws from its own generator: initial previous-move states, prompt option
orders, action sampling, PPO minibatch shuffling, and each fixed opponent. Sharing one generator
between two purposes couples them (an evaluation that re-seeds the sampler and the Random opponent
with the same number makes Random's move copy the option-order bit of the agent's prompt), so the
streams are seeded from ``(seed, purpose, ...)`` through a stable hash, never from the same number.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

PURPOSES = ("states", "orders", "sampling", "minibatch")


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 62-bit seed for ``(seed, *parts)``: the same inputs give the same seed on every machine."""
    return (int(seed) * 1_000_003 + zlib.crc32("|".join(str(p) for p in parts).encode())) % (2**62)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


@dataclass
class Streams:
    """The generators of one process of a run (or one evaluation cell).

    Attributes:
        states: initial previous-move states of every episode.
        orders: the two option orders of every prompt.
        sampling: action sampling (constrained choice or generated tokens).
        minibatch: PPO minibatch shuffling (training only).
    """

    states: torch.Generator
    orders: torch.Generator
    sampling: torch.Generator
    minibatch: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, *parts: object) -> Streams:
        """Independent streams for ``seed`` (``parts`` name the process or cell, e.g. the rank)."""
        return cls(*(generator(seed, *parts, p) for p in PURPOSES))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {p: getattr(self, p).get_state() for p in PURPOSES}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for p in PURPOSES:
            getattr(self, p).set_state(state[p])


def opponent_seed(seed: int, agent: str, opponent: str, rank: int = 0) -> int:
    """The seed of the fixed opponent ``opponent`` met by ``agent`` on process ``rank``."""
    return derive_seed(seed, "opponent", agent, opponent, rank)
