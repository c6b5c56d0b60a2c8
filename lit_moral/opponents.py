"""Fixed strategies acting on the batched memory-1 history (protocol section 2, BEYOND section 3).

Every strategy is a rule on the state both players see, the learner's and its own previous move, applied from
round 0 on; ``first_move`` is its own move in the episode's starting state (the "previous round" shown in the
first prompt), and the learner's move in that state counts as history like any other. A strategy with a
memory beyond one round (grim trigger) keeps it in its own previous move, so no strategy holds per-game state
and ``state_dict`` is the random stream alone. ``docs/rewards.md`` lists every strategy.
"""

from __future__ import annotations

import math

import torch

from lit_moral.errors import ConfigError, check_choice
from lit_moral.games import C, D, lookup, random_moves


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

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor,
            payoffs: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` this round's moves.

        Args:
            learner_prev: ``[B]`` the learner's last legal move.
            own_prev: ``[B]`` the opponent's own previous move.
            payoffs: ``[2, 2, 2]`` the game as the opponent sees it (its own payoff first); only strategies
                that read payoffs (pavlov) need it.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class TitForTat(Opponent):
    """Plays the learner's previous legal move."""

    name = "tft"

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        return learner_prev.clone()


class AlwaysCooperate(Opponent):
    name = "always_cooperate"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), C, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full_like(learner_prev, C)


class AlwaysDefect(Opponent):
    name = "always_defect"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), D, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full_like(learner_prev, D)


class RandomOpponent(Opponent):
    """Uniform random moves from its own seeded generator (protocol section 2)."""

    name = "random"

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        return random_moves(learner_prev.shape[0], self.generator)


class GrimTrigger(Opponent):
    """C until the learner's first D in the episode, then D for the rest of it.

    First move C. The trigger is its own previous move: it defects iff the learner's previous move or its own
    was D, and its own is D only once triggered (it starts from C each episode), so the trigger resets at
    every episode's start without per-game state. A D of the learner in the starting state triggers it.
    """

    name = "grim_trigger"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), C, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        return ((learner_prev == D) | (own_prev == D)).long()


class Pavlov(Opponent):
    """Win-stay, lose-shift: repeats its own previous move after a payoff >= R, else switches.

    R is its payoff for mutual cooperation and the payoff is its own for last round's moves, both read from
    ``payoffs`` (its own view of the game: ``act`` needs it). First move C.
    """

    name = "pavlov"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), C, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        if payoffs is None:
            raise ValueError("pavlov: act needs payoffs, the [2, 2, 2] game as pavlov sees it (its own payoff "
                             "first), e.g. game.view(seat).payoffs")
        mine, _ = lookup(payoffs, own_prev, learner_prev)
        reward_cc = payoffs[C, C, 0].to(mine.device)
        return torch.where(mine >= reward_cc, own_prev, 1 - own_prev)


class SuspiciousTitForTat(Opponent):
    """Tit-for-Tat that opens with D: first move D, then plays the learner's previous legal move."""

    name = "suspicious_tft"

    def first_move(self, n: int) -> torch.Tensor:
        return torch.full((n,), D, dtype=torch.long)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        return learner_prev.clone()


def _probability(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 1):
        raise ConfigError(f"{field}: must be a probability in [0, 1]; got {value!r}")
    return float(value)


class GenerousTitForTat(Opponent):
    """Tit-for-Tat that forgives: after the learner's D it plays C with probability ``forgiveness``.

    First move uniform (as Tit-for-Tat's). One uniform number per game is drawn every round, whatever the
    history, so the stream's position depends only on the number of games and rounds played.

    Args:
        seed: seed of its own random stream.
        forgiveness: probability g of answering a D with C (default 1/3).
    """

    name = "generous_tft"

    def __init__(self, seed: int = 0, forgiveness: float = 1 / 3) -> None:
        super().__init__(seed)
        self.forgiveness = _probability("generous_tft: forgiveness", forgiveness)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        u = torch.rand(learner_prev.shape[0], generator=self.generator).to(learner_prev.device)
        return torch.where((learner_prev == D) & (u < self.forgiveness), torch.full_like(learner_prev, C), learner_prev)


class NoisyTitForTat(Opponent):
    """Tit-for-Tat whose move is flipped with probability ``noise`` (a trembling hand).

    First move uniform (as Tit-for-Tat's). One uniform number per game is drawn every round, whatever the
    history.

    Args:
        seed: seed of its own random stream.
        noise: probability e of playing the opposite of the learner's previous move (default 0.1).
    """

    name = "noisy_tft"

    def __init__(self, seed: int = 0, noise: float = 0.1) -> None:
        super().__init__(seed)
        self.noise = _probability("noisy_tft: noise", noise)

    def act(self, learner_prev: torch.Tensor, own_prev: torch.Tensor, payoffs: torch.Tensor | None = None) -> torch.Tensor:
        u = torch.rand(learner_prev.shape[0], generator=self.generator).to(learner_prev.device)
        return torch.where(u < self.noise, 1 - learner_prev, learner_prev)


OPPONENTS: dict[str, type[Opponent]] = {
    cls.name: cls for cls in (TitForTat, AlwaysCooperate, AlwaysDefect, RandomOpponent, GrimTrigger, Pavlov,
                              SuspiciousTitForTat, GenerousTitForTat, NoisyTitForTat)
}
LLM_OPPONENT = "llm"
OPPONENT_NAMES = (*OPPONENTS, LLM_OPPONENT)


def make_opponent(name: str, seed: int = 0, field: str = "opponent") -> Opponent:
    """Build a fixed strategy by name (one of ``OPPONENTS``) with its default constants."""
    check_choice(field, name, OPPONENTS)
    return OPPONENTS[name](seed)
