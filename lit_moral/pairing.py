"""Who plays whom each iteration: fixed matches, round robin, random pairs (partner selection: its own phase).

A population's *members* are the LLM agents (their names) and the fixed strategies that belong to it
(``strategies``, by strategy name). A pairing turns them into pairs ``(row player, column player)``; every
pair with at least one LLM agent becomes a :class:`~lit_moral.rollout.Match` of ``episodes_per_iteration``
parallel games. The member in seat 1 is the column player (it sees the transposed table of an asymmetric game).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

from lit_moral.errors import ConfigError

PAIRINGS = ("fixed", "round_robin", "random", "selection")
LLM = "llm"


def fixed_pairs(agents: Sequence[str], opponents: dict[str, str]) -> list[tuple[str, str]]:
    """Each agent against its own opponent; agents whose opponent is ``llm`` play each other in order
    (the 1st against the 2nd, the 3rd against the 4th, ...).

    Args:
        agents: agent names in config order.
        opponents: agent -> a fixed strategy name or ``llm``.
    """
    llm = [a for a in agents if opponents[a] == LLM]
    if len(llm) % 2:
        raise ConfigError(f"opponent: 'llm' pairs agents two by two; {len(llm)} agent(s) have it: {llm}")
    pairs = [(llm[i], llm[i + 1]) for i in range(0, len(llm), 2)]
    return pairs + [(a, opponents[a]) for a in agents if opponents[a] != LLM]


def round_robin_pairs(members: Sequence[str], agents: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair of members that holds at least one agent, each once, in member order (the first sits in seat 0)."""
    return [(a, b) for a, b in combinations(members, 2) if a in agents or b in agents]


def random_pairs(members: Sequence[str], agents: Sequence[str], generator: torch.Generator) -> list[tuple[str, str]]:
    """Disjoint random pairs of the members (one sits out when their number is odd); pairs without an agent are
    dropped. Seats follow the random order."""
    order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
    pairs = [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]
    return [(a, b) for a, b in pairs if a in agents or b in agents]


def validate_population(agents: Sequence[str], strategies: Sequence[str], pairing: str, allowed: Sequence[str]) -> None:
    """Members are distinct names; population strategies are known fixed strategies; a pairing other than
    ``fixed`` needs at least two members."""
    from lit_moral.errors import check_choice

    check_choice("pairing", pairing, PAIRINGS)
    for i, name in enumerate(strategies):
        check_choice(f"strategies[{i}]", name, allowed)
    members = [*agents, *strategies]
    if len(set(members)) != len(members):
        raise ConfigError(f"strategies: population members must have distinct names; got {members}")
    if pairing != "fixed" and len(members) < 2:
        raise ConfigError(f"pairing: {pairing!r} needs at least two population members (agents + strategies)")


# ---------------------------------------------------------------------------------------------- partner selection
SELECTION_LABELS = tuple(f"player{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class SelectionRenderer:
    """Prompts in which one agent picks a partner among the other members (AIES'24's partner selection).

    The candidates are the other members in population order, shown under neutral labels (``playerA``,
    ``playerB``, ...) with the move each played most recently; the answer is one label, chosen by the labels'
    whole-string probabilities (a constrained choice of its own). A prompt id is the candidates' latest moves as
    bits (candidate k's move is bit k), so prompts are rendered when first needed: 2^K of them with K candidates.

    Args:
        tokenizer: the base model's tokenizer.
        candidates: member names, in the order their labels are given.
        actions: the game's two action strings (the latest moves are shown with them).
        wrap: the chat wrapping of a user turn (``PromptRenderer._wrap`` of the run's renderer).
    """

    def __init__(self, tokenizer, candidates: Sequence[str], actions: Sequence[str], wrap) -> None:
        if len(candidates) > len(SELECTION_LABELS):
            raise ConfigError(f"pairing: 'selection' shows at most {len(SELECTION_LABELS)} candidates; got "
                              f"{len(candidates)}")
        self.tokenizer, self.candidates, self.actions, self._wrap_fn = tokenizer, list(candidates), tuple(actions), wrap
        self.labels = SELECTION_LABELS[:len(candidates)]
        self.action_ids = [tokenizer(s, add_special_tokens=False).input_ids for s in self.labels]
        self.token_ids = _Lazy(self._tokens)
        self.texts = _Lazy(self.text)

    def text(self, pid: int) -> str:
        lines = [f"You are about to play a game with another agent, and you choose which one. There are "
                 f"{len(self.labels)} candidates; in their most recent round:"]
        lines += [f"- {label} chose {self.actions[(pid >> k) & 1]}" for k, label in enumerate(self.labels)]
        lines += ["Which agent do you choose to play with?",
                  f"Answer with exactly one of {', '.join(self.labels)} and nothing else. Do not explain.", "Your answer:"]
        return self._wrap_fn("\n".join(lines))

    def _tokens(self, pid: int) -> list[int]:
        return self.tokenizer(self.text(pid), add_special_tokens=False).input_ids

    def pid(self, latest: dict[str, int]) -> int:
        """The prompt id for the candidates' latest moves (member -> C/D code)."""
        return sum(int(latest[c]) << k for k, c in enumerate(self.candidates))


class _Lazy:
    """``table[i]`` computed by ``fn(i)`` the first time and kept (a prompt table rendered on demand)."""

    def __init__(self, fn) -> None:
        self.fn, self.cache = fn, {}

    def __getitem__(self, i: int):
        if i not in self.cache:
            self.cache[i] = self.fn(int(i))
        return self.cache[i]


def latest_moves(played: dict, members: Sequence[str], previous: dict[str, int]) -> dict[str, int]:
    """Each member's latest move: its majority move (C on a tie) in the last round of its games this iteration;
    members that did not play keep ``previous``.

    Args:
        played: agent -> AgentSamples parts per match (``rollout.play``'s result).
        members: every member's name.
        previous: member -> C/D code before this iteration.
    """
    from lit_moral.games import effective_action

    votes: dict[str, list[int]] = {m: [] for m in members}
    for parts in played.values():
        for s in parts:
            last = s.round == s.round.max()
            votes[s.agent] += effective_action(s.action[last], s.prev_me[last]).tolist()
            if s.opponent in votes and s.opponent not in played:  # a fixed strategy's last moves, as its partner saw them
                votes[s.opponent] += s.other_action[last].tolist()
    return {m: (int(sum(v) * 2 > len(v)) if v else previous[m]) for m, v in votes.items()}


def selection_matches(picks: dict[str, list[str]], members: Sequence[str], agents: Sequence[str], opponent_for,
                      match) -> list:
    """One match per (selector, picked partner), holding the selector's games with that partner (seat 0); a picked
    strategy is the selector's own instance of it (``opponent_for(selector, name)``); ``match`` builds a Match."""
    out = []
    for a, games in picks.items():
        for partner in [m for m in members if m in games]:
            other = partner if partner in agents else opponent_for(a, partner)
            out.append(match((a, other), games.count(partner)))
    return out


def selection_samples(agent: str, mv, pid: torch.Tensor, games: list[str], parts: Sequence, renderer: SelectionRenderer):
    """The selector's decisions as samples of their own, each rewarded with the selector's mean reward over the game
    it led to (AIES'24 rewards a selection with the round it led to; with one round per game they are the same).

    Args:
        agent: the selector. mv: its sampled decisions (``ActionSampler`` moves). pid: ``[n]`` their prompt ids.
        games: the partner picked for each of its ``n`` games. parts: the selector's AgentSamples per match.
        renderer: the selector's SelectionRenderer (its prompt table and candidate labels go with the samples).
    """
    from lit_moral.padding import pad_rows
    from lit_moral.rollout import AgentSamples

    mine = {s.opponent: s for s in parts if (s.seat == 0).all()}
    reward, pay_me, pay_other = (torch.zeros(len(games)) for _ in range(3))
    seen: dict[str, int] = {}
    for g, partner in enumerate(games):
        j = seen[partner] = seen.get(partner, -1) + 1  # the j-th game of this selector with this partner
        s = mine[partner]
        at = s.episode == j
        reward[g], pay_me[g], pay_other[g] = s.reward[at].mean(), s.payoff_me[at].mean(), s.payoff_other[at].mean()
    old_logp, mask = pad_rows(mv.logp)
    zeros = torch.zeros(len(games), dtype=torch.long)
    return AgentSamples(agent=agent, opponent="selection", pid=pid, choice=mv.choice, responses=mv.responses,
                        action=mv.choice, other_action=zeros, prev_me=zeros, prev_other=zeros,
                        episode=torch.arange(len(games)), round=zeros, seat=zeros, payoff_me=pay_me,
                        payoff_other=pay_other, reward=reward, components={}, old_logp=old_logp,
                        ref_logp=pad_rows(mv.ref_logp)[0], values=pad_rows(mv.values)[0],
                        entropy=pad_rows(mv.entropy)[0], mask=mask, format_mass=mv.format_mass,
                        table=renderer.token_ids, candidates=renderer.action_ids)
