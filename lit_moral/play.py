"""``python -m lit_moral play --ckpt <checkpoint or adapter folder>``: play against a trained agent in a terminal.

You are the other player (type C or D each round, q to stop), or watch the agent against a fixed strategy
(``--opponent tft``). Each round shows last round's moves (the state the agent's prompt shows), the agent's
probability for each action and its move, then both payoffs and the running totals. The agent's actions are
shown as C (its first action string, ``action1``) and D (the second).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from lit_moral.agent import Agent
from lit_moral.errors import ConfigError
from lit_moral.games import ACTION_NAMES, MatrixGame
from lit_moral.opponents import OPPONENTS, make_opponent


def play(agent: Agent, rounds: int, opponent: str = "human", seed: int = 0, sample: bool = True,
         ask=input, say=print) -> dict[str, float]:
    """Play ``rounds`` rounds; returns both totals. ``ask``/``say`` are the terminal (tests pass scripted ones)."""
    gen = torch.Generator().manual_seed(seed)
    game: MatrixGame = agent.game
    fixed = make_opponent(opponent, seed=seed) if opponent != "human" else None
    prev_me = ("C", "D")[int(torch.randint(0, 2, (), generator=gen))]
    # the other's "previous" move of the first prompt: a fixed strategy's own opening (grim C, suspicious_tft D, ...)
    prev_other = ACTION_NAMES[int(fixed.first_move(1)[0])] if fixed else ("C", "D")[int(torch.randint(0, 2, (), generator=gen))]
    totals = {"agent": 0.0, "other": 0.0}
    say(f"{game.name}: you are the column player. Payoffs (agent, you): CC {_pay(game, 0, 0)}, CD {_pay(game, 0, 1)}, "
        f"DC {_pay(game, 1, 0)}, DD {_pay(game, 1, 1)}. C = {agent.style.actions[0]}, D = {agent.style.actions[1]}.")
    for r in range(rounds):
        p = agent.probabilities(prev_me, prev_other)
        a = agent.move(prev_me, prev_other, sample=sample, generator=gen)
        say(f"round {r + 1}: last round the agent played {prev_me}, the other {prev_other} | agent P(C) {p['C']:.3f} "
            f"P(D) {p['D']:.3f} (mass on the two strings {p['legal_mass']:.3g})")
        if fixed is None:
            o = _ask_move(ask)
            if o is None:
                break
        else:
            o = ACTION_NAMES[int(fixed.act(torch.tensor([ACTION_NAMES.index(prev_me)]),
                                           torch.tensor([ACTION_NAMES.index(prev_other)]),
                                           payoffs=game.view(1).payoffs)[0])]
        mine, theirs = (float(x) for x in game.payoffs[ACTION_NAMES.index(a), ACTION_NAMES.index(o)])
        totals["agent"] += mine
        totals["other"] += theirs
        say(f"  agent plays {a}, {'you play' if fixed is None else opponent + ' plays'} {o}: agent {mine:g}, "
            f"other {theirs:g} | totals: agent {totals['agent']:g}, other {totals['other']:g}")
        prev_me, prev_other = a, o
    return totals


def _pay(game: MatrixGame, a: int, b: int) -> str:
    return "/".join(f"{float(x):g}" for x in game.payoffs[a, b])


def _ask_move(ask) -> str | None:
    while True:
        try:
            text = ask("  your move (C, D, q to stop): ").strip().upper()
        except EOFError:
            return None
        if text in ("C", "D"):
            return text
        if text in ("Q", "QUIT"):
            return None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lit_moral play", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a lit_moral .ckpt or an exported adapter folder")
    ap.add_argument("--agent", default=None, help="which agent of a two-agent checkpoint (default: the first)")
    ap.add_argument("--opponent", default="human", help=f"human (you), or a fixed strategy: {', '.join(OPPONENTS)}")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--game", default=None, help="IPD, ISH, ICN, BOS, ICD (default: the training game)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--greedy", action="store_true", help="the agent plays its more probable move (default: samples)")
    args = ap.parse_args(argv)
    try:
        if args.opponent != "human" and args.opponent not in OPPONENTS:
            from lit_moral.errors import check_choice

            check_choice("opponent", args.opponent, ["human", *OPPONENTS])
        agent = Agent.load(args.ckpt, agent=args.agent, game=args.game)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    play(agent, args.rounds, args.opponent, args.seed, sample=not args.greedy)
