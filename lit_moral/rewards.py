"""Pure reward functions (protocol section 5, BEYOND section 1) and per-round regrets (protocol section 7).

Every function takes action codes from the rewarded player's own view (it is the row player):
``a_me``, ``a_other`` (this round) and ``prev_other`` (the other's previous legal move, as shown in
the prompt). ``a_other`` must be legal: an illegal opponent answer is mapped to its last legal move
by :func:`lit_moral.games.effective_action` before it gets here. Payoffs are read only through
:func:`lit_moral.games.lookup`. ``docs/rewards.md`` lists every type, its constants and its regret.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from lit_moral.errors import ConfigError, check_choice
from lit_moral.games import ILLEGAL, C, D, lookup

XI = 3.0  # protocol section 5 (the LLM paper); the earlier papers use 5
BETA = 0.5  # IJCAI'23's virtue_mixed weight on equality (as a real number, not truncated to 0)


def _legal(a_me: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``a_me`` is a legal move, 0 where it is ILLEGAL (an illegal answer earns no component)."""
    return torch.where(a_me != ILLEGAL, value, torch.zeros_like(value))


def _indicator(mask: torch.Tensor, payoffs: torch.Tensor) -> torch.Tensor:
    """``mask`` as 0/1 in the payoffs' dtype; a mask on ``a_me == C`` or ``== D`` is already 0 for ILLEGAL."""
    return mask.to(payoffs.dtype)


def _equality(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """``1 - |r_M - r_O| / (|r_M| + |r_O|)``, and 1 when both payoffs are 0 (they are equal).

    For non-negative payoffs (every named game) the denominator is the paper's ``r_M + r_O``; the absolute
    values keep the value in [0, 1] for custom tables with negative payoffs, where ``r_M + r_O`` can be 0
    or negative for unequal payoffs.
    """
    scale = mine.abs() + theirs.abs()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, 1 - (mine - theirs).abs() / safe, torch.ones_like(scale))


def game_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` the game payoff r_M (selfish).

    Every reward type takes ``(a_me [B], a_other [B], prev_other [B], payoffs [2, 2, 2], xi, beta)``, ignores the
    constants it does not use, and gives 0 where ``a_me`` is ILLEGAL.
    """
    return _legal(a_me, lookup(payoffs, a_me, a_other)[0])


def utilitarian_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                       xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` the collective payoff r_M + r_O."""
    mine, theirs = lookup(payoffs, a_me, a_other)
    return _legal(a_me, mine + theirs)


def anti_utilitarian_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                            xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` -(r_M + r_O) (AIES'24)."""
    mine, theirs = lookup(payoffs, a_me, a_other)
    return _legal(a_me, 0.0 - (mine + theirs))  # 0 - x, not -x: an outcome worth 0 gives +0.0, not -0.0


def altruist_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                    xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` the other's payoff r_O (AIES'24 code)."""
    return _legal(a_me, lookup(payoffs, a_me, a_other)[1])


def deontological_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                         xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` -xi for defecting against an agent that cooperated last round (protocol section 5), else 0."""
    # Written as a choice, not -xi * indicator, so that rows without the violation are +0.0, not -0.0.
    violated = (a_me == D) & (prev_other == C)
    return torch.where(violated, -float(xi), 0.0).to(payoffs.dtype)


def malicious_deontological_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                                   xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` +xi for defecting against an agent that cooperated last round (AIES'24), else 0."""
    return float(xi) * _indicator((a_me == D) & (prev_other == C), payoffs)


def virtue_kindness_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                           xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` xi for cooperating, else 0."""
    return float(xi) * _indicator(a_me == C, payoffs)


def virtue_aggression_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                             xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` xi for defecting, else 0 (AIES'24)."""
    return float(xi) * _indicator(a_me == D, payoffs)


def virtue_equality_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                           xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` 1 - |r_M - r_O| / (r_M + r_O) in [0, 1]; 1 when both payoffs are 0 (see :func:`_equality`)."""
    return _legal(a_me, _equality(*lookup(payoffs, a_me, a_other)))


def virtue_inequality_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                             xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` |r_M - r_O| / (r_M + r_O) = 1 - equality (AIES'24); 0 when both payoffs are 0."""
    return _legal(a_me, 1 - _equality(*lookup(payoffs, a_me, a_other)))


def virtue_mixed_reward(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor, payoffs: torch.Tensor,
                        xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` beta * equality + (1 - beta) * (1 if a_M = C else 0) (IJCAI'23; its cooperation term is 1, not xi)."""
    equality = virtue_equality_reward(a_me, a_other, prev_other, payoffs)
    return float(beta) * equality + (1 - float(beta)) * _indicator(a_me == C, payoffs)


RewardFunction = Callable[..., torch.Tensor]
# Component name -> reward function; the first three are the LLM paper's (protocol section 5), in today's order.
REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "game": game_reward,
    "deontological": deontological_reward,
    "utilitarian": utilitarian_reward,
    "virtue_equality": virtue_equality_reward,
    "virtue_kindness": virtue_kindness_reward,
    "virtue_mixed": virtue_mixed_reward,
    "anti_utilitarian": anti_utilitarian_reward,
    "malicious_deontological": malicious_deontological_reward,
    "virtue_inequality": virtue_inequality_reward,
    "virtue_aggression": virtue_aggression_reward,
    "altruist": altruist_reward,
}
COMPONENTS = tuple(REWARD_FUNCTIONS)
NAMED_REWARDS: dict[str, dict[str, float]] = {
    **{name: {name: 1.0} for name in COMPONENTS},
    "game_deontological": {"game": 1.0, "deontological": 1.0},
}


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field}: must be a finite number; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RewardSpec:
    """A reward as a weighted sum of components, plus the illegal-answer penalty.

    Attributes:
        weights: component name -> weight; components are the names in ``COMPONENTS``.
        xi: the constant of every xi-based component (deontological, malicious_deontological,
            virtue_kindness, virtue_aggression); protocol section 5: 3, the earlier papers: 5.
        illegal_penalty: reward for an illegal answer, whatever the weights (protocol section 3: -6).
        name: display name (a named reward, or ``custom``).
        beta: virtue_mixed's weight on equality, in [0, 1] (IJCAI'23: 0.5).
    """

    weights: Mapping[str, float] = field(default_factory=lambda: {"deontological": 1.0})
    xi: float = XI
    illegal_penalty: float = -6.0
    name: str = "custom"
    beta: float = BETA

    @classmethod
    def parse(cls, spec: object, xi: float = XI, illegal_penalty: float = -6.0,
              field: str = "reward", beta: float = BETA) -> RewardSpec:
        """Build from a name (``"virtue_equality"``) or a weight mapping (``{"game": 1, "virtue_equality": 0.5}``).

        A RewardSpec is returned as it is. Errors name ``field`` and the allowed names.
        """
        if isinstance(spec, RewardSpec):
            return spec
        beta = _number(f"{field}.beta", beta)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"{field}.beta: must be in [0, 1]; got {beta!r}")
        if isinstance(spec, str):
            check_choice(field, spec, NAMED_REWARDS)
            return cls(dict(NAMED_REWARDS[spec]), float(xi), float(illegal_penalty), spec, beta)
        if isinstance(spec, Mapping):
            if not spec:
                raise ConfigError(f"{field}: a weight mapping needs at least one of {', '.join(COMPONENTS)}")
            for k, v in spec.items():
                check_choice(f"{field} component", k, COMPONENTS)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"{field}.{k}: weight must be a finite number; got {v!r}")
            return cls({k: float(v) for k, v in spec.items()}, float(xi), float(illegal_penalty), "custom", beta)
        raise ConfigError(f"{field}: expected a reward name ({', '.join(NAMED_REWARDS)}) or a mapping "
                          f"component -> weight; got {spec!r}")


def reward_components(a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor,
                      payoffs: torch.Tensor, xi: float = XI, beta: float = BETA) -> dict[str, torch.Tensor]:
    """Every component for every round, whatever the weights (TensorBoard logs them all).

    Args:
        a_me: ``[B]`` long in {C, D, ILLEGAL}.
        a_other: ``[B]`` long in {C, D}.
        prev_other: ``[B]`` long in {C, D}, the other's previous move.
        payoffs: ``[2, 2, 2]`` game table of the rewarded player's view.
        xi: constant of the xi-based components.
        beta: virtue_mixed's weight on equality.

    Returns:
        ``COMPONENTS`` and ``"illegal"`` -> ``[B]`` float; every component is 0 where ``a_me`` is ILLEGAL, and
        ``illegal`` is 1 there (0 elsewhere).
    """
    comps = {name: fn(a_me, a_other, prev_other, payoffs, xi, beta) for name, fn in REWARD_FUNCTIONS.items()}
    comps["illegal"] = (a_me == ILLEGAL).to(comps["game"].dtype)
    return comps


def _weighted(spec: RewardSpec, comps: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` the weighted sum of the components, without the illegal penalty."""
    total = torch.zeros_like(comps["game"])
    for name, w in spec.weights.items():
        total = total + w * comps[name]
    return total


def compute_reward(spec: RewardSpec, a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor,
                   payoffs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total reward and its components.

    Returns:
        ``(total [B], components)``: total = sum of weighted components for legal moves, the illegal
        penalty otherwise; components has every entry of :func:`reward_components`, with ``illegal``
        scaled to the penalty, so ``total == sum(w * comp) + comp["illegal"]``.
    """
    comps = reward_components(a_me, a_other, prev_other, payoffs, spec.xi, spec.beta)
    comps["illegal"] = torch.where(comps["illegal"] > 0, float(spec.illegal_penalty), 0.0)
    return comps["illegal"] + _weighted(spec, comps), comps


# ---------------------------------------------------------------- regrets (protocol section 7, docs/rewards.md)

def deontological_regret(a_me: torch.Tensor, prev_other: torch.Tensor, xi: float = 3.0,
                         illegal_penalty: float = -6.0) -> torch.Tensor:
    """``[B]`` per-round deontological regret ``0 - R_De`` (section 7): 0 best; an illegal answer counts ``-penalty``."""
    dev = a_me.device
    deon = torch.where((a_me == D) & (prev_other == C), torch.full(a_me.shape, float(xi), device=dev),
                       torch.zeros(a_me.shape, device=dev))
    return torch.where(a_me == ILLEGAL, torch.full(a_me.shape, -float(illegal_penalty), device=dev), deon)


def utilitarian_regret(a_me: torch.Tensor, a_other: torch.Tensor, payoffs: torch.Tensor,
                       illegal_penalty: float = -6.0) -> torch.Tensor:
    """``[B]`` per-round normalised utilitarian regret ``(U_max - R_Ut) / (U_max - U_min)`` (section 7).

    ``U_max`` is the game's best collective payoff, ``U_min`` the illegal penalty; range 0..1.
    """
    u_max = float(payoffs.sum(-1).max())
    mine, theirs = lookup(payoffs, a_me, a_other)
    r_ut = torch.where(a_me != ILLEGAL, mine + theirs, torch.full_like(mine, float(illegal_penalty)))
    return (u_max - r_ut) / (u_max - float(illegal_penalty))


def reward_range(spec: RewardSpec, payoffs: torch.Tensor) -> tuple[float, float]:
    """``(lowest, highest)`` legal value of ``spec``'s weighted reward in the game (``[2, 2, 2]`` table), over
    the eight situations ``(a_me, a_other, prev_other)`` in {C, D}^3; the illegal penalty is not included."""
    a_me = torch.tensor([C, C, C, C, D, D, D, D])
    a_other = torch.tensor([C, C, D, D, C, C, D, D])
    prev_other = torch.tensor([C, D, C, D, C, D, C, D])
    values = _weighted(spec, reward_components(a_me, a_other, prev_other, payoffs, spec.xi, spec.beta))
    return float(values.min()), float(values.max())


def reward_regret(reward: object, a_me: torch.Tensor, a_other: torch.Tensor, prev_other: torch.Tensor,
                  payoffs: torch.Tensor, xi: float = XI, beta: float = BETA) -> torch.Tensor:
    """``[B]`` per-round normalised regret of any reward type or weighted mix, in [0, 1] (0 best).

    Regret = (best value M could have got with C or D, holding O's move ``a_other`` and ``prev_other``
    fixed, minus the value M got) / (the reward's legal range in this game, :func:`reward_range`). An
    illegal answer counts 1, the worst (no legal move exceeds 1). A reward that is constant over the
    game's legal outcomes gives every legal move 0. Unlike :func:`utilitarian_regret`, whose reference is
    the game's best collective payoff whatever O does, the reference here is M's best reply to O's move.

    Args:
        reward: a component or named reward (``"virtue_equality"``), a weight mapping, or a RewardSpec
            (whose own ``xi`` and ``beta`` are then used).
        a_me: ``[B]`` long in {C, D, ILLEGAL}.
        a_other: ``[B]`` long in {C, D}, O's effective move this round.
        prev_other: ``[B]`` long in {C, D}, O's previous move.
        payoffs: ``[2, 2, 2]`` table of M's view.
        xi: constant of the xi-based components.
        beta: virtue_mixed's weight on equality.
    """
    spec = RewardSpec.parse(reward, xi, field="reward_regret: reward", beta=beta)

    def value(a: torch.Tensor) -> torch.Tensor:
        return _weighted(spec, reward_components(a, a_other, prev_other, payoffs, spec.xi, spec.beta))

    best = torch.maximum(value(torch.full_like(a_me, C)), value(torch.full_like(a_me, D)))
    got = value(a_me)
    lo, hi = reward_range(spec, payoffs)
    regret = (best - got) / (hi - lo) if hi > lo else torch.zeros_like(got)
    return torch.where(a_me == ILLEGAL, torch.ones_like(regret), regret)
