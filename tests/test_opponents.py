"""Fixed-strategy opponents (protocol section 2)."""

from __future__ import annotations

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.games import C, D
from lit_moral.opponents import (
    OPPONENT_NAMES,
    AlwaysCooperate,
    AlwaysDefect,
    RandomOpponent,
    TitForTat,
    make_opponent,
)


def test_names():
    assert set(OPPONENT_NAMES) == {"tft", "always_cooperate", "always_defect", "random", "llm"}


def test_tft_copies_learner_previous_move():
    tft = make_opponent("tft")
    assert isinstance(tft, TitForTat)
    learner_prev = torch.tensor([C, D, D, C])
    own_prev = torch.tensor([D, D, C, C])
    out = tft.act(learner_prev, own_prev)
    assert out.tolist() == [C, D, D, C]
    # a copy, not the caller's tensor: mutating the result must not change the state
    out[0] = D
    assert learner_prev.tolist() == [C, D, D, C]


def test_tft_over_an_episode():
    tft = TitForTat()
    learner_moves = [C, D, D, C, C]
    prev = torch.tensor([D])  # learner's 'previous' move at the start
    own = torch.tensor([C])
    got = []
    for m in learner_moves:
        own = tft.act(prev, own)
        got.append(own.item())
        prev = torch.tensor([m])
    assert got == [D, C, D, D, C]


def test_always_cooperate():
    ac = make_opponent("always_cooperate")
    assert isinstance(ac, AlwaysCooperate)
    assert ac.first_move(4).tolist() == [C, C, C, C]
    assert ac.act(torch.tensor([C, D, D]), torch.tensor([D, D, C])).tolist() == [C, C, C]


def test_always_defect():
    ad = make_opponent("always_defect")
    assert isinstance(ad, AlwaysDefect)
    assert ad.first_move(3).tolist() == [D, D, D]
    assert ad.act(torch.tensor([C, C, D]), torch.tensor([C, D, C])).tolist() == [D, D, D]


def test_first_move_dtype_is_long():
    assert AlwaysCooperate().first_move(2).dtype == torch.long
    assert AlwaysDefect().first_move(2).dtype == torch.long


def test_random_seeded_same_seed_same_moves():
    x = torch.zeros(500, dtype=torch.long)
    a = make_opponent("random", seed=11)
    b = make_opponent("random", seed=11)
    assert isinstance(a, RandomOpponent)
    assert torch.equal(a.act(x, x), b.act(x, x))
    assert torch.equal(a.first_move(50), b.first_move(50))


def test_random_different_seed_different_moves():
    x = torch.zeros(500, dtype=torch.long)
    a = make_opponent("random", seed=0).act(x, x)
    b = make_opponent("random", seed=1).act(x, x)
    assert not torch.equal(a, b)


def test_random_ignores_history():
    r1, r2 = RandomOpponent(5), RandomOpponent(5)
    zeros = torch.zeros(100, dtype=torch.long)
    ones = torch.ones(100, dtype=torch.long)
    assert torch.equal(r1.act(zeros, zeros), r2.act(ones, ones))


def test_random_roughly_uniform():
    r = RandomOpponent(seed=3)
    moves = r.act(torch.zeros(10000, dtype=torch.long), torch.zeros(10000, dtype=torch.long))
    assert set(moves.tolist()) == {C, D}
    frac_d = moves.float().mean().item()
    assert abs(frac_d - 0.5) < 0.03  # std 0.005
    first = r.first_move(10000).float().mean().item()
    assert abs(first - 0.5) < 0.03


def test_random_state_dict_round_trip():
    x = torch.zeros(64, dtype=torch.long)
    r = RandomOpponent(seed=42)
    r.act(x, x)  # advance the stream
    state = r.state_dict()
    cont_a = r.act(x, x)
    cont_a2 = r.act(x, x)
    # restore into the same object
    r.load_state_dict(state)
    assert torch.equal(r.act(x, x), cont_a)
    assert torch.equal(r.act(x, x), cont_a2)
    # restore into a fresh object with another seed
    other = RandomOpponent(seed=999)
    other.load_state_dict(state)
    assert torch.equal(other.act(x, x), cont_a)


def test_state_dict_is_a_snapshot():
    x = torch.zeros(32, dtype=torch.long)
    r = RandomOpponent(seed=1)
    state = r.state_dict()
    first = r.act(x, x)
    r.act(x, x)
    r.load_state_dict(state)
    assert torch.equal(r.act(x, x), first)


@pytest.mark.parametrize("name", ["tit_for_tat", "TFT", "llm", "", "cooperate"])
def test_make_opponent_rejects_unknown(name):
    with pytest.raises(ConfigError) as e:
        make_opponent(name, field="train.opponent")
    msg = str(e.value)
    assert "train.opponent" in msg
    for allowed in ("tft", "always_cooperate", "always_defect", "random"):
        assert allowed in msg


def test_make_opponent_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'random'"):
        make_opponent("randon")
