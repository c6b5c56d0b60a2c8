"""torchmetrics with additive (sum-reduced) states, so they sync exactly across processes.

Action types (protocol section 7) are the agent's action given the other's previous move:
``C|C, C|D, D|C, D|D, illegal|C, illegal|D`` (``X|Y`` = played X after the other played Y).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lit_moral.games import ACTION_TYPES, ILLEGAL, C, D, action_type_index
from lit_moral.rewards import deontological_regret, utilitarian_regret


class _SumMetric(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("dist_sync_on_step", True)
        super().__init__(**kwargs)


class ActionTypes(_SumMetric):
    """Counts of each action type; ``compute`` returns frequencies ``[6]`` (ACTION_TYPES order)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", torch.zeros(len(ACTION_TYPES), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, action: torch.Tensor, prev_other: torch.Tensor) -> None:
        idx = action_type_index(action.long(), prev_other.long()).to(self.counts.device)
        self.counts += torch.bincount(idx, minlength=len(ACTION_TYPES)).to(self.counts.dtype)

    def compute(self) -> torch.Tensor:
        return self.counts / self.counts.sum().clamp_min(1)


class CooperationRate(_SumMetric):
    """Share of rounds where the agent played C (illegal answers count in the denominator)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("coop", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, action: torch.Tensor) -> None:
        self.coop += (action == C).sum().to(self.coop.dtype).to(self.coop.device)
        self.total += action.numel()

    def compute(self) -> torch.Tensor:
        return self.coop / self.total.clamp_min(1)


class IllegalRate(_SumMetric):
    """Share of illegal answers."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("illegal", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, action: torch.Tensor) -> None:
        self.illegal += (action == ILLEGAL).sum().to(self.illegal.dtype).to(self.illegal.device)
        self.total += action.numel()

    def compute(self) -> torch.Tensor:
        return self.illegal / self.total.clamp_min(1)


class MoralRegret(_SumMetric):
    """Mean per-round moral regret (section 7): ``kind`` is ``deontological`` (0..6) or ``utilitarian`` (0..1).

    Args:
        kind: which regret.
        payoffs: ``[2, 2, 2]`` table of the game actually played (utilitarian regret needs it).
        xi: deontological penalty used for the regret (the paper's evaluation used 4, training 3).
        illegal_penalty: reward of an illegal answer.
    """

    def __init__(self, kind: str, payoffs: torch.Tensor | None = None, xi: float = 3.0,
                 illegal_penalty: float = -6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in ("deontological", "utilitarian"):
            raise ValueError(f"kind: {kind!r}; allowed: deontological, utilitarian")
        if kind == "utilitarian" and payoffs is None:
            raise ValueError("utilitarian regret needs the game's payoffs")
        self.kind, self.xi, self.illegal_penalty = kind, xi, illegal_penalty
        self.payoffs = None if payoffs is None else torch.as_tensor(payoffs, dtype=torch.float32)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, action: torch.Tensor, other_action: torch.Tensor, prev_other: torch.Tensor,
               seat: torch.Tensor | None = None) -> None:
        """Add ``[B]`` rounds; ``seat`` (``[B]``, 0 = row, 1 = column player; default all 0) picks the table each
        round is scored on: the column player of an asymmetric game is scored on its own, transposed, view."""
        action, other_action, prev_other = action.cpu(), other_action.cpu(), prev_other.cpu()
        if self.kind == "deontological":
            r = deontological_regret(action, prev_other, self.xi, self.illegal_penalty)
        else:
            r = utilitarian_regret(action, other_action, self.payoffs, self.illegal_penalty)
            if seat is not None and bool((seat == 1).any()):
                col = seat.cpu() == 1
                transposed = self.payoffs.permute(1, 0, 2).flip(-1)
                r[col] = utilitarian_regret(action[col], other_action[col], transposed, self.illegal_penalty)
        self.total += r.sum().to(self.total.dtype).to(self.total.device)
        self.count += r.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


__all__ = ["ACTION_TYPES", "ActionTypes", "CooperationRate", "IllegalRate", "MoralRegret", "action_type_index",
           "C", "D"]


def gini(x: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of non-negative values ``[M]`` (0: all equal; mean absolute difference / (2 x mean)).
    Payoffs can be negative in custom games: they are shifted to start at 0 first (equality is shift-invariant
    only this way); all zero gives 0."""
    x = x.double() - min(float(x.min()), 0.0)
    mean = x.mean()
    if mean <= 0:
        return torch.zeros((), dtype=torch.float64)
    return (x[:, None] - x[None, :]).abs().mean() / (2 * mean)


class PopulationPayoffs(_SumMetric):
    """Each population member's mean game payoff per round; ``compute`` gives the collective payoff (sum of the
    members' means), equality (1 - Gini of the means) and the minimum mean, over the members that played.

    Args:
        members: member names (agents and fixed strategies), in a fixed order.
    """

    def __init__(self, members: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.members = list(members)
        self.add_state("total", torch.zeros(len(members), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rounds", torch.zeros(len(members), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, member: str, payoffs: torch.Tensor) -> None:
        """Add ``[B]`` rounds' payoffs of ``member``."""
        i = self.members.index(member)
        self.total[i] += payoffs.double().sum().to(self.total.device)
        self.rounds[i] += payoffs.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        played = self.rounds > 0
        means = self.total[played] / self.rounds[played]
        if not bool(played.any()):
            zero = torch.zeros((), dtype=torch.float64)
            return {"collective_payoff": zero, "equality": zero + 1, "min_payoff": zero}
        return {"collective_payoff": means.sum(), "equality": 1 - gini(means), "min_payoff": means.min()}


class SelectionMatrix(_SumMetric):
    """Counts of partner selections: ``counts[i, j]`` = times selector ``selectors[i]`` picked ``members[j]``;
    ``compute`` gives each selector's shares (rows sum to 1 where it selected)."""

    def __init__(self, selectors: list[str], members: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.selectors, self.members = list(selectors), list(members)
        self.add_state("counts", torch.zeros(len(selectors), len(members), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, selector: str, picked: list[str]) -> None:
        i = self.selectors.index(selector)
        for name in picked:
            self.counts[i, self.members.index(name)] += 1

    def compute(self) -> torch.Tensor:
        return self.counts / self.counts.sum(1, keepdim=True).clamp_min(1)


class PublicGoodsRegret(_SumMetric):
    """Mean per-round moral regret in the n-player public-goods game (docs/public_goods.md): ``deontological``
    (``xi k_prev / (N - 1)`` when keeping, 0..6 with an illegal answer) or ``utilitarian`` (0..1, normalised by the
    best collective payoff and the illegal penalty). At N = 2 both equal :class:`MoralRegret`'s.

    Args:
        kind: which regret.
        game: a :class:`lit_moral.public_goods.PublicGoodsGame` (its regret functions are used).
        xi: deontological penalty used for the regret.
        illegal_penalty: reward of an illegal answer.
    """

    def __init__(self, kind: str, game, xi: float = 3.0, illegal_penalty: float = -6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in ("deontological", "utilitarian"):
            raise ValueError(f"kind: {kind!r}; allowed: deontological, utilitarian")
        self.kind, self.game, self.xi, self.illegal_penalty = kind, game, xi, illegal_penalty
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, action: torch.Tensor, k_others: torch.Tensor, k_prev: torch.Tensor) -> None:
        """Add ``[B]`` rounds: the action, the others contributing this round and in the previous one."""
        action, k_others, k_prev = action.cpu(), k_others.cpu(), k_prev.cpu()
        if self.kind == "deontological":
            r = self.game.deontological_regret(action, k_prev, self.xi, self.illegal_penalty)
        else:
            r = self.game.utilitarian_regret(action, k_others, self.illegal_penalty)
        self.total += r.sum().to(self.total.dtype).to(self.total.device)
        self.count += r.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


class ConditionalContribution(_SumMetric):
    """The conditional-contribution curve of the public-goods game: P(C | own previous move, k_prev), with
    k_prev = others who contributed last round; illegal answers count as not contributing.

    ``compute`` returns ``[2, N]`` (row 0: after the player's own C, row 1: after its D; column k = k_prev),
    NaN where a state had no rounds.

    Args:
        n_players: N.
    """

    def __init__(self, n_players: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_players = n_players
        self.add_state("contributions", torch.zeros(2 * n_players, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rounds", torch.zeros(2 * n_players, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, action: torch.Tensor, prev_me: torch.Tensor, k_prev: torch.Tensor) -> None:
        """Add ``[B]`` rounds: the action, the player's own previous move (C/D) and k_prev."""
        idx = (prev_me.long() * self.n_players + k_prev.long()).cpu()
        size = 2 * self.n_players
        self.rounds += torch.bincount(idx, minlength=size).to(self.rounds.dtype).to(self.rounds.device)
        given = torch.bincount(idx[action.cpu() == C], minlength=size)
        self.contributions += given.to(self.contributions.dtype).to(self.contributions.device)

    def compute(self) -> torch.Tensor:
        p = self.contributions / self.rounds.clamp_min(1)
        return torch.where(self.rounds > 0, p, torch.full_like(p, float("nan"))).view(2, self.n_players)
