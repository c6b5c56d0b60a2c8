"""Payoff tables, validation and the illegal-move rule (protocol sections 1 and 3)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.games import (
    ACTION_NAMES,
    GAME_NAMES,
    ILLEGAL,
    C,
    D,
    MatrixGame,
    effective_action,
    next_prev,
    random_moves,
    validate_payoffs,
)

# Typed by hand from protocol section 1: (a_me, a_other) -> (payoff to M, payoff to O), plus best collective.
PAPER_TABLE = {
    "IPD": ({(C, C): (3, 3), (C, D): (0, 4), (D, C): (4, 0), (D, D): (1, 1)}, 6),
    "ISH": ({(C, C): (4, 4), (C, D): (0, 3), (D, C): (3, 0), (D, D): (1, 1)}, 8),
    "ICN": ({(C, C): (2, 2), (C, D): (1, 4), (D, C): (4, 1), (D, D): (0, 0)}, 5),
    "BOS": ({(C, C): (3, 2), (C, D): (0, 0), (D, C): (0, 0), (D, D): (2, 3)}, 5),
    "ICD": ({(C, C): (1, 1), (C, D): (0, 0), (D, C): (0, 0), (D, D): (4, 4)}, 8),
}
CASES = [(g, a, o) for g in PAPER_TABLE for (a, o) in PAPER_TABLE[g][0]]


def test_action_codes():
    assert (C, D, ILLEGAL) == (0, 1, 2)
    assert ACTION_NAMES == ("C", "D", "illegal")
    assert set(GAME_NAMES) == {"IPD", "ISH", "ICN", "BOS", "ICD"}


@pytest.mark.parametrize("name,a_me,a_other", CASES)
def test_every_payoff_matches_paper(name, a_me, a_other):
    game = MatrixGame.from_spec(name)
    want_me, want_other = PAPER_TABLE[name][0][(a_me, a_other)]
    assert game.payoffs[a_me, a_other, 0].item() == want_me
    assert game.payoffs[a_me, a_other, 1].item() == want_other
    mine, theirs = game.payoff(torch.tensor([a_me]), torch.tensor([a_other]))
    assert mine.tolist() == [float(want_me)]
    assert theirs.tolist() == [float(want_other)]


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_batched_payoff_and_max_collective(name):
    game = MatrixGame.from_spec(name)
    assert game.name == name
    assert game.payoffs.dtype == torch.float32 and tuple(game.payoffs.shape) == (2, 2, 2)
    table, best = PAPER_TABLE[name]
    assert game.max_collective == best
    a_me = torch.tensor([C, C, D, D])
    a_other = torch.tensor([C, D, C, D])
    mine, theirs = game.payoff(a_me, a_other)
    assert mine.tolist() == [float(table[(a, o)][0]) for a, o in zip(a_me.tolist(), a_other.tolist())]
    assert theirs.tolist() == [float(table[(a, o)][1]) for a, o in zip(a_me.tolist(), a_other.tolist())]


def test_symmetric_games_are_symmetric_and_bos_is_not():
    for name in ("IPD", "ISH", "ICN", "ICD"):
        p = MatrixGame.from_spec(name).payoffs
        # payoff to M at (a, b) equals payoff to O at (b, a)
        assert torch.equal(p[..., 0], p[..., 1].T)
    p = MatrixGame.from_spec("BOS").payoffs
    assert not torch.equal(p[..., 0], p[..., 1].T)


@pytest.mark.parametrize("spec", ["ipd", "Ipd", "IPD", "iPd"])
def test_from_spec_case_insensitive(spec):
    game = MatrixGame.from_spec(spec)
    assert game.name == "IPD"
    assert game.payoffs[D, C].tolist() == [4.0, 0.0]


def test_from_spec_other_names_lowercase():
    assert MatrixGame.from_spec("bos").name == "BOS"
    assert MatrixGame.from_spec("icd").max_collective == 8.0


def test_from_spec_rejects_unknown_name_listing_allowed():
    with pytest.raises(ConfigError) as e:
        MatrixGame.from_spec("chess", field="eval.game")
    msg = str(e.value)
    assert "eval.game" in msg and "'chess'" in msg
    for name in ("IPD", "ISH", "ICN", "BOS", "ICD"):
        assert name in msg


def test_from_spec_custom_table_and_passthrough():
    custom = [[[5, 5], [-1, 6]], [[6, -1], [0, 0]]]
    game = MatrixGame.from_spec(custom)
    assert game.name == "custom"
    assert game.payoffs[C, D].tolist() == [-1.0, 6.0]
    assert game.max_collective == 10.0
    assert MatrixGame.from_spec(game) is game


@pytest.mark.parametrize(
    "bad",
    [
        [[3, 0], [4, 1]],  # [2, 2]
        [[[3, 3, 3], [0, 4, 4]], [[4, 0, 0], [1, 1, 1]]],  # [2, 2, 3]
        [[[3, 3], [0, 4]]],  # [1, 2, 2]
        [[[3, 3], [0, 4]], [[4, 0], [1, 1]], [[1, 1], [1, 1]]],  # [3, 2, 2]
        3.0,  # scalar
    ],
)
def test_validate_payoffs_rejects_wrong_shape(bad):
    with pytest.raises(ConfigError) as e:
        validate_payoffs(bad, field="my_game")
    assert "my_game" in str(e.value)
    assert "[2, 2, 2]" in str(e.value)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_validate_payoffs_rejects_non_finite(bad_value):
    table = [[[3, 3], [0, 4]], [[4, bad_value], [1, 1]]]
    with pytest.raises(ConfigError) as e:
        validate_payoffs(table, field="custom_payoffs")
    assert "custom_payoffs" in str(e.value)
    assert "finite" in str(e.value)


def test_validate_payoffs_rejects_non_numbers():
    with pytest.raises(ConfigError) as e:
        validate_payoffs([[["a", "b"], ["c", "d"]], [["e", "f"], ["g", "h"]]], field="tbl")
    assert "tbl" in str(e.value)


def test_from_spec_custom_bad_shape_names_field():
    with pytest.raises(ConfigError, match="train.game"):
        MatrixGame.from_spec([[1, 2], [3, 4]], field="train.game")


def test_validate_payoffs_accepts_and_converts():
    t = validate_payoffs([[[3, 3], [0, 4]], [[4, 0], [1, 1]]])
    assert t.dtype == torch.float32
    assert t.tolist() == [[[3.0, 3.0], [0.0, 4.0]], [[4.0, 0.0], [1.0, 1.0]]]


def test_effective_action_illegal_keeps_remembered_move():
    action = torch.tensor([C, D, ILLEGAL, ILLEGAL, C, D])
    prev = torch.tensor([D, C, C, D, C, D])
    assert effective_action(action, prev).tolist() == [C, D, C, D, C, D]
    assert next_prev(action, prev).tolist() == [C, D, C, D, C, D]


def test_next_prev_over_several_rounds():
    # M plays C, illegal, illegal, D, illegal: remembered move is C, C, C, D, D.
    prev = torch.tensor([D])
    seen = []
    for a in (C, ILLEGAL, ILLEGAL, D, ILLEGAL):
        prev = next_prev(torch.tensor([a]), prev)
        seen.append(prev.item())
    assert seen == [C, C, C, D, D]


def test_random_moves_seeded_and_legal():
    a = random_moves(200, torch.Generator().manual_seed(7))
    b = random_moves(200, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.shape == (200,)
    assert set(a.tolist()) == {C, D}
