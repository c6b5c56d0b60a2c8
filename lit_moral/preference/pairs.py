"""Preference pairs: a labeller that prefers the action of higher moral value, label noise, JSONL files.

A pair is one prompt of the training game (a game table, a memory-1 state, the two option orders, the two
action strings) and two answers, the chosen and the rejected action string. The labeller's rule:

* the **value** of an action ``a`` in a state ``(prev_me, prev_other)`` is the named reward's value
  (:func:`lit_moral.rewards.compute_reward`) for ``a`` given the other's previous move; a reward that also
  depends on the other's *current* move (game, utilitarian) takes its expectation under an **opponent model**
  (``tft``, the default: the other repeats my previous move, as the fixed opponent of the paper's PPO runs;
  ``repeat``: the other repeats its own previous move; ``uniform``: C or D with probability 1/2;
  ``always_cooperate``; ``always_defect``). The deontological reward does not depend on it;
* the chosen answer is the action of higher value; states where both values are equal (**ties**, e.g. the
  deontological reward after the other defected) are skipped (``ties: skip``, the default: states are then
  drawn uniformly among the states that separate the actions) or labelled at random (``ties: random``);
* with probability ``noise`` a label is flipped (its own random stream), as a noisy human labeller would.

States, option orders, tie labels and flips each come from their own stream derived from the seed
(:func:`lit_moral.seeding.generator`), so the same seed gives the same pairs to DPO and to the reward model.
Files are JSON lines, one pair per line (see :func:`pair_to_json` and ``docs/preference.md``), so that
pairs from other labellers (people) can be trained on; :func:`read_pairs` names the line and field of
anything wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lit_moral.errors import ConfigError, check_choice, check_positive
from lit_moral.games import GAME_NAMES, C, D, MatrixGame
from lit_moral.prompts import PromptStyle, prompt_id, render_text, validate_actions
from lit_moral.rewards import RewardSpec, compute_reward
from lit_moral.seeding import generator

OPPONENT_MODELS = ("tft", "repeat", "uniform", "always_cooperate", "always_defect")
TIES = ("skip", "random")
STATES = ("CC", "CD", "DC", "DD")  # (my previous move, the other's previous move); index = prev_me * 2 + prev_other
REQUIRED = ("game", "state", "orders", "actions", "chosen", "rejected", "labeller")


@dataclass(frozen=True)
class PairConfig:
    """Where the preference pairs come from: a file, or the moral labeller.

    Attributes:
        file: a JSONL file of pairs (one per line, docs/preference.md); when set, the labeller fields below are
            not used. None: the labeller makes ``budget`` pairs.
        labeller: the reward the labeller prefers by: game, deontological, utilitarian, game_deontological, or a
            mapping component -> weight such as ``{game: 1, utilitarian: 0.5}``.
        opponent_model: what the labeller assumes the other plays this round, for rewards that depend on it:
            tft (repeats my previous move), repeat (repeats its own previous move), uniform, always_cooperate,
            always_defect.
        ties: what happens where both actions have the same value: skip (no pair from such states) or random
            (a random label).
        noise: probability that a label is flipped (0 <= noise < 0.5).
        budget: number of labelled pairs.
        games: games whose tables the prompts show (None: the run's ``game``).
        xi: deontological penalty used by the labeller (protocol section 5: 3).
    """

    file: str | None = None
    labeller: str | dict[str, float] = "deontological"
    opponent_model: str = "tft"
    ties: str = "skip"
    noise: float = 0.0
    budget: int = 256
    games: list[str | list] | None = None
    xi: float = 3.0

    def __post_init__(self) -> None:
        check_choice("pairs.opponent_model", self.opponent_model, OPPONENT_MODELS)
        check_choice("pairs.ties", self.ties, TIES)
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise < 0.5:
            raise ConfigError(f"pairs.noise: got {self.noise!r}; must be a flip probability in [0, 0.5)")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise ConfigError(f"pairs.budget: got {self.budget!r}; must be a whole number > 0")
        check_positive("pairs.budget", self.budget)
        RewardSpec.parse(self.labeller, self.xi, field="pairs.labeller")
        if self.games is not None and not self.games:
            raise ConfigError("pairs.games: got an empty list; give at least one game or null (the run's game)")
        for g in self.games or []:
            game_key(g, "pairs.games")


@dataclass(frozen=True)
class PreferencePair:
    """One labelled pair: a prompt and two answers, the chosen first.

    Attributes:
        game: a game name (IPD, ...) or the payoffs as nested tuples ``[2][2][2]`` (row player's view).
        prev_me: my previous move shown in the prompt (C = 0, D = 1).
        prev_other: the other's previous move shown in the prompt.
        orders: the two option-order bits (0: C's string listed first) of the question and the format line.
        actions: the two action strings, C's first.
        chosen: the action code (C or D) of the chosen answer; the other is the rejected one.
        labeller: who labelled it (a name; the moral labeller writes ``<reward>@<opponent model>``).
        flipped: True when label noise flipped the labeller's choice; None when unknown (e.g. human labels).
    """

    game: str | tuple
    prev_me: int
    prev_other: int
    orders: tuple[int, int]
    actions: tuple[str, str]
    chosen: int
    labeller: str
    flipped: bool | None = field(default=None, compare=False)

    @property
    def rejected(self) -> int:
        return 1 - self.chosen

    @property
    def prompt_id(self) -> int:
        """The prompt id (0..15) of the state and option orders (:func:`lit_moral.prompts.prompt_id`)."""
        return int(prompt_id(torch.tensor(self.prev_me), torch.tensor(self.prev_other), torch.tensor(self.orders[0]),
                             torch.tensor(self.orders[1])))

    @property
    def state(self) -> str:
        return STATES[self.prev_me * 2 + self.prev_other]

    def matrix_game(self) -> MatrixGame:
        return matrix_game(self.game)


def _nested_list(x):
    return [_nested_list(v) for v in x] if isinstance(x, (list, tuple)) else float(x)


def _nested_tuple(x):
    return tuple(_nested_tuple(v) for v in x) if isinstance(x, (list, tuple)) else float(x)


def matrix_game(spec: str | list | tuple | MatrixGame, field: str = "game") -> MatrixGame:
    """The game of a name, a nested payoff list or a :func:`game_key`."""
    return MatrixGame.from_spec(_nested_list(spec) if isinstance(spec, tuple) else spec, field)


def game_key(spec: str | list | tuple | MatrixGame, field: str = "game") -> str | tuple:
    """A hashable game spec: the canonical name of a named game, else its payoffs as nested tuples."""
    game = matrix_game(spec, field)
    return game.name if game.name in GAME_NAMES else _nested_tuple(game.payoffs.tolist())


# ---- the labeller ----------------------------------------------------------------------------------------
def p_other_cooperates(opponent_model: str, prev_me: torch.Tensor, prev_other: torch.Tensor) -> torch.Tensor:
    """``[B]`` probability that the other plays C this round under the labeller's opponent model."""
    check_choice("opponent_model", opponent_model, OPPONENT_MODELS)
    ones = torch.ones(prev_me.shape)
    return {"tft": (prev_me == C).float(), "repeat": (prev_other == C).float(), "uniform": 0.5 * ones,
            "always_cooperate": ones, "always_defect": 0.0 * ones}[opponent_model]


def action_values(spec: RewardSpec, payoffs: torch.Tensor, prev_me: torch.Tensor, prev_other: torch.Tensor,
                  opponent_model: str = "tft") -> torch.Tensor:
    """The labeller's value of each action in each state.

    Args:
        spec: the labeller's reward.
        payoffs: ``[2, 2, 2]`` table (row player's view).
        prev_me: ``[B]`` my previous move. prev_other: ``[B]`` the other's previous move.
        opponent_model: the other's move this round (see :data:`OPPONENT_MODELS`).

    Returns:
        ``[B, 2]``: expected reward of C (column 0) and D (column 1) over the other's move this round.
    """
    p = p_other_cooperates(opponent_model, prev_me, prev_other)
    out = torch.zeros(prev_me.shape[0], 2)
    for a in (C, D):
        me = torch.full(prev_me.shape, a, dtype=torch.long)
        for b, weight in ((C, p), (D, 1 - p)):
            total, _ = compute_reward(spec, me, torch.full_like(me, b), prev_other, payoffs)
            out[:, a] += weight * total
    return out


def labeller_name(cfg: PairConfig) -> str:
    spec = RewardSpec.parse(cfg.labeller, cfg.xi, field="pairs.labeller")
    reward = spec.name if spec.name != "custom" else "+".join(f"{w:g}*{k}" for k, w in spec.weights.items())
    return f"{reward}@{cfg.opponent_model}"


def label_pairs(cfg: PairConfig, actions: Sequence[str], seed: int, default_game: str | list = "IPD",
                ) -> list[PreferencePair]:
    """``cfg.budget`` pairs labelled by the moral labeller (module doc): sampled states and option orders.

    Raises:
        ConfigError: with ``ties: skip``, no state of any game separates the two actions.
    """
    spec = RewardSpec.parse(cfg.labeller, cfg.xi, field="pairs.labeller")
    games = [game_key(g, "pairs.games") for g in (cfg.games or [default_game])]
    me, other = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])  # the four states, in STATES order
    values = torch.stack([action_values(spec, matrix_game(g).payoffs, me, other, cfg.opponent_model)
                          for g in games])  # [G, 4, 2]
    tie = values[..., 0] == values[..., 1]
    cells = [(g, s) for g in range(len(games)) for s in range(4) if cfg.ties == "random" or not tie[g, s]]
    if not cells:
        raise ConfigError(f"pairs.labeller: {labeller_name(cfg)} values C and D equally in every state of "
                          f"{list(games)}; no pair to label (use ties: random, or another reward)")
    pick = torch.randint(0, len(cells), (cfg.budget,), generator=generator(seed, "preference", "states")).tolist()
    orders = torch.randint(0, 2, (cfg.budget, 2), generator=generator(seed, "preference", "orders")).tolist()
    coin = torch.randint(0, 2, (cfg.budget,), generator=generator(seed, "preference", "ties")).tolist()
    flip = (torch.rand(cfg.budget, generator=generator(seed, "preference", "noise")) < cfg.noise).tolist()
    name, acts = labeller_name(cfg), validate_actions(actions)
    out = []
    for i, k in enumerate(pick):
        g, s = cells[k]
        best = coin[i] if tie[g, s] else int(values[g, s, 1] > values[g, s, 0])
        out.append(PreferencePair(games[g], s // 2, s % 2, (orders[i][0], orders[i][1]), acts,
                                  best ^ int(flip[i]), name, bool(flip[i])))
    return out


# ---- files -----------------------------------------------------------------------------------------------
def pair_to_json(pair: PreferencePair, with_prompt: bool = True) -> dict:
    """The JSON object of one line: what a human labeller sees and chose (``prompt`` is the user-turn text)."""
    game = pair.game if isinstance(pair.game, str) else _nested_list(pair.game)
    row = {"game": game, "state": pair.state, "orders": list(pair.orders), "actions": list(pair.actions),
           "prompt_id": pair.prompt_id, "chosen": pair.actions[pair.chosen], "rejected": pair.actions[pair.rejected],
           "labeller": pair.labeller}
    if pair.flipped is not None:
        row["flipped"] = pair.flipped
    if with_prompt:
        row["prompt"] = render_text(pair.matrix_game(), PromptStyle(actions=pair.actions), pair.prev_me,
                                    pair.prev_other, *pair.orders)
    return row


def write_pairs(pairs: Sequence[PreferencePair], path: str | Path, with_prompt: bool = True) -> Path:
    """Write ``pairs`` as JSON lines (one pair a line) to ``path``; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(pair_to_json(x, with_prompt)) + "\n" for x in pairs))
    return p


def _bad(where: str, name: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: field {name!r}: {message}")


def _bit(where: str, name: str, value: object) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise _bad(where, name, f"got {value!r}; each entry must be 0 or 1")
    return int(value)


def _fields(row: Mapping, where: str) -> tuple:
    """Check one row's fields one by one; returns ``(game, prev_me, prev_other, orders, actions)``."""
    try:
        game = game_key(row["game"] if isinstance(row["game"], str) else list(row["game"]))
    except (ConfigError, TypeError) as e:
        raise _bad(where, "game", f"{e}") from None
    state = row["state"]
    if state not in STATES:
        raise _bad(where, "state", f"got {state!r}; allowed: {', '.join(STATES)} (my previous move, then the other's)")
    orders = row["orders"]
    if not isinstance(orders, list) or len(orders) != 2:
        raise _bad(where, "orders", f"got {orders!r}; expected two bits [question order, format-line order]")
    orders = (_bit(where, "orders", orders[0]), _bit(where, "orders", orders[1]))
    if not isinstance(row["actions"], list) or not all(isinstance(a, str) for a in row["actions"]):
        raise _bad(where, "actions", f"got {row['actions']!r}; expected two strings, C's first")
    try:
        actions = validate_actions(row["actions"])
    except ConfigError as e:
        raise _bad(where, "actions", str(e).removeprefix("actions: ")) from None
    return game, STATES.index(state) // 2, STATES.index(state) % 2, orders, actions


def parse_pair(row: object, where: str) -> PreferencePair:
    """One JSON object -> a PreferencePair; a ConfigError names ``where`` (file and line) and the field."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED)}; got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise _bad(where, missing[0], f"missing (required: {', '.join(REQUIRED)})")
    game, prev_me, prev_other, orders, actions = _fields(row, where)
    for name in ("chosen", "rejected"):
        if row[name] not in actions:
            raise _bad(where, name, f"got {row[name]!r}; must be one of the pair's actions {list(actions)}")
    if row["chosen"] == row["rejected"]:
        raise _bad(where, "rejected", f"got {row['rejected']!r}, the same answer as 'chosen'")
    if not isinstance(row["labeller"], str) or not row["labeller"].strip():
        raise _bad(where, "labeller", f"got {row['labeller']!r}; expected a non-empty name")
    flipped = row.get("flipped")
    if flipped is not None and not isinstance(flipped, bool):
        raise _bad(where, "flipped", f"got {flipped!r}; expected true, false or no field")
    pair = PreferencePair(game, prev_me, prev_other, orders, actions, actions.index(row["chosen"]), row["labeller"],
                          flipped)
    if "prompt_id" in row and row["prompt_id"] != pair.prompt_id:
        raise _bad(where, "prompt_id", f"got {row['prompt_id']!r}, but state {pair.state} and orders {list(orders)} "
                                       f"are prompt id {pair.prompt_id}")
    if "prompt" in row and row["prompt"] != pair_to_json(pair)["prompt"]:
        raise _bad(where, "prompt", "is not the prompt lit_moral shows for this game, state, orders and actions; "
                                    "fix it or leave the field out (the prompt is rendered from the other fields)")
    return pair


def read_pairs(path: str | Path, field: str = "pairs.file") -> list[PreferencePair]:
    """Read and validate a JSONL file of pairs (blank lines are ignored).

    Raises:
        ConfigError: naming ``field`` when the file is missing or holds no pair, else the file, line and field.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{field}: {str(p)!r} does not exist or is not a file")
    pairs = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); one JSON object per line") from None
        pairs.append(parse_pair(row, where))
    if not pairs:
        raise ConfigError(f"{field}: {str(p)!r} holds no pair (one JSON object per line)")
    return pairs


def load_pairs(cfg: PairConfig, actions: Sequence[str], seed: int, default_game: str | list = "IPD",
               ) -> list[PreferencePair]:
    """The pairs a run trains on: ``cfg.file`` if set, else ``cfg.budget`` pairs from the moral labeller."""
    if cfg.file is not None:
        return read_pairs(cfg.file)
    return label_pairs(cfg, actions, seed, default_game)
