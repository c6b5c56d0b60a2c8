"""Sum-reduced torchmetrics and the analytic regret checks of protocol section 7."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from lit_moral.games import ILLEGAL, C, D, MatrixGame
from lit_moral.metrics import (
    ACTION_TYPES,
    ActionTypes,
    CooperationRate,
    IllegalRate,
    MoralRegret,
    action_type_index,
)


def _t(*xs):
    return torch.tensor(xs, dtype=torch.long)


# 12 rounds: (action, prev_other)
ACTIONS = _t(C, C, C, D, D, D, D, D, ILLEGAL, C, ILLEGAL, D)
PREV = _t(C, C, D, C, C, C, D, D, D, C, D, C)
# counts by hand: C|C 3, C|D 1, D|C 4, D|D 2, illegal|C 0, illegal|D 2
WANT_COUNTS = [3, 1, 4, 2, 0, 2]


def _sync(target, metrics):
    """Emulate torchmetrics' distributed sync into the fresh ``target``: stack every state across instances
    and apply its registered reduction."""
    for name, fx in target._reductions.items():
        stacked = torch.stack([getattr(m, name) for m in metrics])
        setattr(target, name, fx(stacked))
    return target


def test_action_type_index():
    assert ACTION_TYPES == ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")
    got = action_type_index(_t(C, C, D, D, ILLEGAL, ILLEGAL), _t(C, D, C, D, C, D))
    assert got.tolist() == [0, 1, 2, 3, 4, 5]


def test_action_types_frequencies():
    m = ActionTypes()
    m.update(ACTIONS, PREV)
    assert m.counts.tolist() == [float(c) for c in WANT_COUNTS]
    freq = m.compute()
    assert freq.tolist() == pytest.approx([c / 12 for c in WANT_COUNTS])
    assert freq.sum().item() == pytest.approx(1.0)


def test_action_types_empty_is_zero():
    assert ActionTypes().compute().tolist() == [0.0] * 6


def test_cooperation_rate():
    m = CooperationRate()
    m.update(ACTIONS)
    assert m.compute().item() == pytest.approx(4 / 12)  # illegal answers count in the denominator
    m.update(_t(C, C, C, C))
    assert m.compute().item() == pytest.approx(8 / 16)


def test_illegal_rate():
    m = IllegalRate()
    m.update(ACTIONS)
    assert m.compute().item() == pytest.approx(2 / 12)
    m.update(_t(ILLEGAL, ILLEGAL))
    assert m.compute().item() == pytest.approx(4 / 14)


def _all_metrics():
    return {
        "action_types": lambda: ActionTypes(),
        "coop": lambda: CooperationRate(),
        "illegal": lambda: IllegalRate(),
        "deon": lambda: MoralRegret("deontological", xi=3.0),
        "util": lambda: MoralRegret("utilitarian", payoffs=MatrixGame.from_spec("ISH").payoffs),
    }


def _update(m, action, prev, other):
    if isinstance(m, ActionTypes):
        m.update(action, prev)
    elif isinstance(m, MoralRegret):
        m.update(action, other, prev)
    else:
        m.update(action)


@pytest.mark.parametrize("kind", list(_all_metrics()))
def test_states_are_sum_reduced(kind):
    m = _all_metrics()[kind]()
    assert len(m._reductions) >= 1
    for name, fx in m._reductions.items():
        assert fx is dim_zero_sum, name
        assert getattr(m, name).dtype == torch.float64


@pytest.mark.parametrize("kind", list(_all_metrics()))
def test_split_and_merge_equals_one_instance(kind):
    make = _all_metrics()[kind]
    other = _t(C, D, D, C, C, D, C, D, C, D, D, C)
    whole = make()
    _update(whole, ACTIONS, PREV, other)
    parts = [make(), make(), make()]
    for m, sl in zip(parts, (slice(0, 5), slice(5, 6), slice(6, 12))):
        _update(m, ACTIONS[sl], PREV[sl], other[sl])
    # per-part results differ from the whole (otherwise this test would prove nothing) ...
    assert any(not torch.allclose(p.compute(), whole.compute()) for p in parts)
    merged = _sync(make(), parts)
    assert torch.allclose(merged.compute(), whole.compute(), rtol=1e-6, atol=0.0)
    for name in whole._reductions:
        assert torch.allclose(getattr(merged, name), getattr(whole, name), rtol=1e-6, atol=0.0)


def test_reset_clears_state():
    m = ActionTypes()
    m.update(ACTIONS, PREV)
    m.reset()
    assert m.counts.tolist() == [0.0] * 6


# ---------------------------------------------------------------- moral regret


def test_moral_regret_deontological_mean():
    m = MoralRegret("deontological", xi=3.0)
    m.update(ACTIONS, torch.zeros_like(ACTIONS), PREV)
    # D after C: 4 rounds x 3; illegal: 2 rounds x 6 -> 24 / 12
    assert m.compute().item() == pytest.approx(24 / 12)


def test_moral_regret_utilitarian_illegal_is_one():
    m = MoralRegret("utilitarian", payoffs=MatrixGame.from_spec("IPD").payoffs)
    m.update(_t(ILLEGAL, ILLEGAL), _t(C, D), _t(C, D))
    assert m.compute().item() == pytest.approx(1.0)


def test_moral_regret_argument_errors():
    with pytest.raises(ValueError, match="kind"):
        MoralRegret("virtue")
    with pytest.raises(ValueError, match="payoffs"):
        MoralRegret("utilitarian")


# protocol section 7: utilitarian regret of always-C / always-D against a uniformly random opponent.
ANALYTIC = {
    "IPD": (0.083, 0.250),
    "ISH": (0.179, 0.393),
    "ICN": (0.045, 0.227),
    "BOS": (0.227, 0.227),
    "ICD": (0.500, 0.286),
}


@pytest.mark.parametrize("game", list(ANALYTIC))
def test_analytic_utilitarian_regret_vs_random(game):
    payoffs = MatrixGame.from_spec(game).payoffs
    for action, want in zip((C, D), ANALYTIC[game]):
        m = MoralRegret("utilitarian", payoffs=payoffs)
        # the exact expectation over a uniform opponent: each of its actions once (twice each prev, irrelevant)
        m.update(_t(action, action, action, action), _t(C, D, C, D), _t(C, C, D, D))
        assert m.compute().item() == pytest.approx(want, abs=1e-3), (game, action)


@pytest.mark.parametrize("xi", [3.0, 4.0])
@pytest.mark.parametrize("n_prev_c", [0, 3, 7, 10])
def test_analytic_deontological_regret_always_d(xi, n_prev_c):
    prev = _t(*([C] * n_prev_c + [D] * (10 - n_prev_c)))
    m = MoralRegret("deontological", xi=xi)
    m.update(torch.full((10,), D), torch.zeros(10, dtype=torch.long), prev)
    assert m.compute().item() == pytest.approx(xi * n_prev_c / 10)
    # always-C has zero deontological regret whatever the history
    c = MoralRegret("deontological", xi=xi)
    c.update(torch.full((10,), C), torch.zeros(10, dtype=torch.long), prev)
    assert c.compute().item() == 0.0


def test_analytic_deontological_regret_always_d_random_history():
    # against Random the previous move is C half the time: regret -> xi / 2
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(0, 2, (2000,), generator=g)
    m = MoralRegret("deontological", xi=3.0)
    m.update(torch.full((2000,), D), torch.zeros(2000, dtype=torch.long), prev)
    frac_c = (prev == C).double().mean().item()
    assert m.compute().item() == pytest.approx(3.0 * frac_c, abs=1e-12)
    assert m.compute().item() == pytest.approx(1.5, abs=0.15)
