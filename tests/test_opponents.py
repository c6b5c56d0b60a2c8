"""Fixed-strategy opponents (protocol section 2)."""

from __future__ import annotations

import pytest
import torch

from lit_moral.errors import ConfigError
from lit_moral.games import C, D, MatrixGame
from lit_moral.opponents import (
    OPPONENT_NAMES,
    OPPONENTS,
    AlwaysCooperate,
    AlwaysDefect,
    GenerousTitForTat,
    GrimTrigger,
    NoisyTitForTat,
    Pavlov,
    RandomOpponent,
    SuspiciousTitForTat,
    TitForTat,
    make_opponent,
)

NEW = ("grim_trigger", "pavlov", "suspicious_tft", "generous_tft", "noisy_tft")


def test_names():
    assert set(OPPONENT_NAMES) == {"tft", "always_cooperate", "always_defect", "random", *NEW, "llm"}


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


# ---------------------------------------------------------------- BEYOND section 3 strategies (docs/rewards.md)

IPD = MatrixGame.from_spec("IPD").payoffs
ISH = MatrixGame.from_spec("ISH").payoffs


def _t(*xs):
    return torch.tensor(xs, dtype=torch.long)


def _episode(opp, start, learner_moves, payoffs=None):
    """The opponent's moves per round, as rollout.play feeds it: the learner's start move and its own first move,
    then each round the learner's previous move. ``start [B]``; ``learner_moves``: one ``[B]`` per round."""
    learner_prev, own = start, opp.first_move(start.shape[0])
    out = []
    for moves in learner_moves:
        own = opp.act(learner_prev, own, payoffs=payoffs)
        out.append(own.tolist())
        learner_prev = moves
    return out


def _rounds(*games):
    """Per-round ``[B]`` tensors from one move string per game (``"CCDCC"``)."""
    return [_t(*(C if g[r] == "C" else D for g in games)) for r in range(len(games[0]))]


def test_every_new_name_is_registered():
    for name in NEW:
        assert make_opponent(name, seed=1).name == name
        assert OPPONENTS[name].name == name


def test_grim_trigger_rule_and_first_move():
    grim = make_opponent("grim_trigger")
    assert isinstance(grim, GrimTrigger)
    assert grim.first_move(3).tolist() == [C, C, C]
    # game 0: the learner defects in round 2 -> grim defects from round 3 on, even after the learner's C;
    # game 1: the start state shows the learner's D -> D from round 0; game 2: the learner never defects.
    got = _episode(grim, _t(C, D, C), _rounds("CCDCC", "CCCCC", "CCCCC"))
    assert [r[0] for r in got] == [C, C, C, D, D]
    assert [r[1] for r in got] == [D, D, D, D, D]
    assert [r[2] for r in got] == [C, C, C, C, C]


def test_grim_trigger_resets_each_episode():
    grim = GrimTrigger()
    assert _episode(grim, _t(C), _rounds("DC")) == [[C], [D]]
    # a new episode starts from its first move C: the last episode's trigger is gone
    assert _episode(grim, _t(C), _rounds("CC")) == [[C], [C]]
    assert grim.state_dict().keys() == {"generator"}


def test_pavlov_win_stay_lose_shift_ipd():
    pav = make_opponent("pavlov")
    assert isinstance(pav, Pavlov)
    assert pav.first_move(2).tolist() == [C, C]
    # IPD: R = 3; stay after R (CC) or T (D vs C), switch after S (C vs D) or P (DD).
    got = _episode(pav, _t(C, C, D), _rounds("CCCC", "DDCC", "CCDD"), IPD)
    assert [r[0] for r in got] == [C, C, C, C]
    assert [r[1] for r in got] == [C, D, C, C]
    assert [r[2] for r in got] == [D, D, D, C]


def test_pavlov_reads_the_game_payoffs():
    # ISH: R = 4 and T = 3 < R, so D against C is a loss there (a stay in IPD)
    got = _episode(Pavlov(), _t(D), _rounds("CCDDC"), ISH)
    assert [r[0] for r in got] == [D, C, C, D, C]
    # BOS: (own D, learner D) pays the row player 2 < R = 3 (shift), the column player 3 >= R = 2 (stay)
    bos = MatrixGame.from_spec("BOS")
    dd = _t(D), _t(D)
    assert Pavlov().act(*dd, payoffs=bos.view(0).payoffs).tolist() == [C]
    assert Pavlov().act(*dd, payoffs=bos.view(1).payoffs).tolist() == [D]


def test_pavlov_needs_payoffs():
    with pytest.raises(ValueError, match="pavlov: act needs payoffs"):
        Pavlov().act(_t(C), _t(C))


def test_suspicious_tft_opens_with_d_then_copies():
    stft = make_opponent("suspicious_tft")
    assert isinstance(stft, SuspiciousTitForTat)
    assert stft.first_move(3).tolist() == [D, D, D]
    got = _episode(stft, _t(C, D), _rounds("CDDC", "CCCD"))
    assert [r[0] for r in got] == [C, C, D, D]
    assert [r[1] for r in got] == [D, C, C, C]


def test_deterministic_strategies_ignore_their_generator():
    a, b = make_opponent("grim_trigger", seed=1), make_opponent("grim_trigger", seed=2)
    hist = _t(C, D, C, D), _t(C, C, D, D)
    for opp in (a, b):
        assert opp.act(*hist).tolist() == [C, D, D, D]
    # pavlov on (learner, own) = CC (R: stay C), DC (S: shift to D), CD (T: stay D), DD (P: shift to C)
    assert make_opponent("pavlov", seed=9).act(*hist, payoffs=IPD).tolist() == [C, D, D, C]


# Histories with both moves, so that forgiveness (which acts only after a D) and noise are exercised.
N = 20000
MIXED = torch.arange(N) % 2  # C, D, C, D, ...


@pytest.mark.parametrize("name,attr,default", [("generous_tft", "forgiveness", 1 / 3), ("noisy_tft", "noise", 0.1)])
def test_random_tft_defaults_and_first_move(name, attr, default):
    opp = make_opponent(name, seed=4)
    assert getattr(opp, attr) == default
    first = opp.first_move(N)
    assert torch.equal(first, make_opponent(name, seed=4).first_move(N))
    # uniform first move: sd sqrt(0.25 / N) = 0.0035, tolerance 5 sd
    assert abs(first.float().mean().item() - 0.5) < 0.018


def test_generous_tft_rule_against_its_own_draws():
    g = GenerousTitForTat(seed=7)
    got = g.act(MIXED, MIXED)
    u = torch.rand(N, generator=torch.Generator().manual_seed(7))  # the same stream: one draw per game
    assert torch.equal(got, torch.where((MIXED == D) & (u < 1 / 3), C, MIXED))
    assert got[MIXED == C].eq(C).all()  # a C is always copied
    # forgiven share of the D's: sd sqrt((1/3)(2/3) / (N/2)) = 0.0047, tolerance 5 sd
    assert abs(got[MIXED == D].eq(C).float().mean().item() - 1 / 3) < 0.024


def test_generous_tft_extremes():
    hist = _t(C, D, D, C, D)
    assert GenerousTitForTat(forgiveness=0).act(hist, hist).tolist() == hist.tolist()  # plain TFT
    assert GenerousTitForTat(forgiveness=1).act(hist, hist).tolist() == [C] * 5


def test_noisy_tft_rule_against_its_own_draws():
    n = NoisyTitForTat(seed=8)
    got = n.act(MIXED, MIXED)
    u = torch.rand(N, generator=torch.Generator().manual_seed(8))
    assert torch.equal(got, torch.where(u < 0.1, 1 - MIXED, MIXED))
    # flipped share, for C and D alike: sd sqrt(0.09 / (N/2)) = 0.003, tolerance 5 sd
    for move in (C, D):
        assert abs(got[MIXED == move].ne(move).float().mean().item() - 0.1) < 0.015


def test_noisy_tft_extremes():
    hist = _t(C, D, D, C)
    assert NoisyTitForTat(noise=0).act(hist, hist).tolist() == [C, D, D, C]
    assert NoisyTitForTat(noise=1).act(hist, hist).tolist() == [D, C, C, D]


@pytest.mark.parametrize("name", ["generous_tft", "noisy_tft"])
def test_random_tft_seeding_and_state_round_trip(name):
    a, b, c = make_opponent(name, seed=11), make_opponent(name, seed=11), make_opponent(name, seed=12)
    first_a, first_b, first_c = a.act(MIXED, MIXED), b.act(MIXED, MIXED), c.act(MIXED, MIXED)
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, first_c)
    assert not torch.equal(first_a, MIXED)  # the draws changed some moves: the stream is exercised
    state = a.state_dict()
    cont = [a.act(MIXED, MIXED) for _ in range(2)]
    assert not torch.equal(cont[0], first_a)  # the stream moved on
    fresh = make_opponent(name, seed=999)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.act(MIXED, MIXED), x) for x in cont)


def test_random_tft_draws_do_not_depend_on_the_history():
    # one draw per game per round whatever the moves: after rounds against different learners, two opponents
    # with one seed are at the same point of their streams
    a, b = NoisyTitForTat(seed=3), NoisyTitForTat(seed=3)
    a.act(MIXED, MIXED)
    b.act(1 - MIXED, MIXED)
    assert torch.equal(a.act(MIXED, MIXED), b.act(MIXED, MIXED))


@pytest.mark.parametrize("cls,arg", [(GenerousTitForTat, "forgiveness"), (NoisyTitForTat, "noise")])
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_random_tft_rejects_bad_probability(cls, arg, bad):
    with pytest.raises(ConfigError, match=f"{cls.name}: {arg}: must be a probability in \\[0, 1\\]"):
        cls(0, **{arg: bad})


def test_make_opponent_suggests_new_names():
    with pytest.raises(ConfigError, match="did you mean 'grim_trigger'"):
        make_opponent("grim")
    with pytest.raises(ConfigError, match="did you mean 'pavlov'"):
        make_opponent("wsls")
    with pytest.raises(ConfigError, match="did you mean 'generous_tft'"):
        make_opponent("generous_tf")


class _Spy(TitForTat):
    def __init__(self):
        super().__init__()
        self.tables = []

    def act(self, learner_prev, own_prev, payoffs=None):
        self.tables.append(payoffs)
        return super().act(learner_prev, own_prev)


class _NoAgents:
    """A sampler stand-in for a match of two fixed strategies (play asks it for nothing)."""

    def reset(self):
        pass

    def act(self, requests, generator):
        assert requests == []
        return []


def test_play_gives_each_fixed_strategy_its_seats_table():
    from lit_moral.rollout import Match, play
    from lit_moral.seeding import Streams

    bos = MatrixGame.from_spec("BOS")
    row, col = _Spy(), _Spy()
    assert play(_NoAgents(), [Match((row, col), 2)], bos, 3, {}, Streams.from_seed(0)) == {}
    assert len(row.tables) == len(col.tables) == 3
    assert all(torch.equal(t, bos.view(0).payoffs) for t in row.tables)
    assert all(torch.equal(t, bos.view(1).payoffs) for t in col.tables)
