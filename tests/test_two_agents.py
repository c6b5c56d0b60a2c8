"""Two LoRA agents on one base: self-play, mirrored states, schedules and resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_moral.callbacks import ActionTypePlot, OpponentSchedule, RewardSchedule
from lit_moral.cli import cli_main
from lit_moral.errors import ConfigError
from lit_moral.module import AgentConfig
from tests.helpers import scalars, tiny_module, trainer

ROOT = Path(__file__).resolve().parents[1]
TWO = [AgentConfig("agent_0", "deontological"), AgentConfig("agent_1", "game")]


class Probe(Callback):
    """Records, before each iteration, the episode, each agent's reward name and the opponent."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((pl_module.episode, {a: r.name for a, r in pl_module.rewards.items()},
                          pl_module.opponent_name))


def test_self_play_updates_both_agents_and_not_the_base(tmp_path):
    m = tiny_module(agents=TWO, opponent="llm")
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    trainer(tmp_path).fit(m)
    changed = {n for n, p in m.policy.named_parameters() if not torch.equal(before[n], p.detach())}
    for agent in ("agent_0", "agent_1"):
        names = {n for n, _ in m.policy.agent_parameters(agent)}
        assert names <= changed, agent
    assert not changed & {n for n, _ in m.policy.base_parameters()}
    # own KL controller and reward statistics per agent
    assert m.moments["agent_0"].mean != m.moments["agent_1"].mean


def test_agents_receive_mirrored_states(tmp_path):
    m = tiny_module(agents=TWO, opponent="llm", rounds_per_episode=3)
    trainer(tmp_path).fit(m)
    a, b = m.last_samples["agent_0"], m.last_samples["agent_1"]
    torch.testing.assert_close(a.prev_me, b.prev_other)
    torch.testing.assert_close(a.prev_other, b.prev_me)
    torch.testing.assert_close(a.other_action, b.action)  # constrained mode: every move is legal
    torch.testing.assert_close(b.other_action, a.action)
    # the prompt each saw encodes its own perspective: prompt id bits 3 and 2 are (me, other)
    torch.testing.assert_close((a.pid >> 3) & 1, a.prev_me)
    torch.testing.assert_close((b.pid >> 3) & 1, b.prev_me)
    # different rewards: agent_1 gets the game payoff, agent_0 the deontological penalty
    pay = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    torch.testing.assert_close(b.reward, pay[b.action, b.other_action])
    torch.testing.assert_close(a.reward, -3.0 * ((a.action == 1) & (a.prev_other == 0)).float())


ASYM = [[[5.0, 1.0], [0.0, 2.0]], [[3.0, 0.0], [1.0, 4.0]]]  # CC (5,1), CD (0,2), DC (3,0), DD (1,4)


@pytest.mark.parametrize("game", ["BOS", ASYM])
def test_column_player_sees_and_is_paid_by_the_transposed_table(tmp_path, game):
    from lit_moral.games import MatrixGame
    from lit_moral.rewards import utilitarian_regret

    m = tiny_module(agents=[AgentConfig("agent_0", "game"), AgentConfig("agent_1", "game")], opponent="llm",
                    game=game, rounds_per_episode=3)
    trainer(tmp_path).fit(m)
    a, b = m.last_samples["agent_0"], m.last_samples["agent_1"]
    table = MatrixGame.from_spec(game).payoffs
    assert (a.seat == 0).all() and (b.seat == 1).all()
    # Both ledgers of the same round: the row player gets entry 0 of table[a, b], the column player entry 1.
    torch.testing.assert_close(a.reward, table[a.action, b.action, 0])
    torch.testing.assert_close(b.reward, table[a.action, b.action, 1])
    # The column player's prompt shows its own view: for (C, C) it gets the row player's second number.
    cc = table[0, 0]
    assert f"| you play action1 | you get {float(cc[1]):g}, A gets {float(cc[0]):g} |" in m.renderer.texts[int(b.pid[0])]
    assert f"| you play action1 | you get {float(cc[0]):g}, A gets {float(cc[1]):g} |" in m.renderer.texts[int(a.pid[0])]
    # The last-round line of the column player's prompt: its own points first.
    pm, po = table[b.prev_other[0], b.prev_me[0]].tolist()[::-1]
    assert f"so you got {pm:g} points and A got {po:g} points" in m.renderer.texts[int(b.pid[0])]
    # Utilitarian regret of the column player is read off its own table (different sums in ASYM).
    want = utilitarian_regret(b.action, b.other_action, MatrixGame.from_spec(game).view(1).payoffs).mean()
    util = m.metrics["agent_1"]["util"]
    util.reset()
    util.update(b.action, b.other_action, b.prev_other, b.seat)
    torch.testing.assert_close(util.compute().float(), want.float())


def _run(tmp_path, callbacks, epochs, ckpt=None, **kw):
    m = tiny_module(agents=TWO, iterations_per_epoch=2, **kw)
    probe = Probe()
    t = trainer(tmp_path, max_epochs=epochs, callbacks=[*callbacks, probe])
    t.fit(m, ckpt_path=ckpt)
    return m, probe


def test_reward_switch_happens_at_the_configured_episode_and_after_resume(tmp_path):
    sched = lambda: RewardSchedule({"agent_0": [[0, "game"], [40, "utilitarian"]]})  # noqa: E731
    # 8 episodes per iteration: iterations start at 0, 8, ..., the switch applies from episode 40 on.
    _, probe = _run(tmp_path / "a", [sched()], epochs=4)
    names = [(ep, r["agent_0"]) for ep, r, _ in probe.seen]
    assert names == [(e, "game" if e < 40 else "utilitarian") for e in range(0, 64, 8)]
    # Interrupted at episode 32 (before the switch), then resumed: switches at the same episode.
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _, first = _run(tmp_path / "b", [sched(), ckpt_cb], epochs=2)
    assert [ep for ep, _, _ in first.seen] == [0, 8, 16, 24]
    m, second = _run(tmp_path / "b", [sched()], epochs=4, ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert [(ep, r["agent_0"]) for ep, r, _ in second.seen] == names[4:]
    assert m.episode == 64


def test_opponent_switch_and_cycle(tmp_path):
    _, probe = _run(tmp_path, [OpponentSchedule([[0, "tft"], [16, "llm"]])], epochs=2)
    assert [(ep, opp) for ep, _, opp in probe.seen] == [(0, "tft"), (8, "tft"), (16, "llm"), (24, "llm")]
    _, probe = _run(tmp_path, [OpponentSchedule([[0, "always_cooperate"], [8, "always_defect"]], cycle=16)],
                    epochs=2)
    assert [opp for _, _, opp in probe.seen] == ["always_cooperate", "always_defect"] * 2


def test_schedule_errors():
    with pytest.raises(ConfigError, match="increasing"):
        RewardSchedule({"agent_0": [[10, "game"], [5, "utilitarian"]]})
    with pytest.raises(ConfigError, match="deontological"):
        RewardSchedule({"agent_0": [[0, "kindness"]]})
    with pytest.raises(ConfigError, match="tft"):
        OpponentSchedule([[0, "grim"]])


def test_action_type_plot_draws_every_panel(tmp_path):
    plot = ActionTypePlot(every_n_episodes=8)
    _run(tmp_path, [plot], epochs=1, opponent="llm")
    assert sorted(plot.history) == ["agent_0", "agent_1"]
    assert all(abs(sum(row[1:]) - 1) < 1e-6 for rows in plot.history.values() for row in rows)
    fig = plot.figure()
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "episode"


def test_debug_llm_vs_llm_config_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "debug_llm_vs_llm.yaml")])
    assert cli.model.episode == 96 and cli.model.opponent_name == "llm"
    assert cli.model.rewards["agent_1"].name == "utilitarian"
    tags = scalars(tmp_path / "checkpoints" / "debug_llm_vs_llm")
    for agent in ("agent_0", "agent_1"):
        assert f"game/coop_rate/{agent}" in tags and f"loss/policy/{agent}" in tags
    assert [v for _, v in tags["opponent/index"]] == [0, 0, 1, 1, 1, 1]
    assert os.path.isdir(tmp_path / "checkpoints" / "debug_llm_vs_llm" / "version_0" / "adapters" / "agent_1")
