"""Short runs with the real offline default model, SmolLM2-135M-Instruct (both action modes)."""

from __future__ import annotations

import pytest
import torch

from lit_moral.module import AgentConfig
from tests.helpers import tiny_module, trainer

pytestmark = pytest.mark.slow


def test_smollm2_trains_one_iteration_constrained(tmp_path):
    m = tiny_module(model="smollm2-135m-instruct", action_mode="constrained",
                    agents=[AgentConfig("agent_0", "utilitarian")], episodes_per_iteration=8, rounds_per_episode=2,
                    lr=2e-4, ppo={"ppo_epochs": 2})
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.policy.agent_parameters("agent_0")}
    trainer(tmp_path).fit(m)
    s = m.last_samples["agent_0"]
    assert len(s) == 16
    assert all(not torch.equal(before[n], p.detach()) for n, p in m.policy.agent_parameters("agent_0"))
    assert torch.isfinite(s.old_logp[s.mask]).all() and (s.old_logp[s.mask] <= 0).all()
    assert set(s.action.tolist()) <= {0, 1}
    # SmolLM2 puts almost all its mass outside the two legal strings (the reason for this mode).
    assert 0.9 < float(s.format_mass.mean()) < 1.0


def test_smollm2_free_mode_rollout_and_update(tmp_path):
    """Free generation on the untrained model: what holds for every seed, not what needs sampling luck.

    SmolLM2 puts ~0.1% of its mass on the legal strings, so nearly every answer is illegal and every reward
    -6; with reward normalisation that is no signal at all. So the test checks the rollout's bookkeeping on
    whatever was sampled, then gives the same samples rewards that differ and checks the update moves every
    trained tensor.
    """
    m = tiny_module(model="smollm2-135m-instruct", action_mode="free", agents=[AgentConfig("agent_0", "utilitarian")],
                    episodes_per_iteration=8, rounds_per_episode=2, lr=2e-4, ppo={"ppo_epochs": 2})
    m.configure_model()
    trainer(tmp_path).fit(m)  # one iteration: rollout + update on the sampled rewards (possibly all -6)
    s = m.last_samples["agent_0"]
    assert len(s) == 16 and s.mask.shape[1] == 2 and s.mask.sum(1).min() >= 1
    assert torch.isfinite(s.old_logp[s.mask]).all() and (s.old_logp[s.mask] <= 0).all()
    decoded = [m.tokenizer.decode(list(r), skip_special_tokens=True).strip() for r in s.responses]
    assert [a != 2 for a in s.action.tolist()] == [d in ("action1", "action2") for d in decoded]
    assert torch.equal(s.reward[s.action == 2], torch.full_like(s.reward[s.action == 2], -6.0))
    # Rewards that differ between samples: the update must move every LoRA and value-head tensor.
    s.reward = torch.linspace(-6.0, 6.0, len(s))
    before = {n: p.detach().clone() for n, p in m.policy.agent_parameters("agent_0")}
    opt = torch.optim.Adam([p for _, p in m.policy.agent_parameters("agent_0")], lr=2e-4)
    m.policy.train()
    logs = m.learners["agent_0"].update("agent_0", s, opt, m, m.device)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert logs["loss/policy/agent_0"] != 0.0
    assert all(not torch.equal(before[n], p.detach()) for n, p in m.policy.agent_parameters("agent_0"))
