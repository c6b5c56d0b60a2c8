"""Actions, payoff matrices and the batched memory-1 game state (PAPER.md sections 1-3).

Action codes: ``C = 0`` (first action string), ``D = 1`` (second), ``ILLEGAL = 2``.
Payoffs are ``[2, 2, 2]`` tensors: ``payoffs[a_row, a_col] = (payoff to row, payoff to column)``.
Every player sees itself as the row player; all rewards are computed from that view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_moral.errors import ConfigError, check_choice

C, D, ILLEGAL = 0, 1, 2
ACTION_NAMES = ("C", "D", "illegal")

# PAPER.md section 1: entry = (payoff to the row player M, payoff to the column player O).
PAYOFF_TABLES: dict[str, list[list[list[float]]]] = {
    "IPD": [[[3, 3], [0, 4]], [[4, 0], [1, 1]]],
    "ISH": [[[4, 4], [0, 3]], [[3, 0], [1, 1]]],
    "ICN": [[[2, 2], [1, 4]], [[4, 1], [0, 0]]],
    "BOS": [[[3, 2], [0, 0]], [[0, 0], [2, 3]]],
    "ICD": [[[1, 1], [0, 0]], [[0, 0], [4, 4]]],
}
GAME_NAMES = tuple(PAYOFF_TABLES)


def validate_payoffs(payoffs: object, field: str = "game") -> torch.Tensor:
    """Return ``payoffs`` as a float ``[2, 2, 2]`` tensor or raise a ConfigError naming ``field``."""
    try:
        t = torch.as_tensor(payoffs, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}: payoffs must be numbers shaped [2, 2, 2] (row action, column action, "
                          f"(row payoff, column payoff)); got {payoffs!r} ({e})") from None
    if tuple(t.shape) != (2, 2, 2):
        raise ConfigError(f"{field}: payoffs must have shape [2, 2, 2] (row action, column action, "
                          f"(row payoff, column payoff)); got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ConfigError(f"{field}: payoffs must be finite numbers; got {t.tolist()}")
    return t


@dataclass(frozen=True)
class MatrixGame:
    """A symmetric-view 2x2 matrix game.

    Attributes:
        name: short name shown in logs (``IPD``, ``ISH``, ``ICN``, ``BOS``, ``ICD`` or ``custom``).
        payoffs: ``[2, 2, 2]`` float tensor, ``payoffs[a_me, a_other] = (mine, theirs)``.
    """

    name: str
    payoffs: torch.Tensor

    @classmethod
    def from_spec(cls, spec: object, field: str = "game") -> MatrixGame:
        """Build from a game name (``"IPD"``) or a nested payoff list ``[2, 2, 2]``."""
        if isinstance(spec, MatrixGame):
            return spec
        if isinstance(spec, str):
            name = check_choice(field, spec.upper() if spec.upper() in PAYOFF_TABLES else spec, GAME_NAMES)
            return cls(name, validate_payoffs(PAYOFF_TABLES[name], field))
        return cls("custom", validate_payoffs(spec, field))

    @property
    def max_collective(self) -> float:
        """Best collective payoff ``max(R_M + R_O)`` over the four outcomes (PAPER.md section 1)."""
        return float(self.payoffs.sum(-1).max())

    def payoff(self, a_me: torch.Tensor, a_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Payoffs for legal actions.

        Args:
            a_me: ``[B]`` long, values in {C, D}.
            a_other: ``[B]`` long, values in {C, D}.

        Returns:
            ``(mine [B], theirs [B])`` floats.
        """
        p = self.payoffs.to(a_me.device)[a_me, a_other]
        return p[..., 0], p[..., 1]


def effective_action(action: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The move that counts for the other player's payoff: an illegal answer counts as the last legal move.

    Args:
        action: ``[B]`` this round's action codes (may be ILLEGAL).
        prev: ``[B]`` the player's remembered previous legal move.
    """
    return torch.where(action == ILLEGAL, prev, action)


def next_prev(action: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Memory-1 update (PAPER.md section 3): an illegal answer leaves the remembered move unchanged."""
    return effective_action(action, prev)


def random_moves(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` uniform random legal moves drawn from ``generator``."""
    return torch.randint(0, 2, (n,), generator=generator)
