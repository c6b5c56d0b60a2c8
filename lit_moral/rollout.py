"""No-grad batched play: prompts -> actions -> rewards, collected into per-agent sample batches.

All games of an iteration are played in parallel. Each round, every LLM player's requests (both
agents, and the reference policy for the KL penalty) are resolved in one mixed-adapter forward over
the *distinct* prompts only; results are memoised for the whole iteration (the policy does not
change during a rollout), so a prompt is run at most once per iteration and agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from lit_moral.games import ILLEGAL, MatrixGame, effective_action, lookup, next_prev, random_moves
from lit_moral.generate import generate, reference_logprobs
from lit_moral.opponents import Opponent
from lit_moral.padding import pad_rows, pad_steps
from lit_moral.policy import BASE, Policy
from lit_moral.prompts import PromptRenderer
from lit_moral.reason import action_line_stop
from lit_moral.rewards import RewardSpec, compute_reward
from lit_moral.seeding import Streams


@dataclass
class AgentSamples:
    """One agent's moves in an iteration, flattened over (game, round). ``N`` samples, ``T`` steps.

    Attributes:
        pid: ``[N]`` prompt id. choice: ``[N]`` candidate index (constrained) or -1.
        responses: ``N`` generated token tuples (free mode) or the chosen candidate's tokens.
        action, other_action, prev_me, prev_other: ``[N]`` action codes (other_action is the other
            player's effective legal move; prev_* are the moves shown in the prompt).
        episode, round: ``[N]`` indices within the iteration. opponent: name of the other player.
        seat: ``[N]`` 0 = row player, 1 = column player of its match (the column player's table is
            ``game.view(1)``).
        payoff_me, payoff_other: ``[N]`` both players' game payoffs from this player's view, an illegal answer
            counting as the last legal move (the illegal player's own reward is the penalty, not this payoff).
        reward: ``[N]`` total reward. components: name -> ``[N]``.
        old_logp, ref_logp, values, entropy: ``[N, T]``; mask: ``[N, T]`` bool.
        format_mass: ``[N]`` probability outside the legal strings (constrained) or NaN (free).
        table, candidates: the prompt table (token ids by prompt id) and candidate strings these samples were drawn
            from, when not the run's game prompts (partner-selection decisions); None otherwise.
    """

    agent: str
    opponent: str
    pid: torch.Tensor
    choice: torch.Tensor
    responses: list[tuple[int, ...]]
    action: torch.Tensor
    other_action: torch.Tensor
    prev_me: torch.Tensor
    prev_other: torch.Tensor
    episode: torch.Tensor
    round: torch.Tensor
    seat: torch.Tensor
    payoff_me: torch.Tensor
    payoff_other: torch.Tensor
    reward: torch.Tensor
    components: dict[str, torch.Tensor]
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    format_mass: torch.Tensor
    table: object = None
    candidates: list | None = None

    def __len__(self) -> int:
        return self.pid.shape[0]


@dataclass
class Match:
    """``n`` parallel games between two players, each an agent name or a fixed Opponent."""

    players: tuple[str | Opponent, str | Opponent]
    n: int


@dataclass
class _Moves:
    """Per-request results of one round for one agent."""

    action: torch.Tensor
    choice: torch.Tensor
    responses: list[tuple[int, ...]]
    logp: list[torch.Tensor]
    ref_logp: list[torch.Tensor]
    values: list[torch.Tensor]
    entropy: list[torch.Tensor]
    format_mass: torch.Tensor


@dataclass
class ActionSampler:
    """Samples actions from the policy for batches of prompt ids, memoising distinct prompts.

    The sampler holds no random state: every :meth:`act` draws from the generator it is given.

    Args:
        policy: the Policy (in eval mode during rollouts).
        renderer: prompt tokens by prompt id.
        mode: ``constrained`` (choose among the legal strings by whole-string probability), ``free``
            (sample up to ``max_new_tokens`` tokens at temperature 1, then exact-match) or ``reason`` (sample up
            to ``max_new_tokens`` tokens with the KV-cached generator of :mod:`lit_moral.generate`, at the
            policy's temperature and ``top_p``, then parse strictly: :mod:`lit_moral.reason`).
        max_new_tokens: free/reason-mode generation length.
        with_reference: also compute the reference (adapter-disabled) log-probs.
        naive: the obvious path, for benchmarks: every sample on its own, one full forward per
            sequence with full-vocabulary logits, nothing shared or memoised.
        top_p: reason mode: nucleus sampling mass.
        stop_at_action: reason mode: a row stops generating at its first completed ``Action:`` line.
        cut_illegal: free mode: a row whose text can no longer become legal
            (:meth:`~lit_moral.prompts.PromptRenderer.may_become_legal`) gets no more forwards and no more tokens:
            its action (illegal) is the one the full path gives, its response ends at that token. It still takes
            one draw per remaining step from the sampling stream, from a uniform stand-in of the vocabulary's size
            (a draw consumes the stream by the vocabulary's size, whatever the probabilities), so with
            ``max_new_tokens`` 2 every other sample is the full path's; with more, the full row could have stopped
            at end-of-text before the stand-ins do, and later draws differ (same distribution). For the
            evaluation, which reads actions only; training keeps whole responses (their log-probs are trained).
        prefetch: free mode: a prompt's first step also runs the step after each legal answer's first token
            (:meth:`_resolve`); False: the path without it (benchmarks).
    """

    policy: Policy
    renderer: PromptRenderer
    mode: str
    max_new_tokens: int = 2
    with_reference: bool = True
    naive: bool = False
    top_p: float = 1.0
    stop_at_action: bool = True
    cut_illegal: bool = False
    prefetch: bool = True
    _memo: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Forget memoised results (call whenever the weights change)."""
        self._memo.clear()

    def _resolve(self, keys: Sequence[tuple[str, int, tuple[int, ...]]]) -> None:
        """Compute missing memo entries ``(adapter, pid, prefix)`` in one mixed-adapter forward. Free mode: a
        prompt's first step also computes the step after the first token of each legal answer (in the same
        forward, sharing the prompt's cache), the path a model that answers legally takes next."""
        if self.mode == "free" and self.prefetch and not self.naive and self.max_new_tokens > 1:
            firsts = sorted({ids[0] for ids in self.renderer.action_ids if len(ids) > 1})
            keys = [*keys, *((a, p, (f,)) for a, p, pre in keys if not pre for f in firsts)]
        missing = sorted({k for k in keys if k not in self._memo})
        if not missing or self.mode == "reason":  # reason mode generates without the memo
            return
        table = self.renderer.token_ids
        if self.naive:
            for a, p, pre in missing:
                if self.mode == "constrained":
                    seqs = [self.policy.naive_forward(a, list(table[p]) + list(c)) for c in self.renderer.action_ids]
                    n = len(table[p])
                    seq = torch.stack([lp[n - 1: n - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).sum()
                                       for (lp, _), c in zip(seqs, self.renderer.action_ids)])
                    self._memo[(a, p, pre)] = (seq.cpu(), seqs[0][1][n - 1].cpu())
                else:
                    lp, val = self.policy.naive_forward(a, list(table[p]) + list(pre))
                    self._memo[(a, p, pre)] = (lp[-1].cpu(), val[-1].cpu())
            return
        prompts = sorted({(a, p) for a, p, _ in missing})
        where = {k: i for i, k in enumerate(prompts)}
        plist = [(a, table[p]) for a, p in prompts]
        if self.mode == "constrained":
            out = self.policy.candidate_logprobs(plist, self.renderer.action_ids)
            for (a, p), i in where.items():
                self._memo[(a, p, ())] = (out["seq_logp"][i].cpu(), out["values"][i].cpu())
            return
        out = self.policy.continuation_logprobs(plist, [(where[(a, p)], list(pre)) for a, p, pre in missing],
                                                values=True, next_token=True)
        for j, k in enumerate(missing):
            self._memo[k] = (out["next_logp"][j].cpu(), out["next_values"][j].cpu())

    def act(self, requests: Sequence[tuple[str, torch.Tensor]], generator: torch.Generator) -> list[_Moves]:
        """Sample moves for several agents at once.

        Args:
            requests: ``(agent, pid [n])`` per LLM player.
            generator: the sampling stream.
        """
        if self.mode == "reason":
            return self._reason(requests, generator)
        adapters = lambda a: [a, BASE] if self.with_reference else [a]  # noqa: E731
        if self.naive:
            out = []
            for a, pid in requests:
                parts = []
                for p in pid:
                    self._memo.clear()
                    parts.append(self._act_batch([(a, p.view(1))], adapters, generator)[0])
                out.append(_Moves(torch.cat([x.action for x in parts]), torch.cat([x.choice for x in parts]),
                                  [r for x in parts for r in x.responses], [v for x in parts for v in x.logp],
                                  [v for x in parts for v in x.ref_logp], [v for x in parts for v in x.values],
                                  [v for x in parts for v in x.entropy], torch.cat([x.format_mass for x in parts])))
            self._memo.clear()
            return out
        return self._act_batch(requests, adapters, generator)

    def _act_batch(self, requests, adapters, generator) -> list[_Moves]:
        if self.mode == "constrained":
            self._resolve([(x, int(p), ()) for a, pid in requests for x in adapters(a) for p in pid.unique()])
            return [self._choose(a, pid, generator) for a, pid in requests]
        return self._generate(requests, adapters, generator)

    def _choose(self, agent: str, pid: torch.Tensor, generator: torch.Generator) -> _Moves:
        seq = torch.stack([self._memo[(agent, int(p), ())][0] for p in pid])
        val = torch.stack([self._memo[(agent, int(p), ())][1] for p in pid])
        logq = torch.log_softmax(seq, -1)
        choice = torch.multinomial(logq.exp(), 1, generator=generator).squeeze(1)
        logp = logq.gather(1, choice[:, None])
        if self.with_reference:
            ref = torch.stack([self._memo[(BASE, int(p), ())][0] for p in pid])
            ref_logp = torch.log_softmax(ref, -1).gather(1, choice[:, None])
        else:
            ref_logp = logp.clone()
        ent = -(logq.exp() * logq).sum(-1, keepdim=True)
        mass = 1.0 - seq.exp().sum(-1)
        cands = self.renderer.action_ids
        return _Moves(choice.clone(), choice, [tuple(cands[c]) for c in choice.tolist()], list(logp),
                      list(ref_logp), list(val[:, None]), list(ent), mass)

    def _reason(self, requests, generator) -> list[_Moves]:
        """Reason mode: every request's rows in one KV-cached generation (the naive sampler: without the cache),
        the reference log-probs after it in one teacher-forced pass, then the strict parse."""
        table = self.renderer.token_ids
        rows = [(a, table[p]) for a, pid in requests for p in pid.tolist()]
        tok = self.renderer.tokenizer
        g = generate(self.policy, rows, self.max_new_tokens, tok.eos_token_id, generator, top_p=self.top_p,
                     cached=not self.naive, stop=action_line_stop(tok) if self.stop_at_action else None)
        ref = reference_logprobs(self.policy, [t for _, t in rows], g.tokens) if self.with_reference else g.logp
        moves, k = [], 0
        for _, pid in requests:
            part = slice(k, k + pid.shape[0])
            k += pid.shape[0]
            action = torch.tensor([self.renderer.parse(r) for r in g.tokens[part]], dtype=torch.long)
            moves.append(_Moves(action, torch.full_like(action, -1), [tuple(r) for r in g.tokens[part]],
                                g.logp[part], ref[part], g.values[part], g.entropy[part],
                                torch.full((pid.shape[0],), float("nan"))))
        return moves

    def _generate(self, requests, adapters, generator) -> list[_Moves]:
        eos = self.renderer.tokenizer.eos_token_id
        state = []  # per request: responses, per-step logp/ref/value/entropy lists, done flags
        for _, pid in requests:
            n = pid.shape[0]
            state.append(([[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)],
                          [[] for _ in range(n)], [[] for _ in range(n)], [False] * n))
        cut = [[False] * pid.shape[0] for _, pid in requests]  # cut_illegal: rows that can no longer be legal
        for _ in range(self.max_new_tokens):
            keys, waiting = [], False
            for (a, pid), (resp, *_, done), dead in zip(requests, state, cut):
                for j, p in enumerate(pid.tolist()):
                    if not done[j] and not dead[j]:
                        keys += [(x, p, tuple(resp[j])) for x in adapters(a)]
                    waiting |= not done[j]
            if not waiting:
                break
            self._resolve(keys)
            for (a, pid), (resp, lps, refs, vals, ents, done), dead in zip(requests, state, cut):
                for j, p in enumerate(pid.tolist()):
                    if done[j]:
                        continue
                    if dead[j]:  # keep the sampling stream where the full path leaves it
                        torch.multinomial(torch.ones(self._memo[(a, p, ())][0].shape[-1]), 1, generator=generator)
                        continue
                    dist, value = self._memo[(a, p, tuple(resp[j]))]
                    tok = int(torch.multinomial(dist.exp(), 1, generator=generator))
                    lps[j].append(dist[tok])
                    refs[j].append(self._memo[(BASE, p, tuple(resp[j]))][0][tok] if self.with_reference else dist[tok])
                    vals[j].append(value)
                    ents[j].append(-(dist.exp() * dist).sum())
                    resp[j].append(tok)
                    done[j] = tok == eos
                    if self.cut_illegal and not done[j]:
                        dead[j] = not self.renderer.may_become_legal(resp[j])
        moves = []
        for resp, lps, refs, vals, ents, _ in state:
            action = torch.tensor([self.renderer.parse(r) for r in resp], dtype=torch.long)
            moves.append(_Moves(action, torch.full_like(action, -1), [tuple(r) for r in resp],
                                [torch.stack(x) for x in lps], [torch.stack(x) for x in refs],
                                [torch.stack(x) for x in vals], [torch.stack(x) for x in ents],
                                torch.full((len(resp),), float("nan"))))
        return moves


def _name(player: str | Opponent) -> str:
    return player if isinstance(player, str) else player.name


@torch.no_grad()
def play(sampler: ActionSampler, matches: Sequence[Match], game: MatrixGame, rounds: int,
         rewards: dict[str, RewardSpec], streams: Streams) -> dict[str, list[AgentSamples]]:
    """Play ``rounds`` rounds of every match in parallel (protocol sections 2-3, 5).

    Each round, the moves of every LLM player of every match are sampled in one :meth:`ActionSampler.act`
    (one mixed-adapter forward over the distinct prompts not yet memoised). Each game starts from a random
    previous-move state: an agent's move uniform (from ``streams.states``), a fixed opponent's from its
    ``first_move`` (its own stream). Option orders come from ``streams.orders`` and actions from
    ``streams.sampling``. The player in seat 1 of a match is the column player: it sees and is paid by
    ``game.view(1)``. An illegal answer leaves the player's remembered move unchanged and counts as that move
    for the other player's payoff.

    Returns:
        agent name -> one AgentSamples per match the agent plays in (in match order).
    """
    sampler.reset()
    views = (game.view(0), game.view(1))
    memory = getattr(getattr(sampler, "renderer", None), "memory", 1)
    # Each player's own last `memory` moves, oldest first ([n, memory]); each past round drawn as the start state is.
    hist = [[_start(p, m.n, memory, streams.states) for p in m.players] for m in matches]
    prev = [[h[:, -1] for h in hs] for hs in hist]
    rec = [{i: [] for i, p in enumerate(m.players) if isinstance(p, str)} for m in matches]
    for r in range(rounds):
        acts: list[list[torch.Tensor | None]] = [[None, None] for _ in matches]
        reqs, who = [], []
        for k, m in enumerate(matches):
            for i, p in enumerate(m.players):
                if isinstance(p, str):
                    pid = sampler.renderer.sample_ids(hist[k][i], hist[k][1 - i], streams.orders, seat=i)
                    reqs.append((p, pid))
                    who.append((k, i, pid))
                else:
                    acts[k][i] = p.act(prev[k][1 - i], prev[k][i], payoffs=views[i].payoffs)
        for (k, i, pid), mv in zip(who, sampler.act(reqs, streams.sampling)):
            acts[k][i] = mv.action
            rec[k][i].append({"pid": pid, "mv": mv, "round": r})
        for k, m in enumerate(matches):
            eff = [effective_action(acts[k][i], prev[k][i]) for i in range(2)]
            for i in rec[k]:
                total, comps = compute_reward(rewards[m.players[i]], acts[k][i], eff[1 - i], prev[k][1 - i],
                                              views[i].payoffs)
                pay_me, pay_other = lookup(views[i].payoffs, eff[i], eff[1 - i])
                rec[k][i][-1].update(action=acts[k][i], other=eff[1 - i], prev_me=prev[k][i],
                                     prev_other=prev[k][1 - i], reward=total, comps=comps, payoff_me=pay_me,
                                     payoff_other=pay_other)
            prev[k] = [next_prev(acts[k][i], prev[k][i]) for i in range(2)]
            hist[k] = [torch.cat([hist[k][i][:, 1:], prev[k][i][:, None]], 1) for i in range(2)]
    out: dict[str, list[AgentSamples]] = {}
    for m, rows_by_seat in zip(matches, rec):
        for i, rows in rows_by_seat.items():
            out.setdefault(m.players[i], []).append(_collect(m.players[i], _name(m.players[1 - i]), rows, m.n, i))
    return out


def _start(player: str | Opponent, n: int, memory: int, states: torch.Generator) -> torch.Tensor:
    """``[n, memory]`` a player's moves before an episode: an agent's uniform (the states stream), a fixed
    strategy's its ``first_move`` (its own stream), one draw per remembered round."""
    draw = (lambda: random_moves(n, states)) if isinstance(player, str) else (lambda: player.first_move(n))
    return torch.stack([draw() for _ in range(memory)], 1)


def _collect(agent: str, opponent: str, rows: list[dict], n: int, seat: int) -> AgentSamples:
    cat = lambda k: torch.cat([r[k] for r in rows])  # noqa: E731
    mvs = [r["mv"] for r in rows]
    flat = lambda attr: [x for mv in mvs for x in getattr(mv, attr)]  # noqa: E731
    old_logp, mask = pad_rows(flat("logp"))
    values, _ = pad_rows(flat("values"))
    entropy, _ = pad_rows(flat("entropy"))
    ref_logp, _ = pad_rows(flat("ref_logp"))
    comps = {k: torch.cat([r["comps"][k] for r in rows]) for k in rows[0]["comps"]}
    return AgentSamples(
        agent=agent, opponent=opponent, pid=cat("pid"),
        choice=torch.cat([mv.choice for mv in mvs]), responses=flat("responses"),
        action=cat("action"), other_action=cat("other"), prev_me=cat("prev_me"), prev_other=cat("prev_other"),
        episode=torch.arange(n).repeat(len(rows)), round=torch.cat([torch.full((n,), r["round"]) for r in rows]),
        seat=torch.full((n * len(rows),), seat), payoff_me=cat("payoff_me"), payoff_other=cat("payoff_other"),
        reward=cat("reward"), components=comps, old_logp=old_logp,
        ref_logp=ref_logp, values=values, entropy=entropy, mask=mask,
        format_mass=torch.cat([mv.format_mass for mv in mvs]),
    )


def merge(parts: Sequence[AgentSamples]) -> AgentSamples:
    """Concatenate one agent's samples from several matches (steps padded to the longest)."""
    if len(parts) == 1:
        return parts[0]
    t = max(p.mask.shape[1] for p in parts)
    out = {}
    for f in fields(AgentSamples):
        vals = [getattr(p, f.name) for p in parts]
        if f.name in ("agent", "table", "candidates"):
            out[f.name] = vals[0]
        elif f.name == "opponent":
            out[f.name] = "+".join(vals)
        elif isinstance(vals[0], list):
            out[f.name] = [x for v in vals for x in v]
        elif isinstance(vals[0], dict):
            out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in vals[0]}
        else:
            out[f.name] = torch.cat([pad_steps(v, t) if v.dim() == 2 else v for v in vals])
    return AgentSamples(**out)


__all__ = ["ILLEGAL", "ActionSampler", "AgentSamples", "Match", "merge", "play"]
