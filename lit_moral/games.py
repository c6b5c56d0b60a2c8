"""Actions, payoff matrices and the batched memory-1 game state (protocol sections 1-3).

Action codes: ``C = 0`` (first action string), ``D = 1`` (second), ``ILLEGAL = 2``.
Payoffs are ``[2, 2, 2]`` tensors: ``payoffs[a_row, a_col] = (payoff to row, payoff to column)``.
The column player of a match sees and is paid by the transposed table (:meth:`MatrixGame.view`), so in
an asymmetric game such as BOS the two ledgers differ; every player is the row player of its own view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_moral.errors import ConfigError, check_choice

C, D, ILLEGAL = 0, 1, 2
ACTION_NAMES = ("C", "D", "illegal")
# Action types (protocol section 7): the player's action given the other's previous move, "X|Y" = played X
# after the other played Y; index = action * 2 + prev_other. The figures merge the two illegal types.
ACTION_TYPES = ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")
PLOTTED_TYPES = ("C|C", "C|D", "D|C", "D|D", "illegal")

# protocol section 1: entry = (payoff to the row player M, payoff to the column player O).
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
    """A 2x2 matrix game, seen from the row player (``view(1)`` is the column player's table).

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
    def symmetric(self) -> bool:
        """Whether both players see the same table (``payoffs[a, b] == payoffs[b, a]`` swapped)."""
        return bool(torch.equal(self.payoffs, self.transposed().payoffs))

    def transposed(self) -> MatrixGame:
        """The column player's view: ``view[a_me, a_other] = (its payoff, the row player's payoff)``."""
        return MatrixGame(self.name, self.payoffs.permute(1, 0, 2).flip(-1).contiguous())

    def view(self, seat: int) -> MatrixGame:
        """The game as the player in ``seat`` (0 = row, 1 = column) sees it: every player is the row player of
        its own view, so prompts, rewards and regrets are computed alike for both seats."""
        return self if seat == 0 else self.transposed()

    @property
    def max_collective(self) -> float:
        """Best collective payoff ``max(R_M + R_O)`` over the four outcomes (protocol section 1)."""
        return float(self.payoffs.sum(-1).max())

    def payoff(self, a_me: torch.Tensor, a_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Payoffs for legal actions.

        Args:
            a_me: ``[B]`` long, values in {C, D}.
            a_other: ``[B]`` long, values in {C, D}.

        Returns:
            ``(mine [B], theirs [B])`` floats.
        """
        return lookup(self.payoffs, a_me, a_other)


def lookup(payoffs: torch.Tensor, a_me: torch.Tensor, a_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mine [B], theirs [B])`` payoffs of legal actions in a ``[2, 2, 2]`` table (the one place a table is read).

    Illegal codes are read as C; callers mask them (rewards) or map them to the last legal move first
    (:func:`effective_action`).
    """
    a = torch.where(a_me == ILLEGAL, torch.zeros_like(a_me), a_me)
    b = torch.where(a_other == ILLEGAL, torch.zeros_like(a_other), a_other)
    p = payoffs.to(a_me.device)[a, b]
    return p[..., 0], p[..., 1]


def action_type_index(action: torch.Tensor, prev_other: torch.Tensor) -> torch.Tensor:
    """``[B]`` index into ACTION_TYPES."""
    return action.long() * 2 + prev_other.long()


def effective_action(action: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The move that counts for the other player's payoff: an illegal answer counts as the last legal move.

    Args:
        action: ``[B]`` this round's action codes (may be ILLEGAL).
        prev: ``[B]`` the player's remembered previous legal move.
    """
    return torch.where(action == ILLEGAL, prev, action)


def next_prev(action: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Memory-1 update (protocol section 3): an illegal answer leaves the remembered move unchanged."""
    return effective_action(action, prev)


def random_moves(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` uniform random legal moves drawn from ``generator``."""
    return torch.randint(0, 2, (n,), generator=generator)
