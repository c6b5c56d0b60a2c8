"""Populations: N agents on one base, pairings, partner selection, population metrics, exact resume."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_moral.config import AgentConfig
from lit_moral.errors import ConfigError
from lit_moral.pairing import fixed_pairs, random_pairs, round_robin_pairs
from tests.helpers import tiny_module, trainer

FOUR = [AgentConfig("game_a", "game"), AgentConfig("util_b", "utilitarian"), AgentConfig("deon_c", "deontological"),
        AgentConfig("mix_d", {"game": 1.0, "deontological": 1.0})]


def test_pairings_by_hand():
    agents = ["a", "b", "c"]
    assert fixed_pairs(agents, {"a": "llm", "b": "tft", "c": "llm"}) == [("a", "c"), ("b", "tft")]
    with pytest.raises(ConfigError, match="two by two"):
        fixed_pairs(agents, {"a": "llm", "b": "llm", "c": "llm"})
    assert round_robin_pairs([*agents, "tft"], agents) == [("a", "b"), ("a", "c"), ("a", "tft"), ("b", "c"),
                                                           ("b", "tft"), ("c", "tft")]
    # two strategies never play each other
    assert ("tft", "random") not in round_robin_pairs(["a", "tft", "random"], ["a"])
    pairs = random_pairs([*agents, "tft"], agents, torch.Generator().manual_seed(0))
    assert len(pairs) == 2 and sorted(x for p in pairs for x in p) == sorted([*agents, "tft"])


class StepSpy(Callback):
    """Wraps the module's optimizer step: records, for each step, which agent stepped and which tensors moved."""

    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        real = pl_module.step_agent

        def spy(opt, agent):
            before = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}
            real(opt, agent)
            moved = {n for n, p in pl_module.policy.named_parameters() if not torch.equal(before[n], p.detach())}
            self.steps.append((agent, moved))

        pl_module.step_agent = spy


def test_four_agents_each_train_only_their_own_adapter(tmp_path):
    m = tiny_module(agents=FOUR, pairing="round_robin", strategies=["tft"], rounds_per_episode=2)
    spy = StepSpy()
    trainer(tmp_path, callbacks=[spy]).fit(m)
    own = {a: {n for n, _ in m.policy.agent_parameters(a)} for a in m.agent_names}
    assert {a for a, _ in spy.steps} == set(m.agent_names) and len(spy.steps) == 4 * 2  # 2 PPO epochs each
    for agent, moved in spy.steps:
        assert moved and moved <= own[agent], agent  # no other adapter, value head or base weight moved
    for agent in m.agent_names:  # and every tensor of each agent moved at some step
        assert own[agent] == set().union(*(mv for a, mv in spy.steps if a == agent)), agent


def test_round_robin_plays_every_pair_and_logs_population_metrics(tmp_path):
    m = tiny_module(agents=FOUR, pairing="round_robin", strategies=["tft"], rounds_per_episode=2)
    seen = []

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("population/")})

    trainer(tmp_path, callbacks=[Grab()]).fit(m)
    pairs = {frozenset(p) for p in m.pairs()}
    assert len(pairs) == 10  # C(5, 2): every pair of the 4 agents and TFT
    for a in m.agent_names:
        s = m.last_samples[a]
        # each agent played 8 games of 2 rounds against each of the 4 others
        assert len(s) == 4 * 8 * 2 and set(s.opponent.split("+")) == set(m.members) - {a}
    logs = seen[-1]
    assert {"population/collective_payoff", "population/equality", "population/min_payoff",
            "population/coop_rate/game", "population/coop_rate/deontological"} <= set(logs)
    assert 0 <= logs["population/equality"] <= 1 and logs["population/min_payoff"] >= 0


def test_population_metrics_by_hand():
    from lit_moral.metrics import PopulationPayoffs, gini

    assert float(gini(torch.tensor([1.0, 1.0, 1.0]))) == 0.0
    assert float(gini(torch.tensor([0.0, 0.0, 3.0]))) == pytest.approx(2 / 3)  # mean |diff| 4/3 over 2 x mean 1
    p = PopulationPayoffs(["a", "b", "c"])
    p.update("a", torch.tensor([3.0, 1.0]))
    p.update("b", torch.tensor([0.0, 0.0]))
    out = p.compute()  # c never played: left out
    assert float(out["collective_payoff"]) == 2.0 and float(out["min_payoff"]) == 0.0
    assert float(out["equality"]) == pytest.approx(1 - float(gini(torch.tensor([2.0, 0.0]))))


def test_selection_decisions_are_the_selectors_with_their_own_rewards(tmp_path):
    m = tiny_module(agents=FOUR[:3], pairing="selection", strategies=["always_defect"], rounds_per_episode=2)
    trainer(tmp_path).fit(m)
    for a in m.agent_names:
        sel = m.last_selection[a]
        r, _ = m.selectors[a]
        assert sel.agent == a and sel.candidates == r.action_ids and len(sel) == 8
        assert r.candidates == [x for x in m.members if x != a]  # never itself
        picks = [r.candidates[c] for c in sel.choice.tolist()]
        # each selection's reward: the selector's mean reward over the game (seat 0) that pick led to
        games = {s.opponent: s for s in m.last_played[a] if (s.seat == 0).all()}
        assert set(games) == set(picks)
        for g, partner in enumerate(picks):
            s, j = games[partner], picks[:g].count(partner)
            assert float(sel.reward[g]) == pytest.approx(float(s.reward[s.episode == j].mean())), (a, g, partner)
        # the picked agents played those games in seat 1, as their own samples
        for partner in set(picks) & set(m.agent_names):
            assert any(s.opponent == a and (s.seat == 1).all() for s in m.last_played[partner])
    counts = m.selection_matrix.counts
    assert counts.sum() == 3 * 8 and all(counts[i, i] == 0 for i in range(3))  # nobody picks itself
    assert {"selection/loss/policy/game_a", "selection/policy/kl/util_b"} <= set(m.trainer.callback_metrics)


def test_selection_logprobs_equal_the_policys(tmp_path):
    m = tiny_module(agents=FOUR[:2], pairing="selection", strategies=["tft"], rounds_per_episode=1)
    m.configure_model()
    m.policy.eval()
    picks = m._select()
    for a, (mv, pid, _) in picks.items():
        r, _ = m.selectors[a]
        with torch.no_grad():
            seq = m.policy.candidate_logprobs([(a, r.token_ids[int(pid[0])])], r.action_ids)["seq_logp"]
        logq = torch.log_softmax(seq[0], -1)
        torch.testing.assert_close(torch.stack(mv.logp).view(-1), logq[mv.choice], rtol=1e-5, atol=1e-5)
        assert "playerA chose" in r.texts[int(pid[0])] and "playerB" in r.texts[int(pid[0])]


def test_population_resume_is_exact(tmp_path):
    from tests.test_reliability import StopAfter, _weights

    def fit(root, ckpt=None, callbacks=()):
        import lightning.pytorch as pl

        pl.seed_everything(0)
        m = tiny_module(agents=FOUR[:3], pairing="selection", strategies=["random"], iterations_per_epoch=2,
                        rounds_per_episode=2, ppo={"ppo_epochs": 2, "kl_penalty": "adaptive", "target_kl": 0.01})
        trainer(root, max_epochs=2, callbacks=list(callbacks)).fit(m, ckpt_path=ckpt)
        return m

    full = fit(tmp_path / "full")
    ckpt = tmp_path / "cut" / "stop.ckpt"
    fit(tmp_path / "cut", callbacks=[StopAfter(1, ckpt)])
    resumed = fit(tmp_path / "cut", ckpt=str(ckpt))
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(full.selection_matrix.counts, resumed.selection_matrix.counts)
    assert full.latest == resumed.latest
    assert all(full.selection_learners[x].kl.value == resumed.selection_learners[x].kl.value for x in full.agent_names)


def test_bad_population_settings_are_refused():
    with pytest.raises(ConfigError, match="pairing: unknown value 'roundrobin'"):
        tiny_module(agents=FOUR, pairing="roundrobin")
    with pytest.raises(ConfigError, match=r"strategies\[0\]: unknown value 'titfortat' \(did you mean 'tft'\?\)"):
        tiny_module(agents=FOUR, pairing="round_robin", strategies=["titfortat"])
    with pytest.raises(ConfigError, match="agents\\[1\\].name"):
        tiny_module(agents=[AgentConfig("a"), AgentConfig("tft")], pairing="round_robin", strategies=["tft"])


def test_debug_population_config_through_the_cli(tmp_path, monkeypatch):
    """fit then test through the real CLI: selection heatmap in TensorBoard and files, every agent evaluated."""
    from pathlib import Path

    from lit_moral.cli import cli_main
    from lit_moral.report import read_csv
    from tests.helpers import scalars

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug_population.yaml")
    cli = cli_main(["fit", "--config", config])
    run = Path(cli.trainer.log_dir)
    assert (run / "selection.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(read_csv(run / "selection.csv"))
    assert [r["selector"] for r in rows] == ["selfish", "kind", "deontological"]
    assert sum(int(r[m]) for r in rows for m in ("selfish", "kind", "deontological", "tft")) == 3 * 8 * 2
    tags = scalars(run)
    assert {"population/collective_payoff", "population/equality", "selection/loss/policy/kind",
            "population/coop_rate/virtue_kindness"} <= set(tags)
    test = cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    out = run / "evaluation"
    models = {r["model"] for r in read_csv(out / "rounds.csv")}
    assert models == {"selfish", "kind", "deontological", "base"} and (out / "selection.png").is_file()
    assert test.model.episode == 16
