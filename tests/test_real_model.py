"""Short runs with the real offline default model, SmolLM2-135M-Instruct (both action modes)."""

from __future__ import annotations

import pytest
import torch

from lit_moral.module import AgentConfig
from tests.helpers import tiny_module, trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_smollm2_trains_one_iteration(tmp_path, mode):
    m = tiny_module(model="smollm2-135m-instruct", action_mode=mode, agents=[AgentConfig("agent_0", "utilitarian")],
                    episodes_per_iteration=8, rounds_per_episode=2, lr=2e-4, ppo={"ppo_epochs": 2})
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.policy.agent_parameters("agent_0")}
    trainer(tmp_path).fit(m)
    s = m.last_samples["agent_0"]
    assert len(s) == 16
    assert all(not torch.equal(before[n], p.detach()) for n, p in m.policy.agent_parameters("agent_0"))
    assert torch.isfinite(s.old_logp[s.mask]).all() and (s.old_logp[s.mask] <= 0).all()
    if mode == "constrained":
        assert set(s.action.tolist()) <= {0, 1}
        # SmolLM2 puts almost all its mass outside the two legal strings (the reason for this mode).
        assert 0.9 < float(s.format_mass.mean()) < 1.0
    else:
        assert s.mask.shape[1] == 2 and s.mask.sum(1).min() >= 1
        decoded = [m.tokenizer.decode(list(r), skip_special_tokens=True).strip() for r in s.responses]
        legal = [d in ("action1", "action2") for d in decoded]
        assert [a != 2 for a in s.action.tolist()] == legal
