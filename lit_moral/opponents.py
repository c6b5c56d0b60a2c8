"""Fixed strategies acting on the batched memory-1 history (protocol section 2)."""

from __future__ import annotations

import torch

from lit_moral.errors import check_choice
from lit_moral.games import C, D, random_moves


class Opponent:
    """A fixed strategy. ``act`` never mutates the game state.

    Subclasses define ``first_move`` (the opponent's previous move shown at the start of an episode)
    and ``act`` (this round's move given the learner's last legal move).
    """

    name = "opponent"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def first_move(self, n: int) -> torch.Tensor:
        """``[n]`` the opponent's 'previous' move at the start of an episode."""
        return random_moves(n, self.generator)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor) -> torch.Tensor:
        """``[B]`` this round's moves, given the learner's ``[B]`` last legal move and the opponent's own."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class TitForTat(Opponent):
    """Plays the learner's previous legal move."""

    name = "tft"

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor) -> torch.Tensor:
        return learner_prev.clone()


class AlwaysCooperate(Opponent):
    name = "always_cooperate"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), C, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor) -> torch.Tensor:
        return torch.full_like(learner_prev, C)


class AlwaysDefect(Opponent):
    name = "always_defect"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), D, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor) -> torch.Tensor:
        return torch.full_like(learner_prev, D)


class RandomOpponent(Opponent):
    """Uniform random moves from its own seeded generator (protocol section 2)."""

    name = "random"

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor) -> torch.Tensor:
        return random_moves(learner_prev.shape[0], self.generator)


OPPONENTS: dict[str, type[Opponent]] = {
    cls.name: cls for cls in (TitForTat, AlwaysCooperate, AlwaysDefect, RandomOpponent)
}
LLM_OPPONENT = "llm"
OPPONENT_NAMES = (*OPPONENTS, LLM_OPPONENT)


def make_opponent(name: str, seed: int = 0, field: str = "opponent") -> Opponent:
    """Build a fixed strategy by name (``tft``, ``always_cooperate``, ``always_defect``, ``random``)."""
    check_choice(field, name, OPPONENTS)
    return OPPONENTS[name](seed)
