"""Reward types (protocol section 5) and per-round regrets (section 7), values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.games import ILLEGAL, C, D, MatrixGame
from lit_moral.rewards import (
    COMPONENTS,
    NAMED_REWARDS,
    REWARD_FUNCTIONS,
    RewardSpec,
    compute_reward,
    deontological_regret,
    reward_components,
    reward_range,
    reward_regret,
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


# ---------------------------------------------------------------- every moral type (BEYOND section 1, docs/rewards.md)

BOS = MatrixGame.from_spec("BOS").payoffs
OUTCOMES = [(C, C), (C, D), (D, C), (D, D)]  # (a_me, a_other), first letter = a_me
# xi = 5, beta = 0.5; per outcome CC, CD, DC, DD. IPD rows game..virtue_aggression are BEYOND's worked values.
IPD_TYPES = {
    "game": [3, 0, 4, 1],
    "utilitarian": [6, 4, 4, 2],
    "anti_utilitarian": [-6, -4, -4, -2],
    "altruist": [3, 4, 0, 1],
    "virtue_equality": [1, 0, 0, 1],
    "virtue_inequality": [0, 1, 1, 0],
    "virtue_kindness": [5, 5, 0, 0],
    "virtue_aggression": [0, 0, 5, 5],
    "virtue_mixed": [1, 0.5, 0, 0.5],  # 0.5 * equality + 0.5 * [a_me = C]
}
# BOS seen from the row player: CC (3, 2), CD (0, 0), DC (0, 0), DD (2, 3). Equality CC = 1 - 1/5; CD and DC
# pay both players 0: equality 1 by the guard.
BOS_TYPES = {
    "game": [3, 0, 0, 2],
    "utilitarian": [5, 0, 0, 5],
    "anti_utilitarian": [-5, 0, 0, -5],
    "altruist": [2, 0, 0, 3],
    "virtue_equality": [0.8, 1, 1, 0.8],
    "virtue_inequality": [0.2, 0, 0, 0.2],
    "virtue_kindness": [5, 5, 0, 0],
    "virtue_aggression": [0, 0, 5, 5],
    "virtue_mixed": [0.9, 1.0, 0.5, 0.4],
}
# Types that read the other's previous move, per (a_me, prev_other) = C|C, C|D, D|C, D|D, xi = 5: any game.
PREV_TYPES = {"deontological": [0, 0, -5, 0], "malicious_deontological": [0, 0, 5, 0]}


def _outcome_columns():
    return _t(*(a for a, _ in OUTCOMES)), _t(*(o for _, o in OUTCOMES))


def test_every_type_has_a_function_and_a_name():
    assert set(COMPONENTS) == set(IPD_TYPES) | set(PREV_TYPES)
    assert len(COMPONENTS) == 11
    assert set(NAMED_REWARDS) == {*COMPONENTS, "game_deontological"}
    assert set(REWARD_FUNCTIONS) == set(COMPONENTS)


@pytest.mark.parametrize("game,table", [("IPD", IPD_TYPES), ("BOS", BOS_TYPES)])
@pytest.mark.parametrize("prev", [C, D])
def test_payoff_types_per_outcome(game, table, prev):
    a_me, a_other = _outcome_columns()
    payoffs = MatrixGame.from_spec(game).payoffs
    comps = reward_components(a_me, a_other, _t(prev, prev, prev, prev), payoffs, xi=5.0, beta=0.5)
    for name, want in table.items():
        assert comps[name].tolist() == pytest.approx(want, abs=1e-6), name
        # the public function alone gives the same numbers
        assert REWARD_FUNCTIONS[name](a_me, a_other, _t(prev, prev, prev, prev), payoffs, 5.0, 0.5).tolist() == \
            pytest.approx(want, abs=1e-6), name


@pytest.mark.parametrize("game", ["IPD", "BOS", "ICN"])
def test_previous_move_types_per_situation(game):
    payoffs = MatrixGame.from_spec(game).payoffs
    a_me, prev = _t(C, C, D, D), _t(C, D, C, D)
    for a_other in (C, D):
        comps = reward_components(a_me, _t(a_other, a_other, a_other, a_other), prev, payoffs, xi=5.0)
        for name, want in PREV_TYPES.items():
            assert comps[name].tolist() == [float(w) for w in want], (name, a_other)


def test_bos_column_players_view():
    # the column player's table (2, 3), (0, 0), (0, 0), (3, 2): its own payoff first
    a_me, a_other = _outcome_columns()
    comps = reward_components(a_me, a_other, _t(C, C, C, C), MatrixGame.from_spec("BOS").view(1).payoffs, xi=5.0)
    assert comps["game"].tolist() == [2.0, 0.0, 0.0, 3.0]
    assert comps["altruist"].tolist() == [3.0, 0.0, 0.0, 2.0]
    assert comps["virtue_equality"].tolist() == pytest.approx([0.8, 1.0, 1.0, 0.8], abs=1e-6)


@pytest.mark.parametrize("name", sorted(NAMED_REWARDS))
@pytest.mark.parametrize("game", ["IPD", "BOS"])
def test_named_reward_total_is_its_components(name, game):
    payoffs = MatrixGame.from_spec(game).payoffs
    a_me = _t(C, C, C, C, D, D, D, D)
    a_other = _t(C, C, D, D, C, C, D, D)
    prev = _t(C, D, C, D, C, D, C, D)
    spec = RewardSpec.parse(name, xi=5.0)
    assert spec.name == name and spec.xi == 5.0 and spec.beta == 0.5
    total, comps = compute_reward(spec, a_me, a_other, prev, payoffs)
    want = sum(w * comps[k] for k, w in NAMED_REWARDS[name].items())
    assert torch.equal(total, want)
    assert set(comps) == {*COMPONENTS, "illegal"}


def test_zero_sum_guard_equality_and_inequality():
    # ICN DD pays (0, 0): equality 1 (equal payoffs), inequality 0; CD (1, 4): 1 - 3/5
    icn = MatrixGame.from_spec("ICN").payoffs
    comps = reward_components(_t(D, C, D), _t(D, D, C), _t(C, C, C), icn)
    assert comps["virtue_equality"].tolist() == pytest.approx([1.0, 0.4, 0.4], abs=1e-6)
    assert comps["virtue_inequality"].tolist() == pytest.approx([0.0, 0.6, 0.6], abs=1e-6)
    assert torch.isfinite(comps["virtue_equality"]).all()


def test_equality_with_negative_payoffs_stays_in_range():
    # CC (2, -2): r_M + r_O = 0 but unequal -> equality 0; CD (-1, -3): 1 - 2/4; DC (0, 0): 1; DD (1, 1): 1
    table = torch.tensor([[[2.0, -2.0], [-1.0, -3.0]], [[0.0, 0.0], [1.0, 1.0]]])
    a_me, a_other = _outcome_columns()
    comps = reward_components(a_me, a_other, _t(C, C, C, C), table)
    assert comps["virtue_equality"].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert comps["virtue_inequality"].tolist() == [1.0, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("beta,want", [(0.0, [1, 1, 0, 0]), (0.25, [1, 0.75, 0, 0.25]), (1.0, [1, 0, 0, 1])])
def test_virtue_mixed_beta(beta, want):
    # IPD: beta * equality (1, 0, 0, 1) + (1 - beta) * [C] (1, 1, 0, 0)
    a_me, a_other = _outcome_columns()
    total, comps = compute_reward(RewardSpec.parse("virtue_mixed", beta=beta), a_me, a_other, _t(C, C, C, C), IPD)
    assert comps["virtue_mixed"].tolist() == [float(w) for w in want]
    assert torch.equal(total, comps["virtue_mixed"])


def test_xi_is_shared_by_every_xi_component():
    a_me, prev = _t(C, D, D), _t(C, C, D)
    comps = reward_components(a_me, _t(C, C, C), prev, IPD, xi=3.0)
    assert comps["virtue_kindness"].tolist() == [3.0, 0.0, 0.0]
    assert comps["virtue_aggression"].tolist() == [0.0, 3.0, 3.0]
    assert comps["deontological"].tolist() == [0.0, -3.0, 0.0]
    assert comps["malicious_deontological"].tolist() == [0.0, 3.0, 0.0]
    assert str(comps["deontological"][0].item()) == "0.0"  # +0.0, not -0.0 (CSV columns print the sign)


@pytest.mark.parametrize("game", ["IPD", "BOS"])
def test_weighted_mix_of_new_components(game):
    payoffs = MatrixGame.from_spec(game).payoffs
    spec = RewardSpec.parse({"game": 1.0, "virtue_equality": 0.5, "altruist": -1})
    assert dict(spec.weights) == {"game": 1.0, "virtue_equality": 0.5, "altruist": -1.0}
    a_me, a_other = _outcome_columns()
    total, comps = compute_reward(spec, a_me, a_other, _t(C, C, C, C), payoffs)
    # IPD: game (3, 0, 4, 1) + 0.5 * (1, 0, 0, 1) - (3, 4, 0, 1); BOS: (3, 0, 0, 2) + 0.5 * (.8, 1, 1, .8) - (2, 0, 0, 3)
    want = {"IPD": [0.5, -4.0, 4.0, 0.5], "BOS": [1.4, 0.5, 0.5, -0.6]}[game]
    assert total.tolist() == pytest.approx(want, abs=1e-6)
    recomposed = comps["game"] + 0.5 * comps["virtue_equality"] - comps["altruist"] + comps["illegal"]
    assert torch.allclose(total, recomposed, atol=0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NAMED_REWARDS))
def test_illegal_answer_every_type(name):
    spec = RewardSpec.parse(name, xi=5.0, illegal_penalty=-7.0)
    a_me = _t(ILLEGAL, ILLEGAL, ILLEGAL, ILLEGAL, C)
    a_other, prev = _t(C, C, D, D, C), _t(C, D, C, D, C)
    for payoffs in (IPD, BOS):
        total, comps = compute_reward(spec, a_me, a_other, prev, payoffs)
        assert total[:4].tolist() == [-7.0] * 4
        for k in COMPONENTS:
            assert comps[k][:4].tolist() == [0.0] * 4, k
        assert comps["illegal"].tolist() == [-7.0] * 4 + [0.0]


def test_every_component_returned_whatever_the_weights():
    total, comps = compute_reward(RewardSpec.parse("virtue_aggression"), _t(C, D), _t(C, C), _t(C, C), IPD)
    assert set(comps) == {*COMPONENTS, "illegal"}
    assert total.tolist() == [0.0, 3.0]
    assert comps["utilitarian"].tolist() == [6.0, 4.0]  # unweighted, still computed for logging


def test_reward_spec_parse_errors_new_names():
    with pytest.raises(ConfigError, match=r"agents\[0\]\.reward: unknown value 'virtue_equity' \(did you mean "
                                          r"'virtue_equality'\?\); allowed: game, deontological, utilitarian, "
                                          r"virtue_equality, virtue_kindness"):
        RewardSpec.parse("virtue_equity", field="agents[0].reward")
    with pytest.raises(ConfigError, match=r"agents\[0\]\.reward component: unknown value 'kindness' \(did you mean "
                                          r"'virtue_kindness'\?\).*altruist"):
        RewardSpec.parse({"game": 1.0, "kindness": 1.0}, field="agents[0].reward")
    with pytest.raises(ConfigError, match="component: unknown value 'game_deontological'"):
        RewardSpec.parse({"game_deontological": 1.0})  # a named mix is not a component
    with pytest.raises(ConfigError, match=r"reward\.virtue_equality: weight must be a finite number; got inf"):
        RewardSpec.parse({"virtue_equality": math.inf})
    with pytest.raises(ConfigError, match=r"reward\.beta: must be in \[0, 1\]; got 1\.5"):
        RewardSpec.parse("virtue_mixed", beta=1.5)
    with pytest.raises(ConfigError, match=r"reward\.beta: must be a finite number; got nan"):
        RewardSpec.parse("virtue_mixed", beta=math.nan)


# ---------------------------------------------------------------- reward_regret (docs/rewards.md)

SITUATIONS = [(a, o, p) for a in (C, D) for o in (C, D) for p in (C, D)]  # (a_me, a_other, prev_other)
# IPD, xi = 3, beta = 0.5, in the order of SITUATIONS (CCC, CCD, CDC, CDD, DCC, DCD, DDC, DDD). Regret = (best reply to
# a_other's value - value) / (max - min over the eight legal situations).
IPD_REGRETS = {
    "game": [0.25] * 4 + [0.0] * 4,  # D is always 1 better; range 0..4
    "utilitarian": [0.0] * 4 + [0.5] * 4,  # C is always 2 better; range 2..6
    "anti_utilitarian": [0.5] * 4 + [0.0] * 4,
    "altruist": [0.0] * 4 + [0.75] * 4,  # C gives O 3 more; range 0..4
    "deontological": [0, 0, 0, 0, 1, 0, 1, 0],  # D after C costs xi; range -3..0
    "malicious_deontological": [1, 0, 1, 0, 0, 0, 0, 0],
    "virtue_equality": [0, 0, 1, 1, 1, 1, 0, 0],  # match O's move
    "virtue_inequality": [1, 1, 0, 0, 0, 0, 1, 1],
    "virtue_kindness": [0.0] * 4 + [1.0] * 4,
    "virtue_aggression": [1.0] * 4 + [0.0] * 4,
    "virtue_mixed": [0, 0, 0, 0, 1, 1, 0, 0],  # vs D both moves give 0.5
    # values: C 3 / 0, D after C 1 / -2, D after D 4 / 1; range -2..4
    "game_deontological": [0, 1 / 6, 0, 1 / 6, 1 / 3, 0, 1 / 3, 0],
}
BOS_REGRETS = {
    "game": [0, 0, 2 / 3, 2 / 3, 1, 1, 0, 0],  # best reply: match O; range 0..3
    "utilitarian": [0, 0, 1, 1, 1, 1, 0, 0],
    "virtue_equality": [1, 1, 0, 0, 0, 0, 1, 1],  # values 0.8..1: miscoordinate (both get 0, equal)
    "virtue_kindness": [0.0] * 4 + [1.0] * 4,
}


def _situations():
    return tuple(_t(*(s[i] for s in SITUATIONS)) for i in range(3))


@pytest.mark.parametrize("game,table", [("IPD", IPD_REGRETS), ("BOS", BOS_REGRETS)])
def test_reward_regret_tables(game, table):
    payoffs = MatrixGame.from_spec(game).payoffs
    a_me, a_other, prev = _situations()
    for name, want in table.items():
        got = reward_regret(name, a_me, a_other, prev, payoffs, xi=3.0)
        assert got.tolist() == pytest.approx([float(w) for w in want], abs=1e-6), name


def test_reward_regret_bos_column_player():
    # column view (2, 3), (0, 0), (0, 0), (3, 2): its game reward is 2 / 3 for CC / DD
    a_me, a_other, prev = _situations()
    got = reward_regret("game", a_me, a_other, prev, MatrixGame.from_spec("BOS").view(1).payoffs)
    assert got.tolist() == pytest.approx([0, 0, 1, 1, 2 / 3, 2 / 3, 0, 0], abs=1e-6)


@pytest.mark.parametrize("name", sorted(NAMED_REWARDS))
@pytest.mark.parametrize("game", list(PAPER_TABLE))
def test_reward_regret_range_best_reply_and_illegal(name, game):
    payoffs = MatrixGame.from_spec(game).payoffs
    a_me, a_other, prev = _situations()
    got = reward_regret(name, a_me, a_other, prev, payoffs, xi=5.0)
    assert got.min().item() >= 0.0 and got.max().item() <= 1.0 + 1e-6
    # in each situation (a_other, prev) one of C (first four) / D (last four) is a best reply: regret 0
    assert torch.minimum(got[:4], got[4:]).tolist() == [0.0] * 4
    illegal = reward_regret(name, _t(ILLEGAL, ILLEGAL), _t(C, D), _t(D, C), payoffs, xi=5.0)
    assert illegal.tolist() == [1.0, 1.0]


def test_reward_regret_matches_deontological_regret_over_xi():
    a_me, a_other, prev = _situations()
    for xi in (3.0, 4.0):
        assert torch.equal(reward_regret("deontological", a_me, a_other, prev, IPD, xi=xi),
                           deontological_regret(a_me, prev, xi=xi) / xi)


def test_reward_regret_of_a_mix_and_a_spec():
    a_me, a_other, prev = _situations()
    # {game: 1, virtue_kindness: 1} at xi = 3 in IPD: C gets payoff + 3, D payoff; range 1..6 (CC 6, CD 3, DC 4, DD 1)
    got = reward_regret({"game": 1.0, "virtue_kindness": 1.0}, a_me, a_other, prev, IPD, xi=3.0)
    assert got.tolist() == pytest.approx([0.0] * 4 + [0.4] * 4, abs=1e-6)
    # a RewardSpec carries its own xi: game_deontological at xi 5: values C 3 / 0, D after C -1 / -4, D after D 4 / 1
    spec = RewardSpec.parse("game_deontological", xi=5.0)
    got = reward_regret(spec, a_me, a_other, prev, IPD, xi=3.0)
    assert got.tolist() == pytest.approx([0, 1 / 8, 0, 1 / 8, 4 / 8, 0, 4 / 8, 0], abs=1e-6)


def test_reward_range():
    assert reward_range(RewardSpec.parse("utilitarian"), IPD) == (2.0, 6.0)
    assert reward_range(RewardSpec.parse("deontological", xi=4.0), BOS) == (-4.0, 0.0)
    assert reward_range(RewardSpec.parse("game_deontological"), IPD) == (-2.0, 4.0)


def test_reward_regret_constant_reward_is_zero_for_legal_moves():
    # matching pennies is zero-sum: the utilitarian reward is 0 everywhere, so no legal move is worse
    pennies = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]], [[-1.0, 1.0], [1.0, -1.0]]])
    got = reward_regret("utilitarian", _t(C, D, ILLEGAL), _t(C, D, C), _t(C, C, C), pennies)
    assert got.tolist() == [0.0, 0.0, 1.0]


def test_reward_regret_rejects_unknown_type():
    with pytest.raises(ConfigError, match="reward_regret: reward: unknown value 'egalitarian'"):
        reward_regret("egalitarian", _t(C), _t(C), _t(C), IPD)
