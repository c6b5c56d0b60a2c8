"""Training-iteration behaviour of the LightningModule on the tiny model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_moral import models
from lit_moral.errors import ConfigError
from lit_moral.module import AgentConfig
from tests.helpers import tiny_module, trainer


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.policy.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_one_iteration_moves_every_trained_parameter_and_no_base_weight(tmp_path, mode):
    # The untrained tiny model answers illegally nearly always in free mode; with reward normalisation a
    # constant -6 becomes 0 everywhere and (correctly) no gradient. Unnormalised, the value loss and the
    # advantages are non-zero whatever was sampled, so every trained tensor must move.
    from lit_moral.ppo import PPOConfig

    m = tiny_module(action_mode=mode, ppo=PPOConfig(ppo_epochs=2, normalize_rewards=(mode == "constrained")))
    m.configure_model()
    before = _snapshot(m)
    trainer(tmp_path).fit(m)
    changed = _changed(before, m)
    agent = {n for n, _ in m.policy.agent_parameters("agent_0")}
    # agent_parameters names value heads relative to the Policy; named_parameters does the same.
    assert agent <= changed, f"unchanged trained parameters: {sorted(agent - changed)[:5]}"
    base = {n for n, _ in m.policy.base_parameters()}
    assert not (changed & base), f"base weights changed: {sorted(changed & base)[:5]}"
    assert m.episode == 8 and m.iteration == 1


def test_frozen_agent_does_not_change(tmp_path):
    m = tiny_module(agents=[AgentConfig("agent_0", "game"), AgentConfig("agent_1", "game", train=False)],
                    opponent="llm")
    m.configure_model()
    before = _snapshot(m)
    trainer(tmp_path).fit(m)
    changed = _changed(before, m)
    a0 = {n for n, _ in m.policy.agent_parameters("agent_0")}
    a1 = {n for n, _ in m.policy.agent_parameters("agent_1")}
    assert a0 <= changed
    assert not (a1 & changed)


def test_rewards_follow_the_agents_reward_and_tft_copies(tmp_path):
    m = tiny_module(agents=[AgentConfig("agent_0", "game_deontological")], rounds_per_episode=3)
    m.configure_model()
    trainer(tmp_path).fit(m)
    s = m.last_samples["agent_0"]
    # TFT: the opponent's move in round r is the agent's legal move of round r-1.
    n = 8
    for r in range(1, 3):
        torch.testing.assert_close(s.other_action[r * n:(r + 1) * n], s.action[(r - 1) * n:r * n])
    # game + deontological: R_M - 3 when D after the other's C.
    pay = torch.tensor([[3.0, 0.0], [4.0, 1.0]])[s.action, s.other_action]
    want = pay - 3.0 * ((s.action == 1) & (s.prev_other == 0)).float()
    torch.testing.assert_close(s.reward, want)


def test_config_errors_name_field_and_allowed_values_before_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(models, "load", boom)
    cases = [
        (dict(agents=[AgentConfig(reward="kindness")]), ["agents[0].reward", "deontological", "utilitarian"]),
        (dict(opponent="grim"), ["opponent", "tft", "always_defect"]),
        (dict(model="no-such-model"), ["model", "smollm2-135m-instruct"]),
        (dict(game=[[1, 2], [3, 4]]), ["game", "[2, 2, 2]"]),
        (dict(game="PD"), ["game", "IPD"]),
        (dict(episodes_per_iteration=0), ["episodes_per_iteration", "> 0"]),
        (dict(rounds_per_episode=-1), ["rounds_per_episode", "> 0"]),
        (dict(lr=0.0), ["lr", "> 0"]),
        (dict(action_mode="greedy"), ["action_mode", "constrained", "free"]),
        (dict(actions=("act", "act")), ["actions", "differ"]),
        (dict(actions=("action1", "action12")), ["actions", "prefix"]),
        (dict(opponent="llm"), ["opponent", "two by two"]),
        (dict(agents=[AgentConfig(name="2nd")]), ["agents[0].name", "letters, digits"]),
        (dict(agents=[AgentConfig(name="base")]), ["agents[0].name", "not base"]),
    ]
    for kwargs, needles in cases:
        with pytest.raises(ConfigError) as e:
            tiny_module(**kwargs)
        msg = str(e.value)
        assert "\n" not in msg
        for needle in needles:
            assert needle in msg, (kwargs, msg)


def test_local_directory_model_spec(tmp_path, tiny_dir):
    """A local directory (as for google/gemma-2-2b-it saved locally) loads through the same path."""
    import shutil

    local = tmp_path / "my-model"
    shutil.copytree(tiny_dir, local)
    m = tiny_module(model=str(local))
    trainer(tmp_path).fit(m)
    assert m.iteration == 1
    with pytest.raises(ConfigError, match="config.json"):
        tiny_module(model=str(tmp_path))


class _Grab(pl.Callback):
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_training_update_equals_the_obvious_path(tmp_path, monkeypatch, mode):
    """One PPO update with every optimisation on vs ``naive=True`` (per-sample forwards, full-vocabulary
    logits, per-sample backward), on the same rollout: same losses and updated weights.

    (Rollout equivalence is tested in test_policy; here the naive run replays the fast run's rollout
    and the streams' state after it, so both updates see identical samples and minibatch orders.)
    """
    import lit_moral.module as module_mod

    recorded = {}

    def record(sampler, matches, game, rounds, rewards, streams):
        recorded["played"] = real_play(sampler, matches, game, rounds, rewards, streams)
        recorded["streams"] = streams.state_dict()
        return recorded["played"]

    def replay(sampler, matches, game, rounds, rewards, streams):
        streams.load_state_dict(recorded["streams"])
        return recorded["played"]

    real_play = module_mod.play
    runs = []
    for naive in (False, True):
        monkeypatch.setattr(module_mod, "play", replay if naive else record)
        m = tiny_module(action_mode=mode, naive=naive, ppo={"ppo_epochs": 2, "minibatches": 2}, seed=3)
        m.configure_model()
        with torch.no_grad():  # a non-trivial starting policy, identical in both runs
            g = torch.Generator().manual_seed(1)
            for n, p in m.policy.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        grab = _Grab()
        trainer(tmp_path / str(naive), callbacks=[grab]).fit(m)
        runs.append((m, grab.logged))
    (fast, lf), (slow, ls) = runs
    for key in ("loss/policy/agent_0", "loss/value/agent_0", "loss/total/agent_0", "policy/approx_kl/agent_0",
                "policy/entropy/agent_0", "policy/clipfrac/agent_0"):
        assert lf[key] == pytest.approx(ls[key], rel=1e-4, abs=1e-6), key
    for (n, a), (_, b) in zip(fast.policy.agent_parameters("agent_0"), slow.policy.agent_parameters("agent_0")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("memory", [2, 3])
def test_memory_k_trains_on_the_tiny_model(tmp_path, memory):
    m = tiny_module(memory=memory, rounds_per_episode=3)
    m.configure_model()
    before = _snapshot(m)
    trainer(tmp_path).fit(m)
    assert m.renderer.n_ids == 4 ** memory * 4 and int(m.last_samples["agent_0"].pid.max()) < m.renderer.n_ids
    assert _changed(before, m) >= {n for n, _ in m.policy.agent_parameters("agent_0")}
