"""One agent's update from its samples: the per-agent state (KL controller, reward statistics) and the loop.

The module (``module.py``) plays the games and owns the Trainer; a learner gets one agent's samples of an
iteration and a :class:`Hooks` object that runs the forward pass, the backward pass and the optimizer step
the Lightning way (manual optimization, DDP gradient averaging, gradient clipping, non-finite guards). The math
is in :mod:`lit_moral.ppo` (pure functions); here is only the order of the steps (protocol section 6:
normalise the scores -> KL penalty against the base -> GAE -> whiten -> ``ppo_epochs`` x minibatches).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from lit_moral.padding import pad_steps
from lit_moral.ppo import KLController, PPOConfig, RunningMoments, explained_variance, gae, kl_rewards, ppo_loss, whiten
from lit_moral.rollout import AgentSamples


class Hooks(Protocol):
    """What a learner needs from the module (implemented by MoralPPO)."""

    naive: bool
    world_size: int
    minibatch_generator: torch.Generator

    def score(self, agent: str, s: AgentSamples, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logp, values, entropy [len(idx), T]`` of samples ``idx`` under ``agent``, with gradient."""

    def backward_part(self, loss: torch.Tensor) -> None:
        """``manual_backward`` of one part of the loss."""

    def step_agent(self, opt, agent: str) -> None:
        """Average gradients over processes, clip, check they are finite, ``opt.step()``, zero them."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` concatenated (``x`` itself in one process)."""

    def check_finite(self, x: torch.Tensor, what: str, agent: str) -> None:
        """Stop the run when ``x`` holds a NaN or an infinity."""


class PPOLearner:
    """PPO with a value head, as the paper's TRL-legacy PPOTrainer (protocol section 6).

    Args:
        cfg: PPO settings.
    """

    name = "ppo"

    def __init__(self, cfg: PPOConfig) -> None:
        self.cfg = cfg
        self.kl = KLController(cfg.init_kl_coef, cfg.target_kl if cfg.kl_penalty == "adaptive" else None, cfg.kl_horizon)
        self.moments = RunningMoments()

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])

    def scores(self, s: AgentSamples, hooks: Hooks) -> torch.Tensor:
        """``[N]`` the rewards, normalised by running statistics over every process's games (protocol section 6)."""
        scores = s.reward.clone()
        if self.cfg.normalize_rewards:
            self.moments.update(hooks.gather(scores) if hooks.world_size > 1 else scores)
            scores = self.moments.normalize(scores)
        return scores

    def advantages(self, s: AgentSamples, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(adv, ret, kl) [N, T]``: per-step KL penalty against the base, the score at the last step, GAE."""
        mask = s.mask.float()
        rewards, kl = kl_rewards(scores, s.old_logp, s.ref_logp, mask, self.kl.value)
        adv, ret = gae(rewards, s.values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            adv = whiten(adv, mask)
        return adv, ret, kl

    def update(self, agent: str, s: AgentSamples, opt, hooks: Hooks, device) -> dict[str, float]:
        """One PPO update of ``agent`` on its samples; returns the logged scalars."""
        cfg = self.cfg
        scores = self.scores(s, hooks)
        adv, ret, kl = self.advantages(s, scores)
        old_logp, old_values, mask = s.old_logp.to(device), s.values.to(device), s.mask.to(device).float()
        adv, ret = adv.to(device), ret.to(device)
        n, t = s.mask.shape
        size = math.ceil(n / cfg.minibatches)
        passes = cfg.ppo_epochs * math.ceil(n / size)
        stats: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=hooks.minibatch_generator)
            for k in range(0, n, size):
                stats.append(self._minibatch(agent, s, perm[k:k + size], (old_logp, old_values, mask, adv, ret), t,
                                             passes, hooks, device))
                if not cfg.paper_compat:
                    hooks.step_agent(opt, agent)
        if cfg.paper_compat:
            # The original's effective update: one Adam step on the average of all passes' gradients.
            hooks.step_agent(opt, agent)
        # The KL controller sees every process's games, so its coefficient stays identical on all processes.
        mean_kl = (hooks.gather(kl.sum(1).mean()).mean() if hooks.world_size > 1 else kl.sum(1).mean()).item()
        self.kl.update(mean_kl, n * hooks.world_size)
        avg = {k: torch.stack([x[k] for x in stats]).mean().item() for k in stats[0]}
        ev = explained_variance(s.values, ret.cpu(), s.mask.float()).item()
        return {
            f"loss/policy/{agent}": avg["policy"], f"loss/value/{agent}": avg["value"],
            f"loss/total/{agent}": avg["total"], f"policy/entropy/{agent}": avg["entropy"],
            f"policy/approx_kl/{agent}": avg["approx_kl"], f"policy/clipfrac/{agent}": avg["clipfrac"],
            f"policy/ratio/{agent}": avg["ratio"], f"policy/kl/{agent}": mean_kl,
            f"policy/kl_coef/{agent}": self.kl.value, f"value/clipfrac/{agent}": avg["value_clipfrac"],
            f"value/explained_variance/{agent}": ev, f"reward/normalized/{agent}": scores.mean().item(),
        }

    def _minibatch(self, agent, s, idx, tensors, t, passes, hooks: Hooks, device) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of one minibatch (its gradient accumulates until the next ``step``)."""
        old_logp, old_values, mask, adv, ret = tensors
        # The obvious path backpropagates sample by sample (a plain loop's gradient accumulation; holding every
        # sample's full-vocabulary graph at once does not fit in memory). The masked means of ppo_loss are
        # token-weighted sums, so the weighted parts add up to the same loss.
        parts = [idx[j:j + 1] for j in range(len(idx))] if hooks.naive else [idx]
        total = mask[idx].sum().clamp_min(1.0)
        loss, st = torch.zeros((), device=device), {}
        for part in parts:
            out = {k: pad_steps(v, t) for k, v in hooks.score(agent, s, part).items() if k != "mask"}
            l_part, st_part = ppo_loss(out["logp"], old_logp[part], out["values"], old_values[part], ret[part],
                                       adv[part], mask[part], self.cfg, out["entropy"])
            w = mask[part].sum() / total
            hooks.check_finite(l_part, "loss", agent)
            hooks.backward_part(w * l_part / passes if self.cfg.paper_compat else w * l_part)
            loss = loss + w * l_part.detach()
            st = {key: st.get(key, 0.0) + w * v for key, v in st_part.items()}
        return {**st, "total": loss.detach()}


LEARNERS: dict[str, type[PPOLearner]] = {"ppo": PPOLearner}


def make_learner(name: str, cfg: PPOConfig) -> PPOLearner:
    """A learner by name (``model.algorithm``)."""
    return LEARNERS[name](cfg)
