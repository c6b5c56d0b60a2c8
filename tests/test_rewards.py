"""Reward types (protocol section 5) and per-round regrets (section 7), values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.games import ILLEGAL, C, D, MatrixGame
from lit_moral.rewards import (
    RewardSpec,
    compute_reward,
    deontological_regret,
    reward_components,
    utilitarian_regret,
)

IPD = MatrixGame.from_spec("IPD").payoffs
CUSTOM_MIX = {"game": 1.0, "utilitarian": 0.5, "deontological": 2.0}

# IPD, xi = 3. Columns: a_me, a_other, prev_other, game, deontological, utilitarian, game_deontological,
# custom (= game + 0.5 * utilitarian + 2 * deontological).
IPD_ROWS = [
    (C, C, C, 3, 0, 6, 3, 6),
    (C, C, D, 3, 0, 6, 3, 6),
    (C, D, C, 0, 0, 4, 0, 2),
    (C, D, D, 0, 0, 4, 0, 2),
    (D, C, C, 4, -3, 4, 1, 0),
    (D, C, D, 4, 0, 4, 4, 6),
    (D, D, C, 1, -3, 2, -2, -4),
    (D, D, D, 1, 0, 2, 1, 2),
]
REWARD_COLUMN = {"game": 3, "deontological": 4, "utilitarian": 5, "game_deontological": 6}

# Hand-typed (protocol section 1): (a_me, a_other) -> (R_M, R_O), best collective payoff.
PAPER_TABLE = {
    "IPD": ({(C, C): (3, 3), (C, D): (0, 4), (D, C): (4, 0), (D, D): (1, 1)}, 6),
    "ISH": ({(C, C): (4, 4), (C, D): (0, 3), (D, C): (3, 0), (D, D): (1, 1)}, 8),
    "ICN": ({(C, C): (2, 2), (C, D): (1, 4), (D, C): (4, 1), (D, D): (0, 0)}, 5),
    "BOS": ({(C, C): (3, 2), (C, D): (0, 0), (D, C): (0, 0), (D, D): (2, 3)}, 5),
    "ICD": ({(C, C): (1, 1), (C, D): (0, 0), (D, C): (0, 0), (D, D): (4, 4)}, 8),
}


def _t(*xs):
    return torch.tensor(xs, dtype=torch.long)


def _columns():
    a_me = _t(*(r[0] for r in IPD_ROWS))
    a_other = _t(*(r[1] for r in IPD_ROWS))
    prev = _t(*(r[2] for r in IPD_ROWS))
    return a_me, a_other, prev


@pytest.mark.parametrize("name", list(REWARD_COLUMN))
def test_named_reward_table_ipd(name):
    spec = RewardSpec.parse(name, xi=3.0)
    assert spec.name == name
    a_me, a_other, prev = _columns()
    total, comps = compute_reward(spec, a_me, a_other, prev, IPD)
    col = REWARD_COLUMN[name]
    assert total.tolist() == [float(r[col]) for r in IPD_ROWS]
    assert comps["game"].tolist() == [float(r[3]) for r in IPD_ROWS]
    assert comps["deontological"].tolist() == [float(r[4]) for r in IPD_ROWS]
    assert comps["utilitarian"].tolist() == [float(r[5]) for r in IPD_ROWS]
    assert comps["illegal"].tolist() == [0.0] * 8


@pytest.mark.parametrize("row", IPD_ROWS, ids=[f"{r[0]}{r[1]}|{r[2]}" for r in IPD_ROWS])
def test_each_combo_single_row(row):
    a_me, a_other, prev = _t(row[0]), _t(row[1]), _t(row[2])
    for name, col in REWARD_COLUMN.items():
        total, _ = compute_reward(RewardSpec.parse(name), a_me, a_other, prev, IPD)
        assert total.item() == row[col], name
    total, _ = compute_reward(RewardSpec.parse(CUSTOM_MIX), a_me, a_other, prev, IPD)
    assert total.item() == row[7]


def test_custom_weighted_mix_table():
    spec = RewardSpec.parse(CUSTOM_MIX)
    assert spec.name == "custom"
    assert dict(spec.weights) == {"game": 1.0, "utilitarian": 0.5, "deontological": 2.0}
    a_me, a_other, prev = _columns()
    total, comps = compute_reward(spec, a_me, a_other, prev, IPD)
    assert total.tolist() == [float(r[7]) for r in IPD_ROWS]
    recomposed = comps["game"] + 0.5 * comps["utilitarian"] + 2.0 * comps["deontological"] + comps["illegal"]
    assert torch.equal(total, recomposed)


@pytest.mark.parametrize("game", list(PAPER_TABLE))
def test_game_and_utilitarian_every_game(game):
    payoffs = MatrixGame.from_spec(game).payoffs
    table, _ = PAPER_TABLE[game]
    for (a, o), (r_m, r_o) in table.items():
        for prev in (C, D):
            g, _ = compute_reward(RewardSpec.parse("game"), _t(a), _t(o), _t(prev), payoffs)
            u, _ = compute_reward(RewardSpec.parse("utilitarian"), _t(a), _t(o), _t(prev), payoffs)
            gd, _ = compute_reward(RewardSpec.parse("game_deontological"), _t(a), _t(o), _t(prev), payoffs)
            de, _ = compute_reward(RewardSpec.parse("deontological"), _t(a), _t(o), _t(prev), payoffs)
            penalty = -3 if (a == D and prev == C) else 0
            assert g.item() == r_m
            assert u.item() == r_m + r_o
            assert de.item() == penalty
            assert gd.item() == r_m + penalty


def test_bos_game_deontological_values():
    bos = MatrixGame.from_spec("BOS").payoffs
    # D vs C after C: 0 - 3; D vs D after C: 2 - 3; D vs D after D: 2
    total, _ = compute_reward(RewardSpec.parse("game_deontological"), _t(D, D, D), _t(C, D, D), _t(C, C, D), bos)
    assert total.tolist() == [-3.0, -1.0, 2.0]


def test_xi_is_used():
    spec = RewardSpec.parse("deontological", xi=4.0)
    total, comps = compute_reward(spec, _t(D, D, C), _t(C, D, C), _t(C, C, C), IPD)
    assert total.tolist() == [-4.0, -4.0, 0.0]
    gd = RewardSpec.parse("game_deontological", xi=5.0)
    total, _ = compute_reward(gd, _t(D), _t(C), _t(C), IPD)
    assert total.item() == -1.0  # 4 - 5


@pytest.mark.parametrize("name", [*REWARD_COLUMN, "custom"])
def test_illegal_answer_every_reward(name):
    spec = RewardSpec.parse(CUSTOM_MIX if name == "custom" else name)
    # every (a_other, prev_other) combination, all illegal
    a_me = _t(ILLEGAL, ILLEGAL, ILLEGAL, ILLEGAL)
    a_other = _t(C, C, D, D)
    prev = _t(C, D, C, D)
    total, comps = compute_reward(spec, a_me, a_other, prev, IPD)
    assert total.tolist() == [-6.0] * 4
    assert comps["game"].tolist() == [0.0] * 4
    assert comps["deontological"].tolist() == [0.0] * 4
    assert comps["utilitarian"].tolist() == [0.0] * 4
    assert comps["illegal"].tolist() == [-6.0] * 4


def test_illegal_mixed_batch_and_custom_penalty():
    spec = RewardSpec.parse("game", illegal_penalty=-10.0)
    total, comps = compute_reward(spec, _t(C, ILLEGAL, D), _t(C, C, C), _t(C, C, C), IPD)
    assert total.tolist() == [3.0, -10.0, 4.0]
    assert comps["illegal"].tolist() == [0.0, -10.0, 0.0]


def test_reward_components_illegal_flag():
    comps = reward_components(_t(ILLEGAL, D), _t(D, C), _t(C, C), IPD, xi=3.0)
    assert comps["illegal"].tolist() == [1.0, 0.0]
    assert comps["game"].tolist() == [0.0, 4.0]
    assert comps["deontological"].tolist() == [0.0, -3.0]
    assert comps["utilitarian"].tolist() == [0.0, 4.0]


def test_reward_spec_parse_errors():
    with pytest.raises(ConfigError, match="reward"):
        RewardSpec.parse("selfish")
    with pytest.raises(ConfigError, match="reward component"):
        RewardSpec.parse({"gaem": 1.0})
    with pytest.raises(ConfigError, match=r"reward\.game"):
        RewardSpec.parse({"game": math.nan})
    with pytest.raises(ConfigError, match=r"reward\.game"):
        RewardSpec.parse({"game": True})
    with pytest.raises(ConfigError, match="at least one"):
        RewardSpec.parse({})
    with pytest.raises(ConfigError, match="train.reward"):
        RewardSpec.parse(3, field="train.reward")


def test_reward_spec_defaults():
    spec = RewardSpec.parse("game_deontological")
    assert spec.xi == 3.0 and spec.illegal_penalty == -6.0
    assert dict(spec.weights) == {"game": 1.0, "deontological": 1.0}
    assert RewardSpec.parse(spec) is spec


# ---------------------------------------------------------------- regrets (protocol section 7)

def test_deontological_regret_per_round():
    a_me = _t(C, C, D, D, ILLEGAL, ILLEGAL)
    prev = _t(C, D, C, D, C, D)
    assert deontological_regret(a_me, prev).tolist() == [0.0, 0.0, 3.0, 0.0, 6.0, 6.0]
    assert deontological_regret(a_me, prev, xi=4.0).tolist() == [0.0, 0.0, 4.0, 0.0, 6.0, 6.0]


def test_utilitarian_regret_per_round_ipd():
    a_me = _t(C, C, D, D, ILLEGAL, ILLEGAL)
    a_other = _t(C, D, C, D, C, D)
    got = utilitarian_regret(a_me, a_other, IPD).tolist()
    # U_max = 6, U_min = -6: (6 - U) / 12
    want = [0.0, 2 / 12, 2 / 12, 4 / 12, 1.0, 1.0]
    assert got == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("game", list(PAPER_TABLE))
def test_utilitarian_regret_per_round_every_game(game):
    payoffs = MatrixGame.from_spec(game).payoffs
    table, best = PAPER_TABLE[game]
    for (a, o), (r_m, r_o) in table.items():
        got = utilitarian_regret(_t(a), _t(o), payoffs).item()
        assert got == pytest.approx((best - (r_m + r_o)) / (best + 6), abs=1e-7)
    assert utilitarian_regret(_t(ILLEGAL), _t(C), payoffs).item() == pytest.approx(1.0)
    # range 0..1
    assert utilitarian_regret(_t(C, C, D, D), _t(C, D, C, D), payoffs).min().item() == 0.0
