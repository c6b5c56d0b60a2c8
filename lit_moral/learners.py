"""One agent's update from its samples: the per-agent state (KL controller, reward statistics, baselines) and the loop.

The module (``module.py``) plays the games and owns the Trainer; a learner gets one agent's samples of an
iteration and a :class:`Hooks` object that runs the forward pass, the backward pass and the optimizer step
the Lightning way (manual optimization, DDP gradient averaging, gradient clipping, non-finite guards). The math
is in :mod:`lit_moral.ppo` (pure functions); here is only the order of the steps (protocol section 6:
normalise the scores -> KL penalty against the base -> advantages -> ``ppo_epochs`` x minibatches).

``model.algorithm`` picks the learner (docs/learners.md):

- ``ppo``: PPO with a value head; per-step KL penalty in the reward, GAE, whitened advantages.
- ``grpo``: no value head; ``adv = (R - group mean) / (group std + 1e-4)``, groups of identical prompt and seat.
- ``rloo``: no value head; ``adv = R - mean of the other samples of the group`` (leave-one-out).
- ``reinforce``: no value head; ``adv = R - b(prompt, seat)``, ``b`` a running mean of past iterations' returns.

For the three critic-free learners ``R = score - kl_coef x sum_t (logp - ref_logp)``: the KL penalty is in the
reward, summed over the steps of a sample, and the sample's advantage applies to every one of its steps (tokens
in free mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from lit_moral.padding import pad_steps
from lit_moral.ppo import (
    KLController,
    PPOConfig,
    RunningMoments,
    critic_free_loss,
    explained_variance,
    gae,
    group_stats,
    grpo_advantages,
    kl_rewards,
    ppo_loss,
    rloo_advantages,
    sequence_returns,
    whiten,
)
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


class Learner:
    """What every learner shares: the KL controller, the reward statistics, the scores and the epoch loop.

    Args:
        cfg: PPO settings (``ppo_epochs``, ``minibatches``, KL controller, reward normalisation, ...).
    """

    name = ""
    critic = True  # whether the loss trains the value head

    def __init__(self, cfg: PPOConfig) -> None:
        self.cfg = cfg
        self.kl = KLController(cfg.init_kl_coef, cfg.target_kl if cfg.kl_penalty == "adaptive" else None, cfg.kl_horizon)
        self.moments = RunningMoments()

    def state_dict(self) -> dict:
        """What a resume needs: the KL controller and the reward statistics (subclasses add their own)."""
        return {"kl": self.kl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])

    def scores(self, s: AgentSamples, hooks: Hooks) -> torch.Tensor:
        """``[N]`` the rewards, normalised by running statistics over every process's games (protocol section 6)."""
        scores = s.reward.clone()
        if self.cfg.normalize_rewards:
            self.moments.update(hooks.gather(scores) if hooks.world_size > 1 else scores)
            scores = self.moments.normalize(scores)
        return scores

    def _passes(self, agent: str, n: int, opt, hooks: Hooks,
                minibatch: Callable[[torch.Tensor, int], dict[str, torch.Tensor]]) -> dict[str, float]:
        """``ppo_epochs`` x minibatches of ``minibatch(idx, passes)`` and optimizer steps; the mean of their stats."""
        cfg = self.cfg
        size = math.ceil(n / cfg.minibatches)
        passes = cfg.ppo_epochs * math.ceil(n / size)
        stats: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=hooks.minibatch_generator)
            for k in range(0, n, size):
                stats.append(minibatch(perm[k:k + size], passes))
                if not cfg.paper_compat:
                    hooks.step_agent(opt, agent)
        if cfg.paper_compat:
            # The original's effective update: one Adam step on the average of all passes' gradients.
            hooks.step_agent(opt, agent)
        return {k: torch.stack([x[k] for x in stats]).mean().item() for k in stats[0]}

    def _update_kl(self, kl: torch.Tensor, n: int, hooks: Hooks) -> float:
        """Adapt the KL coefficient to ``kl [N, T]``; returns the mean summed KL.

        The controller sees every process's games, so its coefficient stays identical on all processes.
        """
        mean_kl = (hooks.gather(kl.sum(1).mean()).mean() if hooks.world_size > 1 else kl.sum(1).mean()).item()
        self.kl.update(mean_kl, n * hooks.world_size)
        return mean_kl

    def _backward(self, agent: str, s: AgentSamples, idx: torch.Tensor, mask: torch.Tensor, passes: int,
                  hooks: Hooks, device, loss_fn) -> dict[str, torch.Tensor]:
        """Forward, ``loss_fn(out, part) -> (loss, stats)`` and backward of one minibatch ``idx``.

        The obvious path backpropagates sample by sample (a plain loop's gradient accumulation; holding every
        sample's full-vocabulary graph at once does not fit in memory). The losses' masked means are
        token-weighted sums, so the weighted parts add up to the same loss.
        """
        t = mask.shape[1]
        parts = [idx[j:j + 1] for j in range(len(idx))] if hooks.naive else [idx]
        total = mask[idx].sum().clamp_min(1.0)
        loss, st = torch.zeros((), device=device), {}
        for part in parts:
            out = {k: pad_steps(v, t) for k, v in hooks.score(agent, s, part).items() if k != "mask"}
            l_part, st_part = loss_fn(out, part)
            w = mask[part].sum() / total
            hooks.check_finite(l_part, "loss", agent)
            hooks.backward_part(w * l_part / passes if self.cfg.paper_compat else w * l_part)
            loss = loss + w * l_part.detach()
            st = {key: st.get(key, 0.0) + w * v for key, v in st_part.items()}
        return {**st, "total": loss.detach()}


class PPOLearner(Learner):
    """PPO with a value head, as the paper's TRL-legacy PPOTrainer (protocol section 6).

    Args:
        cfg: PPO settings.
    """

    name = "ppo"

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
        scores = self.scores(s, hooks)
        adv, ret, kl = self.advantages(s, scores)
        old_logp, old_values, mask = s.old_logp.to(device), s.values.to(device), s.mask.to(device).float()
        adv, ret = adv.to(device), ret.to(device)

        def loss_fn(out, part):
            return ppo_loss(out["logp"], old_logp[part], out["values"], old_values[part], ret[part], adv[part],
                            mask[part], self.cfg, out["entropy"])

        avg = self._passes(agent, len(s), opt, hooks,
                           lambda idx, passes: self._backward(agent, s, idx, mask, passes, hooks, device, loss_fn))
        mean_kl = self._update_kl(kl, len(s), hooks)
        ev = explained_variance(s.values, ret.cpu(), s.mask.float()).item()
        return {
            f"loss/policy/{agent}": avg["policy"], f"loss/value/{agent}": avg["value"],
            f"loss/total/{agent}": avg["total"], f"policy/entropy/{agent}": avg["entropy"],
            f"policy/approx_kl/{agent}": avg["approx_kl"], f"policy/clipfrac/{agent}": avg["clipfrac"],
            f"policy/ratio/{agent}": avg["ratio"], f"policy/kl/{agent}": mean_kl,
            f"policy/kl_coef/{agent}": self.kl.value, f"value/clipfrac/{agent}": avg["value_clipfrac"],
            f"value/explained_variance/{agent}": ev, f"reward/normalized/{agent}": scores.mean().item(),
        }


def group_keys(s: AgentSamples) -> torch.Tensor:
    """``[N, 2]`` the group key of each sample: ``(pid, seat)``, the prompt it answered and the seat it played.

    A learner only gets its own agent's samples, so a group never holds another agent's; the seat keeps the row
    and column views of a prompt id apart.
    """
    return torch.stack([s.pid.long(), s.seat.long()], 1)


class CriticFreeLearner(Learner):
    """A policy-gradient learner with a baseline instead of a value head (``grpo``, ``rloo``, ``reinforce``).

    Same scores, KL controller and loop as PPO; the value head gets no gradient (its output is not in the loss,
    so its parameters keep ``grad=None`` and Adam skips them) and no value statistics are logged.

    Args:
        cfg: PPO settings; ``gamma``, ``lam``, ``vf_coef``, ``clip_range_value`` and ``whiten_advantages`` are
            not used.
    """

    critic = False
    clip = True  # PPO's ratio clip (cfg.clip_range), or the unclipped importance-weighted loss

    def advantages(self, ret: torch.Tensor, keys: torch.Tensor, hooks: Hooks) -> tuple[torch.Tensor, dict[str, float]]:
        """``(adv [N], extra logs)`` of the sequence returns ``ret [N]`` with group keys ``keys [N, K]``."""
        raise NotImplementedError

    def update(self, agent: str, s: AgentSamples, opt, hooks: Hooks, device) -> dict[str, float]:
        """One update of ``agent`` on its samples; returns the logged scalars."""
        scores = self.scores(s, hooks)
        ret, kl = sequence_returns(scores, s.old_logp, s.ref_logp, s.mask.float(), self.kl.value)
        adv, extra = self.advantages(ret, group_keys(s), hooks)
        old_logp, mask = s.old_logp.to(device), s.mask.to(device).float()
        adv = adv.to(device)[:, None] * mask  # a sample's advantage applies to every one of its steps
        clip = self.cfg.clip_range if self.clip else None

        def loss_fn(out, part):
            return critic_free_loss(out["logp"], old_logp[part], adv[part], mask[part], clip, self.cfg.ent_coef,
                                    out["entropy"])

        avg = self._passes(agent, len(s), opt, hooks,
                           lambda idx, passes: self._backward(agent, s, idx, mask, passes, hooks, device, loss_fn))
        mean_kl = self._update_kl(kl, len(s), hooks)
        return {
            f"loss/policy/{agent}": avg["policy"], f"loss/total/{agent}": avg["total"],
            f"policy/entropy/{agent}": avg["entropy"], f"policy/approx_kl/{agent}": avg["approx_kl"],
            f"policy/clipfrac/{agent}": avg["clipfrac"], f"policy/ratio/{agent}": avg["ratio"],
            f"policy/kl/{agent}": mean_kl, f"policy/kl_coef/{agent}": self.kl.value,
            f"reward/normalized/{agent}": scores.mean().item(),
            **{f"{k}/{agent}": v for k, v in extra.items()},
        }


class GroupLearner(CriticFreeLearner):
    """Group baseline: each sample is compared with the other samples of its group (same prompt and seat).

    Groups are formed from this process's samples (under DDP, each process's share of the games).
    """

    estimator: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def advantages(self, ret: torch.Tensor, keys: torch.Tensor, hooks: Hooks) -> tuple[torch.Tensor, dict[str, float]]:
        adv, base = self.estimator(ret, keys)
        flat = group_stats(ret, keys)["flat"]
        return adv, {"policy/baseline": base.mean().item(), "policy/flat_groups": flat.float().mean().item()}


class GRPOLearner(GroupLearner):
    """GRPO: ``(R - group mean) / (group std + 1e-4)``, 0 for a group of one or of equal returns; PPO's clip."""

    name = "grpo"
    estimator = staticmethod(grpo_advantages)


class RLOOLearner(GroupLearner):
    """RLOO: ``R - mean of the group's other returns``, 0 for a group of one or of equal returns; PPO's clip."""

    name = "rloo"
    estimator = staticmethod(rloo_advantages)


class StateBaseline:
    """A running mean of the return per group key (prompt and seat), kept across iterations and checkpointed.

    After each iteration, every key seen gets ``b <- decay x b + (1 - decay) x (its mean return this
    iteration)``; a key seen for the first time starts at its mean. A key never seen has baseline 0 (with
    ``normalize_rewards`` on, the running mean of all scores).

    Args:
        decay: weight of the old baseline per iteration (0.5: the last iterations dominate, since the policy
            and so the expected return of a state move quickly).
    """

    def __init__(self, decay: float = 0.5) -> None:
        self.decay = decay
        self.value: dict[tuple[int, ...], float] = {}

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """``[N]`` float64 baselines of the keys ``[N, K]``."""
        return torch.tensor([self.value.get(tuple(k), 0.0) for k in keys.tolist()], dtype=torch.float64)

    def update(self, keys: torch.Tensor, ret: torch.Tensor) -> None:
        """Fold this iteration's returns ``ret [N]`` with keys ``keys [N, K]`` into the baselines."""
        means = dict(zip(map(tuple, keys.tolist()), group_stats(ret, keys)["mean"].tolist()))
        for k, m in means.items():
            old = self.value.get(k)
            self.value[k] = m if old is None else self.decay * old + (1.0 - self.decay) * m

    def state_dict(self) -> dict:
        """``keys [K, D]`` long and ``value [K]`` float64 tensors, keys sorted (exact and checkpoint-friendly)."""
        keys = sorted(self.value)
        return {"keys": torch.tensor(keys, dtype=torch.long).reshape(len(keys), -1),
                "value": torch.tensor([self.value[k] for k in keys], dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.value = dict(zip(map(tuple, state["keys"].tolist()), state["value"].tolist()))


class ReinforceLearner(CriticFreeLearner):
    """REINFORCE with a running per-state baseline: ``R - b(pid, seat)``, the loss not clipped.

    The baseline of an iteration is the one before its samples are folded in, so a sample never enters its own
    baseline. Under DDP every process folds in every process's returns, so the baselines stay identical.
    """

    name = "reinforce"
    clip = False

    def __init__(self, cfg: PPOConfig) -> None:
        super().__init__(cfg)
        self.baseline = StateBaseline()

    def state_dict(self) -> dict:
        """The shared state plus the baselines."""
        return {**super().state_dict(), "baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.baseline.load_state_dict(state["baseline"])

    def advantages(self, ret: torch.Tensor, keys: torch.Tensor, hooks: Hooks) -> tuple[torch.Tensor, dict[str, float]]:
        base = self.baseline(keys)
        adv = (ret.double() - base).to(ret.dtype)
        if hooks.world_size > 1:
            keys = torch.stack([hooks.gather(keys[:, j]) for j in range(keys.shape[1])], 1)
            ret = hooks.gather(ret)
        self.baseline.update(keys, ret)
        return adv, {"policy/baseline": base.mean().item(), "policy/baseline_states": float(len(self.baseline.value))}


LEARNERS: dict[str, type[Learner]] = {"ppo": PPOLearner, "grpo": GRPOLearner, "rloo": RLOOLearner,
                                      "reinforce": ReinforceLearner}


def make_learner(name: str, cfg: PPOConfig) -> Learner:
    """A learner by name (``model.algorithm``: ppo, grpo, rloo, reinforce)."""
    return LEARNERS[name](cfg)
